"""A blocking face for asyncio backends: their coroutines run on a private event
loop in a daemon thread, so ``SwarmClient`` (sync) can drive the routed backend."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Coroutine, Generator, Sequence
from typing import Any, TypeVar

from swarm_client.types import AsyncTokenSource, SampledToken, TokenSource
from swarm_proto.wire import SamplingParams

T = TypeVar("T")


class BlockingTokenSource(TokenSource):
    """``TokenSource`` over an ``AsyncTokenSource``, for plain synchronous callers."""

    def __init__(self, source: AsyncTokenSource) -> None:
        self.source = source
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="swarm-client-loop", daemon=True)
        self._thread.start()

    @property
    def max_context(self) -> int:
        return self.source.max_context

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.source.eos_token_ids

    @property
    def failovers(self) -> int:
        return self.source.failovers

    def avoided_nodes(self) -> int:
        return self.source.avoided_nodes()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def tokens(
        self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int
    ) -> Generator[SampledToken, None, None]:
        agen: AsyncGenerator[SampledToken, None] = self.source.tokens(prompt_ids, params, max_new_tokens)

        async def next_token() -> SampledToken | None:
            try:
                return await agen.__anext__()
            except StopAsyncIteration:
                return None

        try:
            while (tok := self._run(next_token())) is not None:
                yield tok
        finally:
            self._run(agen.aclose())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self.source.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
