"""Admission arithmetic: KV bytes per session, reservations, busy refusals and their hint."""

from __future__ import annotations

import pytest

from swarm_node.admission import Admission, kv_bytes, slot_length


def test_kv_bytes_follow_layers_kv_heads_and_the_slot_length() -> None:
    assert [slot_length(n) for n in (1, 64, 65, 200)] == [64, 64, 128, 256]
    # SmolLM2-135M in float32: 3 KV heads of 64 -> 1536 bytes per position and layer
    per = kv_bytes(1, 64, num_kv_heads=3, head_dim=64, element_size=4) // 64
    assert per == 1536
    assert kv_bytes(11, 100, num_kv_heads=3, head_dim=64, element_size=4) == 11 * 1536 * 128
    assert kv_bytes(11, 100, num_kv_heads=3, head_dim=64, element_size=2) == 11 * 768 * 128


def test_reservations_count_opening_sessions_and_free_on_release() -> None:
    adm = Admission(budget_bytes=1000, max_sessions=10)
    assert adm.refusal(400) is None
    adm.reserve("a", 400)
    assert adm.opening == 1 and adm.sessions == 1  # waiting for its cache, and counted
    adm.reserve("b", 400)
    adm.opened("a")
    assert adm.opening == 1 and adm.reserved == 800 and adm.free_bytes() == 200
    busy = adm.refusal(400)
    assert busy is not None and "1 open, 1 waiting for their KV cache" in busy.message and busy.retry_after_s == 1.0
    assert adm.refusal(200) is None and adm.refusal(100, parked_bytes=150) is not None  # parked caches count
    adm.release("b")
    assert adm.refusal(400) is None and adm.reserved == 400 and "b" not in adm
    with pytest.raises(ValueError, match="exceeds this node's KV budget"):
        adm.refusal(1001)  # can never fit: not busy


def test_session_count_is_a_cap_and_the_hint_follows_lifetimes() -> None:
    adm = Admission(budget_bytes=10**9, max_sessions=2)
    adm.reserve("a", 1)
    adm.reserve("b", 1)
    busy = adm.refusal(1)
    assert busy is not None and "at most 2" in busy.message
    adm.release("a", lifetime_s=8.0)  # one session lived 8 s; one is open -> one ends every ~8 s
    assert adm.retry_after_s() == Admission.MAX_RETRY_S  # capped at 5 s
    adm.reserve("c", 1)
    adm.release("c", lifetime_s=0.0)  # moving average: 0.8 * 8 + 0.2 * 0 = 6.4 s
    adm.max_sessions = 1000
    for i in range(31):
        adm.reserve(f"s{i}", 0)
    assert adm.retry_after_s() == pytest.approx(6.4 / 32)  # 32 open: one ends every 0.2 s
    for i in range(31):
        adm.release(f"s{i}")
    assert adm.retry_after_s() == Admission.MAX_RETRY_S
