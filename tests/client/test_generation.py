"""The generation driver and the client API over a scripted backend and a byte tokenizer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
from helpers import ByteHF

from swarm_client import (
    AsyncSwarmClient,
    GenerationResult,
    InvalidRequestError,
    SamplingOptions,
    SwarmClient,
    TokenSource,
)
from swarm_client.api import StreamAssembler, _held_back, arun_stream, run_stream
from swarm_client.tokenizer import Tokenizer
from swarm_client.types import AsyncTokenSource, SampledToken, StreamEvent
from swarm_proto.wire import SamplingParams

BOS, EOS, OFFSET = 1, 2, 3


def tok() -> Tokenizer:
    return Tokenizer(ByteHF(), source="bytes")  # type: ignore[arg-type]


class ScriptedSource:
    """A backend that 'samples' a fixed script, recording what it was asked."""

    def __init__(
        self, script: Sequence[int], max_context: int = 4096, eos: tuple[int, ...] = (EOS,), delay: float = 0.0
    ) -> None:
        self.script = list(script)
        self.delay = delay
        self._max_context = max_context
        self._eos = eos
        self.calls: list[tuple[tuple[int, ...], SamplingParams, int]] = []
        self.closed = 0
        self.yielded = 0

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    def tokens(self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int) -> Iterator[SampledToken]:
        self.calls.append((tuple(prompt_ids), params, max_new_tokens))
        try:
            for t in self.script[:max_new_tokens]:
                self.yielded += 1
                time.sleep(self.delay)
                yield SampledToken(t, -0.5)
        finally:
            self.closed += 1


def text_ids(text: str) -> list[int]:
    return ByteHF().encode(text)


def run(script: Sequence[int], prompt: str = "hi", **opts: Any) -> tuple[list[StreamEvent], ScriptedSource]:
    src = ScriptedSource(script)
    events = list(run_stream(src, tok(), text_ids(prompt), SamplingOptions(**opts)))
    return events, src


def final(events: list[StreamEvent]) -> GenerationResult:
    assert events[-1].result is not None
    assert all(e.result is None for e in events[:-1])
    return events[-1].result


def test_scripted_source_is_a_token_source() -> None:
    assert isinstance(ScriptedSource([]), TokenSource)


def test_eos_stops_and_is_kept_in_ids_not_text() -> None:
    events, src = run(text_ids("Paris.") + [EOS] + text_ids("more"))
    r = final(events)
    assert r.text == "Paris." and r.finish_reason == "stop" and r.stop_reason == EOS
    assert r.token_ids == tuple(text_ids("Paris.") + [EOS])
    assert "".join(e.text for e in events) == "Paris."
    assert sum(len(e.token_ids) for e in events) == len(r.token_ids)
    assert src.closed == 1 and src.yielded == 7  # stopped pulling at EOS


def test_max_tokens() -> None:
    events, src = run(text_ids("abcdefghij"), max_tokens=4)
    r = final(events)
    assert r.text == "abcd" and r.finish_reason == "length" and len(r.token_ids) == 4
    assert src.calls[0][2] == 4
    assert "".join(e.text for e in events) == "abcd"


def test_ignore_eos_and_stop_token_ids() -> None:
    events, _ = run(text_ids("ab") + [EOS] + text_ids("cd"), ignore_eos=True, max_tokens=5)
    assert final(events).text == "abcd" and final(events).finish_reason == "length"
    events, _ = run(text_ids("abXcd"), stop_token_ids=[ord("X") + OFFSET])
    r = final(events)
    assert r.text == "ab" and r.finish_reason == "stop" and r.stop_reason == ord("X") + OFFSET


@pytest.mark.parametrize(
    ("stops", "expected", "which"),
    [
        (["\n\n"], "Paris is nice.", "\n\n"),
        (["nice", "is"], "Par", "is"),  # the earliest match wins
        ([". The"], "Paris is nice.\n\nThe end", None),  # never matches
        (["end"], "Paris is nice.\n\nThe ", "end"),
    ],
)
def test_stop_strings(stops: list[str], expected: str, which: str | None) -> None:
    body = "Paris is nice.\n\nThe end"
    events, src = run(text_ids(body) + [EOS], stop=stops)
    r = final(events)
    assert r.text == expected
    assert "".join(e.text for e in events) == expected
    assert r.stop_reason == (which if which is not None else EOS)
    assert r.finish_reason == "stop"
    if which is not None:  # stopped as soon as the stop string was complete
        assert src.yielded == len(text_ids(body[: body.index(which) + len(which)]))


def test_stop_string_prefix_is_held_back_until_resolved() -> None:
    events, _ = run(text_ids("ab##c##d###"), stop=["###"])
    seen = ""
    for e in events:
        seen += e.text
        assert "###" not in seen
    assert final(events).text == "ab##c##d"
    # "##" was held back after "ab" and released once "c" showed it was no stop
    assert any(e.text.startswith("##c") for e in events)


def test_stop_string_at_max_tokens() -> None:
    events, _ = run(text_ids("abc###"), stop=["###"], max_tokens=6)
    assert final(events).text == "abc" and final(events).finish_reason == "stop"
    events, _ = run(text_ids("abc##"), stop=["###"], max_tokens=5)
    assert final(events).text == "abc##" and final(events).finish_reason == "length"


def test_held_back() -> None:
    assert _held_back("abc", ["cd"]) == 1
    assert _held_back("abc", ["bcd", "c"]) == 2
    assert _held_back("abc", ["xyz"]) == 0
    assert _held_back("", ["ab"]) == 0


def test_multibyte_text_streams_whole_characters() -> None:
    body = "héllo 日本 🎉!"
    events, _ = run(text_ids(body) + [EOS])
    assert final(events).text == body
    assert all("\ufffd" not in e.text for e in events)
    assert "".join(e.text for e in events) == body


def test_incomplete_character_at_the_end_is_flushed() -> None:
    events, _ = run(text_ids("ok🎉")[:-1], max_tokens=5)
    r = final(events)
    assert r.text == "ok\ufffd" and "".join(e.text for e in events) == r.text


def test_one_event_per_token_and_logprobs() -> None:
    events, _ = run(text_ids("abc") + [EOS], logprobs=True)
    assert [e.token_ids for e in events] == [(ord("a") + 3,), (ord("b") + 3,), (ord("c") + 3,), (EOS,)]
    assert final(events).logprobs == (-0.5,) * 4
    events, _ = run(text_ids("abc") + [EOS])
    assert final(events).logprobs is None and events[0].logprobs is None


def test_seed_is_fixed_and_reported() -> None:
    events, src = run(text_ids("a"), seed=1234, temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.1)
    assert final(events).seed == 1234
    assert src.calls[0][1] == SamplingParams(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.1, seed=1234)
    events, src = run(text_ids("a"))
    assert src.calls[0][1].seed == final(events).seed


def test_timing() -> None:
    events, _ = run(text_ids("abcdef"), prompt="hello")
    t = final(events).timing
    assert t.prompt_tokens == 5 and t.completion_tokens == 6
    assert 0 <= t.time_to_first_token_s <= t.total_s
    assert t.tokens_per_s >= 0


def test_prompt_checks_and_context_limit() -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        list(run_stream(ScriptedSource([]), tok(), [], SamplingOptions()))
    with pytest.raises(InvalidRequestError, match="context"):
        list(run_stream(ScriptedSource([], max_context=4), tok(), [5, 6, 7, 8], SamplingOptions()))
    src = ScriptedSource(text_ids("abcdef"), max_context=6)
    r = final(list(run_stream(src, tok(), [5, 6, 7, 8], SamplingOptions(max_tokens=100))))
    assert src.calls[0][2] == 2 and r.finish_reason == "length" and r.text == "ab"


def test_closing_the_stream_early_closes_the_source() -> None:
    src = ScriptedSource(text_ids("abcdefgh"))
    events = run_stream(src, tok(), [5], SamplingOptions())
    next(events)
    next(events)
    events.close()  # type: ignore[attr-defined]
    assert src.closed == 1 and src.yielded == 2


# -- SwarmClient ------------------------------------------------------------------------


def client(script: Sequence[int], **defaults: Any) -> tuple[SwarmClient, ScriptedSource]:
    src = ScriptedSource(script)
    return SwarmClient(src, tok(), defaults=SamplingOptions(**defaults)), src


def test_client_generate_stream_chat() -> None:
    c, src = client(text_ids("Paris.") + [EOS], max_tokens=50)
    r = c.generate("The capital of France is")
    assert r.text == "Paris." and src.calls[-1][0] == tuple(text_ids("The capital of France is"))
    assert src.calls[-1][2] == 50
    assert "".join(e.text for e in c.stream([5, 6], max_tokens=3)) == "Par"
    r = c.chat([{"role": "user", "content": "hi"}], stop=["."])
    assert r.text == "Paris" and src.calls[-1][0] == tuple(text_ids("<user>hi<assistant>"))
    with pytest.raises(InvalidRequestError, match="unknown"):
        c.generate("x", temprature=0.5)


def test_client_options_override_defaults() -> None:
    c, src = client(text_ids("abc"), temperature=0.5, seed=3)
    c.generate("x", top_k=4)
    assert src.calls[-1][1] == SamplingParams(temperature=0.5, top_k=4, seed=3)
    c.generate("x", SamplingOptions(seed=9))
    assert src.calls[-1][1] == SamplingParams(seed=9)


async def test_async_client() -> None:
    c, src = client(text_ids("Paris is big.") + [EOS])
    ac = AsyncSwarmClient.from_client(c)
    async with ac:
        r = await ac.generate("x")
        assert r.text == "Paris is big."
        pieces = [e.text async for e in ac.stream("x", stop=[" big"])]
        assert "".join(pieces) == "Paris is"
        r = await ac.chat([{"role": "user", "content": "q"}], max_tokens=2)
        assert r.text == "Pa"


async def test_async_stream_early_exit_closes_the_source() -> None:
    src = ScriptedSource(text_ids("abcdefghijklmnop"), delay=0.02)
    ac = AsyncSwarmClient(src, tok())
    stream = ac.stream("x")
    async for e in stream:
        if e.text == "b":
            break
    await stream.aclose()  # type: ignore[attr-defined]
    assert src.closed == 1 and src.yielded < 16


async def test_async_stream_raises_errors() -> None:
    c, _ = client(text_ids("abc"))
    with pytest.raises(InvalidRequestError):
        async for _ in AsyncSwarmClient.from_client(c).stream([]):
            pass
    await asyncio.sleep(0)


class AsyncScriptedSource(ScriptedSource):
    async def tokens(  # type: ignore[override]
        self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int
    ) -> AsyncIterator[SampledToken]:
        self.calls.append((tuple(prompt_ids), params, max_new_tokens))
        try:
            for t in self.script[:max_new_tokens]:
                self.yielded += 1
                await asyncio.sleep(self.delay)
                yield SampledToken(t, -0.5)
        finally:
            self.closed += 1


async def test_async_backend_runs_on_the_loop() -> None:
    src = AsyncScriptedSource(text_ids("Paris is big.") + [EOS])
    assert isinstance(src, AsyncTokenSource)
    ac = AsyncSwarmClient(src, tok(), defaults=SamplingOptions(seed=5))
    assert ac._async
    r = await ac.generate("x")
    assert r.text == "Paris is big." and r.seed == 5 and src.closed == 1
    events = [e async for e in ac.stream("x", stop=[" is"])]
    assert "".join(e.text for e in events) == "Paris" and events[-1].finish_reason == "stop"
    assert src.closed == 2 and src.yielded == 14 + 8
    events = [e async for e in arun_stream(src, tok(), [5], SamplingOptions(max_tokens=3))]
    assert events[-1].result is not None and events[-1].result.text == "Par"


def test_assembler_directly() -> None:
    asm = StreamAssembler(tok(), [5, 6], SamplingOptions(stop=["c"], seed=1), max_context=100, eos_token_ids=[EOS])
    assert asm.max_new_tokens == 98 and asm.params.seed == 1 and asm.stop_token_ids == {EOS}
    assert asm.push(SampledToken(ord("a") + OFFSET, 0.0)) is not None
    assert asm.push(SampledToken(ord("c") + OFFSET, 0.0)) is None
    assert asm.done and asm.token_ids == (ord("a") + OFFSET, ord("c") + OFFSET)
    with pytest.raises(RuntimeError):
        asm.push(SampledToken(5, 0.0))
    last = asm.finish()
    assert last.result is not None and last.result.text == "a" and last.result.stop_reason == "c"
