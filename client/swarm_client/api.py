"""The client's public faces: ``SwarmClient`` (sync) and ``AsyncSwarmClient``.

Both drive a ``TokenSource`` backend through ``run_stream``, which owns what every
backend shares: seeding, detokenizing, EOS / stop tokens / stop strings /
max tokens, timing and the final ``GenerationResult``.

    with SwarmClient.local() as client:
        print(client.generate("The capital of France is", max_tokens=8).text)
        for event in client.stream("Once upon a time", temperature=0.8, seed=1):
            print(event.text, end="", flush=True)
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from swarm_client.errors import InvalidRequestError
from swarm_client.params import SamplingOptions
from swarm_client.tokenizer import Tokenizer, load_tokenizer
from swarm_client.types import FinishReason, GenerationResult, StreamEvent, Timing, TokenSource

__all__ = ["SwarmClient", "AsyncSwarmClient", "run_stream", "Prompt", "Messages"]

Prompt = str | Sequence[int]
Messages = Sequence[Mapping[str, Any]]


def _find_stop(text: str, stops: Sequence[str], start: int) -> tuple[int, str] | None:
    """The earliest stop string in ``text[start:]``: (index, stop string)."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could begin a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def run_stream(
    source: TokenSource,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    options: SamplingOptions,
) -> Iterator[StreamEvent]:
    """Generate from ``prompt_ids`` with ``source``; yield one event per token and a
    final event that carries the ``GenerationResult``."""
    prompt = tuple(int(t) for t in prompt_ids)
    if not prompt:
        raise InvalidRequestError("the prompt is empty")
    room = source.max_context - len(prompt)
    if room < 1:
        raise InvalidRequestError(
            f"the prompt has {len(prompt)} tokens; the model's context holds {source.max_context}"
        )
    opts = options.with_seed()
    assert opts.seed is not None
    params = opts.to_sampling_params()
    max_new = min(opts.max_tokens, room)
    stop_ids = set(opts.stop_token_ids)
    if not opts.ignore_eos:
        stop_ids.update(source.eos_token_ids)
    stops = opts.stop

    detok = tokenizer.detokenizer(prompt)
    text = ""  # decoded so far (cut at a stop string once one matches)
    emitted = 0  # how much of `text` the events have carried
    ids: list[int] = []
    logprobs: list[float] = []
    pending = 0  # tokens not yet reported in an event
    finish: FinishReason = "length"
    stop_reason: str | int | None = None

    t0 = time.perf_counter()
    t_first = t_last = t0
    tokens = source.tokens(prompt, params, max_new)
    try:
        for tok in tokens:
            t_last = time.perf_counter()
            if not ids:
                t_first = t_last
            ids.append(tok.token_id)
            logprobs.append(tok.logprob)
            pending += 1
            if tok.token_id in stop_ids:
                finish, stop_reason = "stop", tok.token_id
                text += detok.flush()
                break
            text += detok.push(tok.token_id)
            safe = len(text)
            if stops:
                hit = _find_stop(text, stops, emitted)
                if hit is not None:
                    text = text[: hit[0]]
                    finish, stop_reason = "stop", hit[1]
                    break
                safe -= _held_back(text, stops)
            if len(ids) == max_new:
                break  # the final event reports this token
            yield StreamEvent(
                text=text[emitted:safe],
                token_ids=tuple(ids[-pending:]),
                logprobs=tuple(logprobs[-pending:]) if opts.logprobs else None,
            )
            emitted, pending = safe, 0
        if finish == "length":
            text += detok.flush()
            if stops and (hit := _find_stop(text, stops, emitted)) is not None:
                text = text[: hit[0]]
                finish, stop_reason = "stop", hit[1]
    finally:
        close = getattr(tokens, "close", None)
        if close is not None:
            close()

    timing = Timing(
        prompt_tokens=len(prompt),
        completion_tokens=len(ids),
        time_to_first_token_s=t_first - t0,
        total_s=t_last - t0,
    )
    result = GenerationResult(
        text=text,
        token_ids=tuple(ids),
        finish_reason=finish,
        prompt_token_ids=prompt,
        seed=opts.seed,
        timing=timing,
        logprobs=tuple(logprobs) if opts.logprobs else None,
        stop_reason=stop_reason,
    )
    yield StreamEvent(
        text=text[emitted:],
        token_ids=tuple(ids[len(ids) - pending :]),
        logprobs=tuple(logprobs[len(ids) - pending :]) if opts.logprobs else None,
        finish_reason=finish,
        result=result,
    )


