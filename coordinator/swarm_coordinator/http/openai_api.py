"""The OpenAI-compatible API: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Requests are checked field by field and turned into the client library's
``SamplingOptions``; generation goes through the gateway's ``AsyncSwarmClient``
(so a failing node is reported and replaced by the client library, invisibly to the
HTTP caller). Responses and stream chunks have OpenAI's shapes; errors have OpenAI's
error shape (``{"error": {"message", "type", "param", "code"}}``) and status codes:

====  ==========================  ===============================================
400   invalid_request_error       malformed JSON, a missing or out-of-range field,
                                  a prompt longer than the context, n > 1
401   invalid_request_error       missing or wrong API key (code invalid_api_key)
404   invalid_request_error       unknown model (code model_not_found) or path
429   requests / tokens           a rate limit; ``Retry-After`` says when to retry
503   server_error                the swarm cannot serve the model right now
500   server_error                anything unexpected (logged with its traceback)
====  ==========================  ===============================================

A streamed response that fails after its first chunk ends with an ``error`` chunk
(what OpenAI's clients raise on) instead of ``data: [DONE]``.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from swarm_client.errors import GenerationError, InvalidRequestError, ModelUnavailableError, SwarmError, TokenizerError
from swarm_client.params import SamplingOptions
from swarm_client.types import GenerationResult, StreamEvent
from swarm_coordinator.errors import CoordinatorError

if TYPE_CHECKING:
    from swarm_coordinator.http.app import Gateway
    from swarm_coordinator.http.auth import Caller

log = logging.getLogger(__name__)

__all__ = ["ChatRequest", "CompletionRequest", "OpenAIError", "OpenAIRoutes", "parse_chat", "parse_completion"]

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default for /v1/completions
MAX_STOP_STRINGS = 4
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def translate(exc: BaseException) -> OpenAIError:
    """The HTTP answer for an exception raised while generating."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        code = "context_length_exceeded" if "context" in str(exc) else None
        return invalid(str(exc), code=code)
    if isinstance(exc, TokenizerError):
        return invalid(str(exc))
    if isinstance(exc, (ModelUnavailableError, CoordinatorError)):
        return OpenAIError(503, f"the swarm cannot serve this request now: {exc}", type="server_error", code="unavailable")
    if isinstance(exc, (GenerationError, SwarmError)):
        return OpenAIError(503, f"generation failed: {exc}", type="server_error", code="generation_failed")
    log.error("unexpected error while generating", exc_info=exc)
    return OpenAIError(500, "internal error in the gateway (see its log)", type="server_error")


# --- request parsing ---------------------------------------------------------------------


