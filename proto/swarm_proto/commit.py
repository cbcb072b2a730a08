"""Commitments of a span's output and how two of them are compared (no torch).

A node commits to what its span produced for a step: per position, the ``k`` entries
of the output hidden state largest in magnitude (indices and values). A verifier that
recomputes the same span on the same inputs produces its own commitment; the two
agree when

- at least ``min_overlap`` of the ``k`` indices are the same (honest rounding may swap
  the k-th and (k+1)-th entries, never most of them), and
- on the shared indices, the values' L2 distance is at most ``max_rel_err`` of their
  L2 norm (one entry off by a rounding-sized amount is averaged, a whole row scaled is not).

The tolerance comes from measurement (docs/verification.md): honest nodes with
different dtypes, kernels and batch mixes stay far inside it; the test fault
injection's slight perturbation lies well outside.

Invariants: a ``Commit`` holds ``n * k`` indices and values for positions
``[start_pos, start_pos + n)``; ``compare`` never raises on a well-formed pair and
reports the first position that disagrees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from swarm_proto import swarm_pb2

__all__ = ["DEFAULT_K", "MAX_K", "Commit", "Mismatch", "Tolerance", "compare_at", "from_proto", "to_proto"]

DEFAULT_K = 8  # entries per position: 64 bytes on the wire
MAX_K = 64  # the most a node accepts to relay per position


@dataclass(frozen=True)
class Tolerance:
    max_rel_err: float = 0.15  # honest worst measured: 0.057 (bfloat16 vs float32 after 30 layers)
    min_overlap: float = 0.5

    def __post_init__(self) -> None:
        if not (0 < self.max_rel_err < 1) or not (0 < self.min_overlap <= 1):
            raise ValueError(f"bad tolerance {self}")


@dataclass(frozen=True)
class Commit:
    """One hop's commitment for positions ``[start_pos, start_pos + positions)``."""

    node_id: str
    address: str
    start: int
    end: int
    start_pos: int
    k: int
    indices: tuple[int, ...]
    values: tuple[float, ...]

    @property
    def positions(self) -> int:
        return len(self.indices) // self.k if self.k else 0

    def row(self, position: int) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
        """The entries committed for ``position`` (None when not covered)."""
        i = position - self.start_pos
        if not 0 <= i < self.positions:
            return None
        a, b = i * self.k, (i + 1) * self.k
        return self.indices[a:b], self.values[a:b]


@dataclass(frozen=True)
class Mismatch:
    position: int
    rel_err: float  # L2 distance of the shared entries relative to their L2 norm (1.0 when none are shared)
    overlap: float  # share of indices in common
    claimed: tuple[float, ...]
    recomputed: tuple[float, ...]

    def describe(self, tol: Tolerance) -> str:
        return (
            f"position {self.position}: top-k values differ by {self.rel_err:.3g} (tolerance {tol.max_rel_err:g}), "
            f"{self.overlap:.0%} of indices shared (at least {tol.min_overlap:.0%} expected)"
        )


def compare_row(
    a: tuple[Sequence[int], Sequence[float]], b: tuple[Sequence[int], Sequence[float]]
) -> tuple[float, float]:
    """(rel_err, overlap) of two rows of entries."""
    va = dict(zip(a[0], a[1]))
    vb = dict(zip(b[0], b[1]))
    shared = va.keys() & vb.keys()
    k = max(len(va), len(vb), 1)
    if not shared:
        return 1.0, 0.0
    diff = sum((va[i] - vb[i]) ** 2 for i in shared)
    scale = sum(max(abs(va[i]), abs(vb[i])) ** 2 for i in shared)
    err = (diff / scale) ** 0.5 if scale > 0 else 0.0
    return err, len(shared) / k


def compare_at(claimed: Commit, recomputed: Commit, positions: Sequence[int], tol: Tolerance) -> Mismatch | None:
    """The first of ``positions`` covered by both where the two disagree, or None."""
    for p in positions:
        a, b = claimed.row(p), recomputed.row(p)
        if a is None or b is None:
            continue
        err, overlap = compare_row(a, b)
        if err > tol.max_rel_err or overlap < tol.min_overlap:
            return Mismatch(p, err, overlap, tuple(a[1]), tuple(b[1]))
    return None


def from_proto(msg: swarm_pb2.Commitment) -> Commit:
    return Commit(msg.node_id, msg.address, msg.start, msg.end, msg.start_pos, msg.k, tuple(msg.indices), tuple(msg.values))


def to_proto(c: Commit) -> swarm_pb2.Commitment:
    return swarm_pb2.Commitment(
        node_id=c.node_id, address=c.address, start=c.start, end=c.end, start_pos=c.start_pos, k=c.k,
        indices=list(c.indices), values=list(c.values),
    )
