"""OpenAI request bodies, checked field by field and turned into ``SamplingOptions``.

Every problem is an :class:`OpenAIError` 400 naming the offending field in ``param``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from swarm_client.errors import InvalidRequestError
from swarm_client.params import SamplingOptions
from swarm_coordinator.http.errors import invalid

__all__ = [
    "COMPLETIONS_DEFAULT_MAX_TOKENS",
    "MAX_STOP_STRINGS",
    "ChatRequest",
    "CompletionRequest",
    "RequestBase",
    "parse_chat",
    "parse_completion",
]

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default for /v1/completions
MAX_STOP_STRINGS = 4


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
class RequestBase:
    model: str
    options: SamplingOptions
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False


def _common(body: Any, *, default_max_tokens: int | None, max_tokens_names: Sequence[str]) -> RequestBase:
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
    return RequestBase(model, options, stream, include_usage)


@dataclass(frozen=True)
class CompletionRequest(RequestBase):
    prompt: str | list[int] = ""
    echo: bool = False


@dataclass(frozen=True)
class ChatRequest(RequestBase):
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
