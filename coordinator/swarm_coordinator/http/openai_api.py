"""The OpenAI-compatible API: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Requests are checked field by field (:mod:`.schema`) and turned into the client
library's ``SamplingOptions``; generation goes through the gateway's ``AsyncSwarmClient``
(so a failing node is reported and replaced by the client library, invisibly to the
HTTP caller). Responses and stream chunks have OpenAI's shapes; errors have OpenAI's
error shape (``{"error": {"message", "type", "param", "code"}}``) and status codes:

====  ==========================  ===============================================
400   invalid_request_error       malformed JSON, a missing or out-of-range field,
                                  a prompt longer than the context, n > 1
400   invalid_request_error       a prompt the acceptable-use policy refuses (code
                                  content_policy_violation; the message names the rule)
401   invalid_request_error       missing or wrong API key (code invalid_api_key)
404   invalid_request_error       unknown model (code model_not_found) or path
429   requests / tokens           a rate limit; ``Retry-After`` says when to retry
429   server_overloaded           the swarm is busy (full, not failing) and the line of
                                  waiting requests is at its bound or the request
                                  waited its longest; ``Retry-After`` says when
503   server_error                the swarm cannot serve the model right now
500   server_error                anything unexpected (logged with its traceback)
====  ==========================  ===============================================

A completion the policy stops ends with ``finish_reason`` ``content_filter`` and the
rule id as the choice's ``stop_reason`` (streamed or not; :mod:`.policy`).

A streamed response that fails after its first chunk ends with an ``error`` chunk
(what OpenAI's clients raise on) instead of ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from swarm_client.errors import SwarmError
from swarm_client.types import GenerationResult, StreamEvent
from swarm_coordinator.http.errors import OpenAIError, invalid, translate
from swarm_coordinator.http.guard import read_body, until_disconnected
from swarm_coordinator.http.schema import ChatRequest, CompletionRequest, RequestBase, parse_chat, parse_completion

if TYPE_CHECKING:
    from swarm_coordinator.http.app import Gateway
    from swarm_coordinator.http.auth import Caller

log = logging.getLogger(__name__)

__all__ = ["OpenAIRoutes", "SSE_HEADERS"]

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- responses ---------------------------------------------------------------------------


def _usage(prompt_tokens: int, completion_tokens: int, checked_tokens: int = 0) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # an extension: positions recomputed on other nodes and found equal (docs/verification.md)
        "checked_tokens": checked_tokens,
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
        raw = await read_body(request, self.gw.config.max_body_bytes)
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

    # Tokenizing runs in a worker thread, after the rate limit admitted the request: a
    # huge prompt (up to the body limit) costs its sender, never the event loop that
    # also serves the broker, the registry and gRPC.

    async def completions(self, request: Request) -> Response:
        caller = self.gw.authenticate(request)
        req = parse_completion(await self._body(request))
        self._check_model(req.model)
        self.gw.admit(caller)
        prompt_ids = await asyncio.to_thread(self.gw.encode, req.prompt)
        texts = [req.prompt] if isinstance(req.prompt, str) else [self.gw.client.tokenizer.decode(prompt_ids)]
        await self.gw.check_prompt("completions", caller, texts, req.prompt, "prompt")
        return await self._respond(request, "completions", caller, req, prompt_ids, req.prompt)

    async def chat_completions(self, request: Request) -> Response:
        caller = self.gw.authenticate(request)
        req = parse_chat(await self._body(request))
        self._check_model(req.model)
        self.gw.admit(caller)
        await self.gw.check_prompt("chat.completions", caller, [m["content"] for m in req.messages], req.messages, "messages")
        client = self.gw.client
        try:
            prompt_ids = await asyncio.to_thread(client.encode_chat, req.messages)
        except SwarmError as exc:
            raise translate(exc) from exc
        return await self._respond(request, "chat.completions", caller, req, prompt_ids, req.messages)

    async def _respond(
        self, request: Request, endpoint: str, caller: Caller, req: RequestBase, prompt_ids: list[int], prompt: Any
    ) -> Response:
        events = self.gw.generate(endpoint, caller, prompt_ids, req.options, prompt)
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
        result = await self._collect(request, first, events)
        assert result is not None
        if isinstance(req, ChatRequest):
            return JSONResponse(self._chat_response(req, result))
        assert isinstance(req, CompletionRequest)
        return JSONResponse(self._completion_response(req, result))

    async def _collect(
        self, request: Request, first: StreamEvent, events: AsyncIterator[StreamEvent]
    ) -> GenerationResult | None:
        """The result of a non-streamed generation; it stops (its session closes along the
        route) as soon as the caller hangs up instead of running to its end for nobody."""

        async def consume() -> GenerationResult | None:
            result = first.result
            async for event in events:
                result = event.result or result
            return result

        work = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                log.info("the caller hung up: generation stopped")
                work.cancel()
                await asyncio.wait({work})
                if not work.cancelled():
                    work.exception()  # retrieved: nobody is left to tell
                raise OpenAIError(499, "the caller closed the connection", code="client_closed_request")
            return work.result()
        except OpenAIError:
            raise
        except Exception as exc:
            raise translate(exc) from exc
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
            await events.aclose()  # type: ignore[attr-defined]

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
                **_filtered(result),
            }
        ]
        body["usage"] = _usage(len(result.prompt_token_ids), result.num_tokens, result.checked_steps)
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
                **_filtered(result),
            }
        ]
        body["usage"] = _usage(len(result.prompt_token_ids), result.num_tokens, result.checked_steps)
        return body

    async def _chat_chunks(
        self, req: RequestBase, prompt_ids: list[int], first: StreamEvent, events: AsyncIterator[StreamEvent]
    ) -> AsyncIterator[bytes]:
        base = self._base("chatcmpl", "chat.completion.chunk")
        if req.include_usage:
            base["usage"] = None

        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None, extra: Any = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish, **(extra or {})}
            return _sse({**base, "choices": [choice]})

        yield chunk({"role": "assistant", "content": ""})
        async for event in _chain(first, events, self._error_chunk):
            if isinstance(event, bytes):
                yield event
                return
            lp = self._chat_logprobs(event.token_ids, event.logprobs) if req.logprobs else None
            if event.text or lp:
                yield chunk({"content": event.text}, logprobs=lp)
            if event.result is not None:
                yield chunk({}, event.result.finish_reason, extra=_filtered(event.result))
                if req.include_usage:
                    usage = _usage(len(event.result.prompt_token_ids), event.result.num_tokens, event.result.checked_steps)
                    yield _sse({**base, "choices": [], "usage": usage})
        yield SSE_DONE

    async def _completion_chunks(
        self, req: RequestBase, prompt_ids: list[int], first: StreamEvent, events: AsyncIterator[StreamEvent]
    ) -> AsyncIterator[bytes]:
        assert isinstance(req, CompletionRequest)
        base = self._base("cmpl", "text_completion")
        if req.include_usage:
            base["usage"] = None
        offset = 0

        def chunk(text: str, finish: str | None = None, logprobs: Any = None, extra: Any = None) -> bytes:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish, **(extra or {})}
            return _sse({**base, "choices": [choice]})

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
                yield chunk(event.text, finish, lp, _filtered(event.result) if event.result is not None else None)
            if event.result is not None and req.include_usage:
                usage = _usage(len(event.result.prompt_token_ids), event.result.num_tokens, event.result.checked_steps)
                yield _sse({**base, "choices": [], "usage": usage})
        yield SSE_DONE

    def _error_chunk(self, exc: BaseException) -> bytes:
        return _sse(translate(exc).body())


def _filtered(result: GenerationResult) -> dict[str, Any]:
    """The rule that stopped a completion (``finish_reason`` ``content_filter``), as the
    choice's ``stop_reason`` (vLLM's field for why a choice stopped); nothing otherwise."""
    return {"stop_reason": result.stop_reason} if result.finish_reason == "content_filter" else {}


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
