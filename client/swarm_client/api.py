"""The client's public faces: ``SwarmClient`` (sync) and ``AsyncSwarmClient``.

Both drive a backend (``TokenSource``, or ``AsyncTokenSource`` for ``arun_stream``)
through a ``StreamAssembler``, which owns what every backend shares: seeding,
detokenizing, EOS / stop tokens / stop strings / max tokens, timing and the final
``GenerationResult``.

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
from dataclasses import replace
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from typing import Any, cast

from swarm_client.errors import InvalidRequestError
from swarm_client.failover import FailoverPolicy
from swarm_client.params import SamplingOptions
from swarm_client.speculation import DEFAULT_K
from swarm_client.tokenizer import Tokenizer, load_tokenizer
from swarm_client.verify import VerifyPolicy
from swarm_client.types import (
    AsyncTokenSource,
    FinishReason,
    GenerationResult,
    SampledToken,
    StreamEvent,
    Timing,
    TokenSource,
)

__all__ = ["SwarmClient", "AsyncSwarmClient", "StreamAssembler", "run_stream", "arun_stream", "Prompt", "Messages"]

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


class StreamAssembler:
    """The backend-neutral half of one generation, fed one sampled token at a time.

    It fixes the seed and the per-step ``SamplingParams``, detokenizes, applies
    EOS / stop tokens / stop strings / max tokens, holds back text that could be
    the start of a stop string, and times the run. A driver loop (``run_stream``,
    ``arun_stream``, or a remote client's own) asks the backend for
    ``max_new_tokens`` tokens with ``params``, hands each to ``push()`` until it
    returns None, closes the backend's stream, and ends with ``finish()``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int],
        options: SamplingOptions,
        *,
        max_context: int,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        self.prompt = tuple(int(t) for t in prompt_ids)
        if not self.prompt:
            raise InvalidRequestError("the prompt is empty")
        room = max_context - len(self.prompt)
        if room < 1:
            raise InvalidRequestError(f"the prompt has {len(self.prompt)} tokens; the model's context holds {max_context}")
        self.options = options.with_seed()
        self.params = self.options.to_sampling_params()
        self.max_new_tokens = min(self.options.max_tokens, room)
        self.stop_token_ids = frozenset(self.options.stop_token_ids) | (
            frozenset() if self.options.ignore_eos else frozenset(eos_token_ids)
        )
        self._detok = tokenizer.detokenizer(self.prompt)
        self._text = ""  # decoded so far (cut at a stop string once one matches)
        self._emitted = 0  # how much of the text the events have carried
        self._ids: list[int] = []
        self._logprobs: list[float] = []
        self._pending = 0  # tokens not yet reported in an event
        self._finish: FinishReason | None = None
        self._stop_reason: str | int | None = None
        self._checked = 0  # positions verified by spot checks (the backend's count)
        self._t0 = self._t_first = self._t_last = time.perf_counter()

    @property
    def seed(self) -> int:
        assert self.options.seed is not None
        return self.options.seed

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Every token pushed so far (the history to replay after a failure is
        ``prompt + token_ids``)."""
        return tuple(self._ids)

    @property
    def done(self) -> bool:
        return self._finish is not None

    def push(self, token: SampledToken) -> StreamEvent | None:
        """Take the next sampled token. Returns the event to emit, or None once the
        generation is over (this token included): stop pulling and call ``finish()``."""
        if self._finish is not None:
            raise RuntimeError("push() after the generation finished")
        self._t_last = time.perf_counter()
        if not self._ids:
            self._t_first = self._t_last
        self._ids.append(int(token.token_id))
        self._logprobs.append(float(token.logprob))
        self._checked = max(self._checked, token.checked)
        self._pending += 1
        if token.token_id in self.stop_token_ids:
            self._end("stop", int(token.token_id))
            return None
        self._text += self._detok.push(token.token_id)
        safe = len(self._text)
        stops = self.options.stop
        if stops:
            hit = _find_stop(self._text, stops, self._emitted)
            if hit is not None:
                self._text = self._text[: hit[0]]
                self._finish, self._stop_reason = "stop", hit[1]
                return None
            safe -= _held_back(self._text, stops)
        if len(self._ids) >= self.max_new_tokens:
            self._end("length", None)
            return None
        event = self._event(self._text[self._emitted : safe])
        self._emitted = safe
        return event

    def finish(self) -> StreamEvent:
        """The last event, with the ``GenerationResult``. A backend that ran out of
        tokens before any stop condition counts as "length"."""
        if self._finish is None:
            self._end("length", None)
        assert self._finish is not None
        timing = Timing(
            prompt_tokens=len(self.prompt),
            completion_tokens=len(self._ids),
            time_to_first_token_s=self._t_first - self._t0,
            total_s=self._t_last - self._t0,
        )
        result = GenerationResult(
            text=self._text,
            token_ids=tuple(self._ids),
            finish_reason=self._finish,
            prompt_token_ids=self.prompt,
            seed=self.seed,
            timing=timing,
            logprobs=tuple(self._logprobs) if self.options.logprobs else None,
            stop_reason=self._stop_reason,
            checked_steps=self._checked,
        )
        event = self._event(self._text[self._emitted :])
        self._emitted = len(self._text)
        return StreamEvent(event.text, event.token_ids, event.logprobs, finish_reason=self._finish, result=result)

    def _end(self, reason: FinishReason, stop_token: int | None) -> None:
        # Text held back for a possible stop string or an incomplete character is
        # final now; a stop string may still complete inside it.
        self._text += self._detok.flush()
        self._finish, self._stop_reason = reason, stop_token
        stops = self.options.stop
        if stops and (hit := _find_stop(self._text, stops, self._emitted)) is not None:
            self._text = self._text[: hit[0]]
            self._finish, self._stop_reason = "stop", hit[1]

    def _event(self, text: str) -> StreamEvent:
        n = self._pending
        self._pending = 0
        ids = tuple(self._ids[len(self._ids) - n :])
        lps = tuple(self._logprobs[len(self._ids) - n :]) if self.options.logprobs else None
        return StreamEvent(text=text, token_ids=ids, logprobs=lps)


def run_stream(
    source: TokenSource,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    options: SamplingOptions,
) -> Generator[StreamEvent, None, None]:
    """Generate from ``prompt_ids`` with ``source``; yield one event per token and a
    final event that carries the ``GenerationResult``."""
    asm = StreamAssembler(
        tokenizer, prompt_ids, options, max_context=source.max_context, eos_token_ids=source.eos_token_ids
    )
    tokens = source.tokens(asm.prompt, asm.params, asm.max_new_tokens)
    try:
        for tok in tokens:
            event = asm.push(tok)
            if event is None:
                break
            yield event
    finally:
        tokens.close()
    yield asm.finish()


async def arun_stream(
    source: AsyncTokenSource,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    options: SamplingOptions,
) -> AsyncGenerator[StreamEvent, None]:
    """``run_stream`` for a backend whose ``tokens()`` is an async iterator."""
    asm = StreamAssembler(
        tokenizer, prompt_ids, options, max_context=source.max_context, eos_token_ids=source.eos_token_ids
    )
    tokens = source.tokens(asm.prompt, asm.params, asm.max_new_tokens)
    try:
        async for tok in tokens:
            event = asm.push(tok)
            if event is None:
                break
            yield event
    finally:
        await tokens.aclose()
    yield asm.finish()


class _Base:
    def __init__(self, tokenizer: Tokenizer, defaults: SamplingOptions | None) -> None:
        self.tokenizer = tokenizer
        self.defaults = defaults or SamplingOptions()

    def options(self, options: SamplingOptions | None = None, **overrides: Any) -> SamplingOptions:
        """``options`` (or the client's defaults) with keyword overrides applied."""
        return (options or self.defaults).merged(**overrides)

    def encode(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def encode_chat(self, messages: Messages) -> list[int]:
        return self.tokenizer.apply_chat(messages)


class SwarmClient(_Base):
    """Generate text with a backend: in-process (``local()``) or over the swarm (``remote()``)."""

    def __init__(self, backend: TokenSource, tokenizer: Tokenizer, *, defaults: SamplingOptions | None = None) -> None:
        super().__init__(tokenizer, defaults)
        self.backend = backend

    @classmethod
    def local(
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        defaults: SamplingOptions | None = None,
        quantize: str = "auto",
    ) -> SwarmClient:
        """A client running ``model`` (path, known name, or None for the default) in-process
        (``dtype``/``quantize`` as for `LocalBackend.load`)."""
        from swarm_client.local import LocalBackend

        backend = LocalBackend.load(model, dtype=dtype, device=device, quantize=quantize)
        return cls(backend, load_tokenizer(backend.source), defaults=defaults)

    @classmethod
    def remote(
        cls,
        *,
        coordinator: str | None = None,
        route: str | None = None,
        model: str | os.PathLike[str] | None = None,
        defaults: SamplingOptions | None = None,
        token: str | None = None,
        timeout: float | None = None,
        policy: FailoverPolicy | None = None,
        speculate: int = 0,
        draft: str | os.PathLike[str] | None = None,
        verify: VerifyPolicy | None = None,
    ) -> SwarmClient:
        """The blocking face of ``AsyncSwarmClient.remote`` (same arguments)."""
        from swarm_client.blocking import BlockingTokenSource

        backend, tokenizer = _remote_backend(coordinator, route, model, token, timeout, policy, speculate, draft, verify)
        return cls(BlockingTokenSource(backend), tokenizer, defaults=defaults)

    def stream(self, prompt: Prompt, options: SamplingOptions | None = None, **overrides: Any) -> Iterator[StreamEvent]:
        """Stream a completion of ``prompt`` (text or token ids)."""
        return run_stream(self.backend, self.tokenizer, self.encode(prompt), self.options(options, **overrides))

    def generate(self, prompt: Prompt, options: SamplingOptions | None = None, **overrides: Any) -> GenerationResult:
        return _last(self.stream(prompt, options, **overrides))

    def stream_chat(
        self, messages: Messages, options: SamplingOptions | None = None, **overrides: Any
    ) -> Iterator[StreamEvent]:
        """Stream the assistant's reply to ``messages`` (rendered with the model's chat template)."""
        return run_stream(self.backend, self.tokenizer, self.encode_chat(messages), self.options(options, **overrides))

    def chat(self, messages: Messages, options: SamplingOptions | None = None, **overrides: Any) -> GenerationResult:
        return _last(self.stream_chat(messages, options, **overrides))

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> SwarmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remote_backend(
    coordinator: str | None,
    route: str | None,
    model: str | os.PathLike[str] | None,
    token: str | None,
    timeout: float | None = None,
    policy: FailoverPolicy | None = None,
    speculate: int = 0,
    draft: str | os.PathLike[str] | None = None,
    verify: VerifyPolicy | None = None,
) -> tuple[AsyncTokenSource, Tokenizer]:
    from swarm_client.routed import CoordinatorRoutes, RoutedBackend, RouteProvider, StaticRoutes, parse_route
    from swarm_proto.model_args import read_args
    from swarm_proto.store import resolve_model

    if (coordinator is None) == (route is None):
        raise InvalidRequestError("give exactly one of coordinator and route")
    path = resolve_model(None if model is None else os.fspath(model))
    args = read_args(path)
    token = os.environ.get("SWARM_TOKEN", "") if token is None else token
    routes: RouteProvider = (
        CoordinatorRoutes(coordinator, token=token) if coordinator else StaticRoutes(parse_route(route or ""), token=token)
    )
    policy = policy or FailoverPolicy()
    if timeout is not None:
        policy = replace(policy, busy_wait=timeout)
    speculation = None
    if speculate < 0:
        raise InvalidRequestError(f"speculate must be >= 0 (drafts per step at most), got {speculate}")
    if draft is not None and not speculate:
        speculate = DEFAULT_K
    if speculate:
        from swarm_client.speculation import DraftModel, PromptLookup, Speculation

        drafter = DraftModel.load(draft, vocab_size=args.vocab_size) if draft is not None else PromptLookup()
        speculation = Speculation(max_draft=speculate, drafter=drafter)
    backend = RoutedBackend(
        routes,
        max_context=args.max_position_embeddings,
        eos_token_ids=args.eos_token_ids,
        token=token,
        policy=policy,
        speculation=speculation,
        verify=verify,
    )
    return backend, load_tokenizer(path)


def _last(events: Iterator[StreamEvent]) -> GenerationResult:
    for event in events:
        if event.result is not None:
            return event.result
    raise AssertionError("a generation stream ended without a result")


class AsyncSwarmClient(_Base):
    """The asyncio face: an ``AsyncTokenSource`` runs on the event loop; a blocking
    ``TokenSource`` (such as ``LocalBackend``) runs in worker threads."""

    def __init__(
        self,
        backend: TokenSource | AsyncTokenSource,
        tokenizer: Tokenizer,
        *,
        defaults: SamplingOptions | None = None,
    ) -> None:
        super().__init__(tokenizer, defaults)
        self.backend = backend

    @classmethod
    def from_client(cls, client: SwarmClient) -> AsyncSwarmClient:
        return cls(client.backend, client.tokenizer, defaults=client.defaults)

    @classmethod
    async def local(cls, model: str | os.PathLike[str] | None = None, **kwargs: Any) -> AsyncSwarmClient:
        return cls.from_client(await asyncio.to_thread(SwarmClient.local, model, **kwargs))

    @classmethod
    def remote(
        cls,
        *,
        coordinator: str | None = None,
        route: str | None = None,
        model: str | os.PathLike[str] | None = None,
        defaults: SamplingOptions | None = None,
        token: str | None = None,
        timeout: float | None = None,
        policy: FailoverPolicy | None = None,
        speculate: int = 0,
        draft: str | os.PathLike[str] | None = None,
        verify: VerifyPolicy | None = None,
    ) -> AsyncSwarmClient:
        """A client generating over the swarm: routes from the coordinator at
        ``HOST:PORT`` (with failover), or along a fixed ``route``
        (``"host:port,host:port"`` or ``"host:port=0:10,host:port=10:30"``). ``model``
        (path or name, default: the default model) gives the tokenizer and the model's
        limits; no weights are read. ``token``: the swarm token the coordinator and
        the nodes ask for (default: ``$SWARM_TOKEN``, none when unset). ``timeout``:
        how long a generation waits in all for room while the swarm is busy (full, not
        failing) before it raises ``BusyError`` (default: 300 s). ``policy``: failover and
        busy-wait settings (``FailoverPolicy``; ``timeout`` overrides its ``busy_wait``).
        ``speculate``: speculative decoding with at most this many drafted tokens a step
        (0, the default: off; the tokens are the same either way, docs/speculation.md);
        drafts come from prompt lookup, or from ``draft``, a small local model sharing the
        model's tokenizer (which turns speculation on with ``DEFAULT_K`` drafts if
        ``speculate`` is 0). ``verify``: spot checks of the nodes' results (``VerifyPolicy``, default: a check
        on 5% of steps; ``rate=0`` turns them off; docs/verification.md)."""
        backend, tokenizer = _remote_backend(coordinator, route, model, token, timeout, policy, speculate, draft, verify)
        return cls(backend, tokenizer, defaults=defaults)

    def _stream_ids(self, ids: list[int], opts: SamplingOptions) -> AsyncGenerator[StreamEvent, None]:
        if self.backend.is_async:
            return arun_stream(cast(AsyncTokenSource, self.backend), self.tokenizer, ids, opts)
        backend = cast(TokenSource, self.backend)
        return _in_thread(lambda: run_stream(backend, self.tokenizer, ids, opts))

    def stream(
        self, prompt: Prompt, options: SamplingOptions | None = None, **overrides: Any
    ) -> AsyncGenerator[StreamEvent, None]:
        return self._stream_ids(self.encode(prompt), self.options(options, **overrides))

    def stream_chat(
        self, messages: Messages, options: SamplingOptions | None = None, **overrides: Any
    ) -> AsyncGenerator[StreamEvent, None]:
        return self._stream_ids(self.encode_chat(messages), self.options(options, **overrides))

    async def generate(self, prompt: Prompt, options: SamplingOptions | None = None, **overrides: Any) -> GenerationResult:
        return await _alast(self.stream(prompt, options, **overrides))

    async def chat(self, messages: Messages, options: SamplingOptions | None = None, **overrides: Any) -> GenerationResult:
        return await _alast(self.stream_chat(messages, options, **overrides))

    async def close(self) -> None:
        if self.backend.is_async:
            await cast(AsyncTokenSource, self.backend).aclose()
        else:
            await asyncio.to_thread(cast(TokenSource, self.backend).close)

    async def __aenter__(self) -> AsyncSwarmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _alast(events: AsyncIterator[StreamEvent]) -> GenerationResult:
    async for event in events:
        if event.result is not None:
            return event.result
    raise AssertionError("a generation stream ended without a result")


_END = object()


async def _in_thread(make: Callable[[], Generator[StreamEvent, None, None]]) -> AsyncGenerator[StreamEvent, None]:
    """Run a blocking event iterator in a thread and hand its events to the loop.

    Leaving the ``async for`` early (or cancelling) stops the worker at its next
    token and closes the underlying stream, which frees the backend's session.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue()
    cancelled = threading.Event()

    def work() -> None:
        events: Generator[StreamEvent, None, None] | None = None
        try:
            events = make()
            for event in events:
                if cancelled.is_set():
                    break
                loop.call_soon_threadsafe(queue.put_nowait, event)
        except BaseException as exc:  # handed to the consumer, re-raised there
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            if events is not None:
                events.close()
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