class SwarmClient:
    """Generate text with a backend (today: the in-process ``LocalBackend``)."""

    def __init__(
        self,
        backend: TokenSource,
        tokenizer: Tokenizer,
        *,
        defaults: SamplingOptions | None = None,
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.defaults = defaults or SamplingOptions()

    @classmethod
    def local(
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        defaults: SamplingOptions | None = None,
    ) -> SwarmClient:
        """A client running ``model`` (path, known name, or None for the default) in-process."""
        from swarm_client.local import LocalBackend

        backend = LocalBackend.load(model, dtype=dtype, device=device)
        return cls(backend, load_tokenizer(backend.source), defaults=defaults)

    # -- requests -----------------------------------------------------------------------

    def options(self, options: SamplingOptions | None = None, **overrides: Any) -> SamplingOptions:
        return (options or self.defaults).merged(**overrides)

    def encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def stream(self, prompt: Prompt, options: SamplingOptions | None = None, **overrides: Any) -> Iterator[StreamEvent]:
        """Stream a completion of ``prompt`` (text or token ids)."""
        return run_stream(self.backend, self.tokenizer, self.encode(prompt), self.options(options, **overrides))

    def generate(self, prompt: Prompt, options: SamplingOptions | None = None, **overrides: Any) -> GenerationResult:
        return _last(self.stream(prompt, options, **overrides))

    def stream_chat(
        self, messages: Messages, options: SamplingOptions | None = None, **overrides: Any
    ) -> Iterator[StreamEvent]:
        """Stream the assistant's reply to ``messages`` (rendered with the model's chat template)."""
        ids = self.tokenizer.apply_chat(messages)
        return run_stream(self.backend, self.tokenizer, ids, self.options(options, **overrides))

    def chat(self, messages: Messages, options: SamplingOptions | None = None, **overrides: Any) -> GenerationResult:
        return _last(self.stream_chat(messages, options, **overrides))

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> SwarmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _last(events: Iterator[StreamEvent]) -> GenerationResult:
    for event in events:
        if event.result is not None:
            return event.result
    raise AssertionError("a generation stream ended without a result")


_END = object()


class AsyncSwarmClient:
    """The asyncio face of ``SwarmClient``: the blocking work runs in worker threads."""

    def __init__(self, client: SwarmClient) -> None:
        self.sync = client

    @classmethod
    async def local(cls, model: str | os.PathLike[str] | None = None, **kwargs: Any) -> AsyncSwarmClient:
        return cls(await asyncio.to_thread(SwarmClient.local, model, **kwargs))

    async def generate(self, prompt: Prompt, options: SamplingOptions | None = None, **overrides: Any) -> GenerationResult:
        return await asyncio.to_thread(self.sync.generate, prompt, options, **overrides)

    async def chat(self, messages: Messages, options: SamplingOptions | None = None, **overrides: Any) -> GenerationResult:
        return await asyncio.to_thread(self.sync.chat, messages, options, **overrides)

    def stream(self, prompt: Prompt, options: SamplingOptions | None = None, **overrides: Any) -> AsyncIterator[StreamEvent]:
        return _in_thread(lambda: self.sync.stream(prompt, options, **overrides))

    def stream_chat(
        self, messages: Messages, options: SamplingOptions | None = None, **overrides: Any
    ) -> AsyncIterator[StreamEvent]:
        return _in_thread(lambda: self.sync.stream_chat(messages, options, **overrides))

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncSwarmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _in_thread(make: Any) -> AsyncIterator[StreamEvent]:
    """Run a blocking event iterator in a thread and hand its events to the loop.

    Leaving the ``async for`` early (or cancelling) stops the worker at its next
    token and closes the underlying stream, which frees the backend's session.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    cancelled = threading.Event()

    def work() -> None:
        events: Iterator[StreamEvent] | None = None
        try:
            events = make()
            for event in events:
                if cancelled.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, event)
        except BaseException as exc:  # handed to the consumer, re-raised there
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
            loop.call_soon_threadsafe(queue.put_nowait, _END)

    worker = loop.run_in_executor(None, work)
    try:
        while True:
            item = await queue.get()
            if item is _END:
                break
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, StreamEvent)
            yield item
    finally:
        cancelled.set()
        await asyncio.shield(worker)