def _get(body: Mapping[str, Any], name: str, kinds: type | tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise invalid(f"'{name}' must be {what}, got {json.dumps(value)}", name)
    if not isinstance(value, kinds):
        raise invalid(f"'{name}' must be {what}, got {json.dumps(value)[:80]}", name)
    return value


def _number(body: Mapping[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = _get(body, name, (int, float), "a number")
    if value is None:
        return None
    if not lo <= value <= hi:
        raise invalid(f"'{name}' must be between {lo:g} and {hi:g}, got {value}", name)
    return float(value)


def _int(body: Mapping[str, Any], name: str, lo: int | None = None) -> int | None:
    value = _get(body, name, int, "an integer")
    if value is not None and lo is not None and value < lo:
        raise invalid(f"'{name}' must be >= {lo}, got {value}", name)
    return value  # type: ignore[no-any-return]


def _stop(body: Mapping[str, Any]) -> tuple[str, ...] | None:
    value = body.get("stop")
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise invalid("'stop' strings must not be empty", "stop")
    return tuple(stops)


def _unsupported(body: Mapping[str, Any], name: str, neutral: Any) -> None:
    value = body.get(name)
    if value is not None and value != neutral:
        raise invalid(f"'{name}' is not supported by this server (only {json.dumps(neutral)})", name)


@dataclass(frozen=True)
class _Common:
    model: str
    options: SamplingOptions
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False


def _common(body: Any, *, default_max_tokens: int | None, max_tokens_names: Sequence[str]) -> _Common:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("you must provide a model parameter ('model': a model id from /v1/models)", "model")
    n = _int(body, "n", 1)
    if n is not None and n != 1:
        raise invalid("only n=1 is supported", "n")
    for name, neutral in (("frequency_penalty", 0), ("presence_penalty", 0), ("best_of", 1), ("logit_bias", {})):
        _unsupported(body, name, neutral)
    max_tokens = None
    for name in max_tokens_names:
        value = _int(body, name, 1)
        if value is not None:
            max_tokens = value
            break
    if max_tokens is None:
        max_tokens = default_max_tokens
    stream = bool(_get(body, "stream", bool, "true or false"))
    stream_options = _get(body, "stream_options", dict, "an object")
    if stream_options is not None and not stream:
        raise invalid("'stream_options' is only allowed with 'stream': true", "stream_options")
    include_usage = bool(_get(stream_options or {}, "include_usage", bool, "true or false"))
    overrides = {
        "max_tokens": max_tokens,
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0),
        "top_k": _int(body, "top_k", 0),  # extension (vLLM and others accept it too)
        "repetition_penalty": _number(body, "repetition_penalty", 0.0, 10.0),  # extension
        "seed": _int(body, "seed"),
        "stop": _stop(body),
        "ignore_eos": _get(body, "ignore_eos", bool, "true or false"),  # extension (vLLM's name)
    }
    if overrides["top_p"] == 0.0:
        overrides["top_p"] = None
        overrides["temperature"] = 0.0  # no mass kept: only the most likely token, i.e. greedy
    try:
        options = SamplingOptions().merged(**overrides)
    except InvalidRequestError as exc:
        param = next((k for k in overrides if k in str(exc)), None)
        raise invalid(str(exc), param) from None
    return _Common(model, options, stream, include_usage)


@dataclass(frozen=True)
class CompletionRequest(_Common):
    prompt: str | list[int] = ""
    echo: bool = False


@dataclass(frozen=True)
class ChatRequest(_Common):
    messages: list[dict[str, str]] = field(default_factory=list)


def parse_completion(body: Any) -> CompletionRequest:
    common = _common(body, default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS, max_tokens_names=("max_tokens",))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 for t in prompt):
            raise invalid("token ids in 'prompt' must be >= 0", "prompt")
    elif isinstance(prompt, list):
        raise invalid("'prompt' must be a string or a list of token ids (batches of prompts are not supported)", "prompt")
    elif not isinstance(prompt, str):
        raise invalid("you must provide a 'prompt' (a string or a list of token ids)", "prompt")
    if prompt == "":
        raise invalid("'prompt' is empty", "prompt")
    logprobs = _int(body, "logprobs", 0)
    if logprobs:
        raise invalid("'logprobs' > 0 (top alternatives) is not supported; use 0 for the sampled tokens' logprobs", "logprobs")
    _unsupported(body, "suffix", "")
    echo = bool(_get(body, "echo", bool, "true or false"))
    return CompletionRequest(
        common.model, common.options.merged(logprobs=logprobs is not None or None), common.stream,
        common.include_usage, logprobs is not None, prompt, echo,
    )


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _message(i: int, msg: Any) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise invalid(f"'{where}' must be an object with 'role' and 'content'", where)
    role = msg.get("role")
    if role not in _ROLES:
        raise invalid(
            f"'{where}.role' must be one of {', '.join(sorted(_ROLES))}, got {json.dumps(role)}", f"{where}.role"
        )
    content = msg.get("content")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"'{where}.content' parts must be text parts (images and audio are not supported)", f"{where}.content")
            parts.append(part["text"])
        content = "".join(parts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise invalid(f"'{where}.content' must be a string or a list of text parts", f"{where}.content")
    return {"role": _ROLES[role], "content": content}


def parse_chat(body: Any) -> ChatRequest:
    common = _common(body, default_max_tokens=None, max_tokens_names=("max_completion_tokens", "max_tokens"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("you must provide 'messages' (a non-empty list of {role, content})", "messages")
    parsed = [_message(i, m) for i, m in enumerate(messages)]
    for name in ("tools", "functions"):
        if body.get(name):
            raise invalid(f"'{name}' (tool calling) is not supported by this server", name)
    logprobs = bool(_get(body, "logprobs", bool, "true or false"))
    top = _int(body, "top_logprobs", 0)
    if top:
        raise invalid("'top_logprobs' > 0 is not supported", "top_logprobs")
    options = common.options.merged(logprobs=logprobs or None)
    return ChatRequest(common.model, options, common.stream, common.include_usage, logprobs, parsed)


# --- responses ---------------------------------------------------------------------------


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class OpenAIRoutes:
    """The ``/v1`` handlers of one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self.fingerprint = "fp_swarm_" + secrets.token_hex(4)

    # -- helpers --

    async def _body(self, request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise invalid("we could not parse the JSON body of your request") from None

    def _check_model(self, model: str) -> None:
        if model not in self.gw.model_ids:
            raise OpenAIError(
                404,
                f"The model `{model}` does not exist or you do not have access to it. Available: {self.gw.model_id}",
                param="model",
                code="model_not_found",
            )

    def _token_strings(self, ids: Sequence[int]) -> list[str]:
        tok = self.gw.client.tokenizer
        return [tok.decode([i], skip_special_tokens=False) for i in ids]

    def _chat_logprobs(self, ids: Sequence[int], logprobs: Sequence[float] | None) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        return {
            "content": [
                {"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
                for s, lp in zip(self._token_strings(ids), logprobs)
            ]
        }

    def _completion_logprobs(self, ids: Sequence[int], logprobs: Sequence[float] | None, offset: int) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        strings = self._token_strings(ids)
        offsets = []
        for s in strings:
            offsets.append(offset)
            offset += len(s)
        return {"tokens": strings, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}

    # -- handlers --

    async def models(self, request: Request) -> Response:
        self.gw.authenticate(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        self.gw.authenticate(request)
        self._check_model(request.path_params["model"])
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.gw.model_id, "object": "model", "created": self.gw.created, "owned_by": "llama-swarm"}

    async def completions(self, request: Request) -> Response:
        caller = self.gw.authenticate(request)
        req = parse_completion(await self._body(request))
        self._check_model(req.model)
        prompt_ids = self.gw.encode(req.prompt)
        return await self._respond("completions", caller, req, prompt_ids)

    async def chat_completions(self, request: Request) -> Response:
        caller = self.gw.authenticate(request)
        req = parse_chat(await self._body(request))
        self._check_model(req.model)
        try:
            prompt_ids = self.gw.client.encode_chat(req.messages)
        except SwarmError as exc:
            raise translate(exc) from exc
        return await self._respond("chat.completions", caller, req, prompt_ids)

    async def _respond(self, endpoint: str, caller: Caller, req: _Common, prompt_ids: list[int]) -> Response:
        self.gw.admit(caller)
        events = self.gw.generate(endpoint, caller, prompt_ids, req.options)
        # Pull the first event before answering, so that a request that cannot start
        # (prompt too long, no route) gets a proper status code instead of a broken stream.
        try:
            first = await events.__anext__()
        except StopAsyncIteration:  # pragma: no cover - a stream always ends with a result
            raise OpenAIError(500, "the generation produced no result", type="server_error") from None
        except Exception as exc:
            await events.aclose()
            raise translate(exc) from exc
        if req.stream:
            chunks = self._chat_chunks if isinstance(req, ChatRequest) else self._completion_chunks
            return StreamingResponse(
                chunks(req, prompt_ids, first, events), media_type="text/event-stream", headers=SSE_HEADERS
            )
        try:
            result = first.result
            async for event in events:
                result = event.result or result
        except Exception as exc:
            raise translate(exc) from exc
        finally:
            await events.aclose()
        assert result is not None
        if isinstance(req, ChatRequest):
            return JSONResponse(self._chat_response(req, result))
        assert isinstance(req, CompletionRequest)
        return JSONResponse(self._completion_response(req, result))

    def _base(self, prefix: str, kind: str) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{secrets.token_hex(12)}",
            "object": kind,
            "created": int(time.time()),
            "model": self.gw.model_id,
            "system_fingerprint": self.fingerprint,
        }

    def _chat_response(self, req: ChatRequest, result: GenerationResult) -> dict[str, Any]:
        body = self._base("chatcmpl", "chat.completion")
        body["choices"] = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text, "refusal": None},
                "logprobs": self._chat_logprobs(result.token_ids, result.logprobs) if req.logprobs else None,
                "finish_reason": result.finish_reason,
            }
        ]
        body["usage"] = _usage(len(result.prompt_token_ids), result.num_tokens)
        return body

    def _completion_response(self, req: CompletionRequest, result: GenerationResult) -> dict[str, Any]:
        body = self._base("cmpl", "text_completion")
        prefix = ""
        if req.echo:
            prefix = req.prompt if isinstance(req.prompt, str) else self.gw.client.tokenizer.decode(req.prompt)
        body["choices"] = [
            {
                "index": 0,
                "text": prefix + result.text,
                "logprobs": self._completion_logprobs(result.token_ids, result.logprobs, len(prefix)) if req.logprobs else None,
                "finish_reason": result.finish_reason,
            }
        ]
        body["usage"] = _usage(len(result.prompt_token_ids), result.num_tokens)
        return body

    async def _chat_chunks(
        self, req: _Common, prompt_ids: list[int], first: StreamEvent, events: AsyncIterator[StreamEvent]
    ) -> AsyncIterator[bytes]:
        base = self._base("chatcmpl", "chat.completion.chunk")
        if req.include_usage:
            base["usage"] = None

        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> bytes:
            return _sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

        yield chunk({"role": "assistant", "content": ""})
        async for event in _chain(first, events, self._error_chunk):
            if isinstance(event, bytes):
                yield event
                return
            lp = self._chat_logprobs(event.token_ids, event.logprobs) if req.logprobs else None
            if event.text or lp:
                yield chunk({"content": event.text}, logprobs=lp)
            if event.result is not None:
                yield chunk({}, event.result.finish_reason)
                if req.include_usage:
                    usage = _usage(len(event.result.prompt_token_ids), event.result.num_tokens)
                    yield _sse({**base, "choices": [], "usage": usage})
        yield SSE_DONE

    async def _completion_chunks(
        self, req: _Common, prompt_ids: list[int], first: StreamEvent, events: AsyncIterator[StreamEvent]
    ) -> AsyncIterator[bytes]:
        assert isinstance(req, CompletionRequest)
        base = self._base("cmpl", "text_completion")
        if req.include_usage:
            base["usage"] = None
        offset = 0

        def chunk(text: str, finish: str | None = None, logprobs: Any = None) -> bytes:
            return _sse({**base, "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}]})

        if req.echo:
            prefix = req.prompt if isinstance(req.prompt, str) else self.gw.client.tokenizer.decode(req.prompt)
            offset = len(prefix)
            yield chunk(prefix)
        async for event in _chain(first, events, self._error_chunk):
            if isinstance(event, bytes):
                yield event
                return
            lp = self._completion_logprobs(event.token_ids, event.logprobs, offset) if req.logprobs else None
            offset += len(event.text)
            finish = event.result.finish_reason if event.result is not None else None
            if event.text or lp or finish:
                yield chunk(event.text, finish, lp)
            if event.result is not None and req.include_usage:
                usage = _usage(len(event.result.prompt_token_ids), event.result.num_tokens)
                yield _sse({**base, "choices": [], "usage": usage})
        yield SSE_DONE

    def _error_chunk(self, exc: BaseException) -> bytes:
        return _sse(translate(exc).body())


async def _chain(
    first: StreamEvent, events: AsyncIterator[StreamEvent], on_error: Any
) -> AsyncIterator[StreamEvent | bytes]:
    """``first`` then the rest of ``events``; a failure becomes one error chunk. Always
    closes ``events`` (a client that hangs up cancels us here, which ends the session)."""
    try:
        yield first
        async for event in events:
            yield event
    except Exception as exc:
        log.warning("stream failed after it started: %s", exc)
        yield on_error(exc)
    finally:
        await events.aclose()  # type: ignore[attr-defined]
