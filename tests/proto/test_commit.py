"""Comparing commitments (swarm_proto.commit): honest rounding passes, lies do not."""

from __future__ import annotations

import random

import pytest

from swarm_proto import swarm_pb2
from swarm_proto.commit import Commit, Tolerance, compare_at, compare_row, from_proto, to_proto


def _commit(rows: list[list[float]], start_pos: int = 0, k: int = 4) -> Commit:
    """The top-k (by magnitude) commitment of dense rows, as a node would make it."""
    indices: list[int] = []
    values: list[float] = []
    for row in rows:
        top = sorted(range(len(row)), key=lambda i: -abs(row[i]))[:k]
        indices += top
        values += [row[i] for i in top]
    return Commit("n", "a:1", 0, 3, start_pos, k, tuple(indices), tuple(values))


def _rows(n: int, dim: int = 32, seed: int = 0) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.gauss(0, 1) * (40 if i == 3 else 1) for i in range(dim)] for _ in range(n)]


def test_identical_and_rounded_rows_agree() -> None:
    rows = _rows(20)
    rng = random.Random(1)
    rounded = [[v * (1 + rng.uniform(-0.02, 0.02)) for v in row] for row in rows]
    assert compare_at(_commit(rows), _commit(rows), range(20), Tolerance()) is None
    assert compare_at(_commit(rows), _commit(rounded), range(20), Tolerance()) is None


@pytest.mark.parametrize("scale", [1.3, 0.7, -1.0])
def test_a_scaled_row_is_caught_at_its_position(scale: float) -> None:
    rows = _rows(10)
    lied = [list(r) for r in rows]
    lied[6] = [v * scale for v in lied[6]]
    m = compare_at(_commit(lied), _commit(rows), range(10), Tolerance())
    assert m is not None and m.position == 6
    assert m.rel_err > Tolerance().max_rel_err
    assert "position 6" in m.describe(Tolerance())


def test_a_replaced_row_is_caught_by_its_indices() -> None:
    rows = _rows(4)
    lied = [list(r) for r in rows]
    lied[2] = _rows(1, seed=99)[0]
    m = compare_at(_commit(lied), _commit(rows), range(4), Tolerance())
    assert m is not None and m.position == 2


def test_positions_outside_either_commitment_are_skipped() -> None:
    a = _commit(_rows(4), start_pos=10)
    b = _commit([[v * 5 for v in r] for r in _rows(4)], start_pos=12)
    assert a.row(9) is None and a.row(14) is None
    assert compare_at(a, b, [0, 1, 9], Tolerance()) is None
    assert compare_at(a, b, [12], Tolerance()) is not None


def test_compare_row_edge_cases() -> None:
    assert compare_row(([1, 2], [1.0, 2.0]), ([3, 4], [1.0, 2.0])) == (1.0, 0.0)
    assert compare_row(([1], [0.0]), ([1], [0.0])) == (0.0, 1.0)


def test_proto_round_trip_and_bad_tolerance() -> None:
    c = _commit(_rows(3))
    msg = to_proto(c)
    assert isinstance(msg, swarm_pb2.Commitment)
    back = from_proto(swarm_pb2.Commitment.FromString(msg.SerializeToString()))
    assert back.indices == c.indices and back.positions == 3
    assert all(abs(x - y) < 1e-5 * max(1, abs(x)) for x, y in zip(back.values, c.values))
    with pytest.raises(ValueError):
        Tolerance(max_rel_err=0)
