"""A blocking face for asyncio backends: their coroutines run on a private event
loop in a daemon thread, so ``SwarmClient`` (sync) can drive the routed backend."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from swarm_client.types import AsyncTokenSource, SampledToken
from swarm_proto.wire import SamplingParams

T = TypeVar("T")


class BlockingTokenSource:
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

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def tokens(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[SampledToken]:
        agen: AsyncIterator[SampledToken] = self.source.tokens(prompt_ids, params, max_new_tokens)

        async def next_token() -> SampledToken | None:
            try:
                return await agen.__anext__()
            except StopAsyncIteration:
                return None

        try:
            while (tok := self._run(next_token())) is not None:
                yield tok
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                self._run(aclose())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        aclose = getattr(self.source, "aclose", None)
        if aclose is not None:
            self._run(aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
