"""Talking to a swarm's HTTP gateway (its OpenAI-compatible API) with typed errors.

The rest of the client library speaks gRPC to the nodes; a caller who goes through an
operator's gateway instead (API keys, acceptable-use policy, audit) can use the
official ``openai`` client, or :class:`GatewayClient`, which needs nothing but the
standard library and turns the gateway's policy answers into
:class:`~swarm_client.errors.ContentPolicyError`::

    gw = GatewayClient("http://127.0.0.1:8000", api_key="sk-...")
    try:
        text = gw.chat([{"role": "user", "content": "Hi"}], max_tokens=32)
        for piece in gw.stream_completion("Once upon a time", max_tokens=64):
            print(piece, end="")
    except ContentPolicyError as exc:
        print("refused by rule", exc.rule, "at the", exc.stage, "after", repr(exc.text))

With the ``openai`` client, :func:`policy_error` does the same translation on what it
raises (``openai.BadRequestError``) and on a choice whose ``finish_reason`` is
``content_filter``.

Invariant: a refused prompt (HTTP 400, code ``content_policy_violation``) and a
stopped completion (``finish_reason`` ``content_filter``, the rule id in the choice's
``stop_reason``) both raise ContentPolicyError with the rule id; other HTTP errors raise
:class:`~swarm_client.errors.GenerationError` with the gateway's message.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from swarm_client.errors import ContentPolicyError, GenerationError, InvalidRequestError

__all__ = ["GatewayClient", "policy_error"]

_RULE = re.compile(r"rule '([A-Za-z0-9_.:-]{1,64})'")


def _refused(message: str) -> ContentPolicyError:
    m = _RULE.search(message)
    return ContentPolicyError(message, m.group(1) if m else "", "prompt")


def _stopped(choice: Mapping[str, Any], text: str) -> ContentPolicyError:
    rule = str(choice.get("stop_reason") or "")
    return ContentPolicyError(f"the gateway's usage policy stopped the completion (rule '{rule}')", rule, "completion", text)


def policy_error(obj: Any, text: str = "") -> ContentPolicyError | None:
    """The ContentPolicyError for what the ``openai`` client gave: an exception it raised
    (a 400 ``content_policy_violation``), or a choice (object or dict) that ended with
    ``content_filter``; None for anything else."""
    if isinstance(obj, BaseException):
        if getattr(obj, "code", None) == "content_policy_violation":
            return _refused(str(getattr(obj, "message", obj)))
        return None
    choice = obj if isinstance(obj, Mapping) else (getattr(obj, "model_extra", None) or {}) | {
        "finish_reason": getattr(obj, "finish_reason", None)
    }
    if choice.get("finish_reason") == "content_filter":
        return _stopped(choice, text)
    return None


class GatewayClient:
    """A minimal blocking client of a gateway's ``/v1/completions`` and
    ``/v1/chat/completions`` (standard library only)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, model: str | None = None, timeout: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.api_key = api_key
        self.model = model
        self.timeout = timeout

    def _model(self) -> str:
        if self.model is None:
            with self._open("GET", "/v1/models") as resp:
                self.model = json.load(resp)["data"][0]["id"]
        return self.model

    def _open(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read()).get("error", {})
            except ValueError:
                err = {}
            message = str(err.get("message") or exc.reason)
            if err.get("code") == "content_policy_violation":
                raise _refused(message) from None
            if exc.code == 400:
                raise InvalidRequestError(message) from None
            raise GenerationError(f"gateway answered {exc.code}: {message}") from None
        except OSError as exc:
            raise GenerationError(f"cannot reach the gateway at {self.base_url}: {exc}") from exc

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._open("POST", path, {"model": self._model(), **body}) as resp:
            return json.load(resp)  # type: ignore[no-any-return]

    def _stream(self, path: str, body: dict[str, Any], key: str) -> Iterator[str]:
        text: list[str] = []
        with self._open("POST", path, {"model": self._model(), **body, "stream": True}) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise GenerationError(str(chunk["error"].get("message")))
                for choice in chunk.get("choices", []):
                    piece = choice["delta"].get("content") if key == "delta" else choice.get("text")
                    if piece:
                        text.append(piece)
                        yield piece
                    if choice.get("finish_reason") == "content_filter":
                        raise _stopped(choice, "".join(text))

    def completion(self, prompt: str | Sequence[int], **params: Any) -> str:
        """The text of ``/v1/completions``; ContentPolicyError when the policy refuses or stops it."""
        choice = self._post("/v1/completions", {"prompt": prompt, **params})["choices"][0]
        if choice.get("finish_reason") == "content_filter":
            raise _stopped(choice, choice.get("text") or "")
        return str(choice.get("text") or "")

    def chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> str:
        """The assistant's reply from ``/v1/chat/completions``; ContentPolicyError as above."""
        choice = self._post("/v1/chat/completions", {"messages": list(messages), **params})["choices"][0]
        content = str(choice["message"].get("content") or "")
        if choice.get("finish_reason") == "content_filter":
            raise _stopped(choice, content)
        return content

    def stream_completion(self, prompt: str | Sequence[int], **params: Any) -> Iterator[str]:
        return self._stream("/v1/completions", {"prompt": prompt, **params}, "text")

    def stream_chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> Iterator[str]:
        return self._stream("/v1/chat/completions", {"messages": list(messages), **params}, "delta")
