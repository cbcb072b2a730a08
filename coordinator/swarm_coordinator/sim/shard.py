"""Spreading the simulated nodes over several processes, and merging what they serve.

With ``SimConfig.procs = K > 1`` the harness hosts no nodes itself: K worker processes
(:mod:`.worker`) each run their share of the nodes (:func:`shares`), each node with its
own MQTT connection and Last Will exactly as in one process. Coverage stays ground truth
from the nodes: every process keeps, per model, a :class:`ServedLayers` (how many of its
live READY nodes serve each layer, updated on every change of a node's state, not by
polling) and sends its bit mask of served layers whenever it changes; the harness ORs the
latest mask of every process at each sample.

Invariants: a ``ServedLayers`` holds one entry per live node of its process (removed as
the node exits) and ``mask`` bit ``i`` is set exactly when ``counts[i] > 0``.
"""

from __future__ import annotations

from swarm_proto.presence import LayerRange

__all__ = ["ServedLayers", "full_mask", "shares", "span_mask"]


def shares(total: int, procs: int) -> list[int]:
    """``total`` nodes over ``procs`` processes, as evenly as possible (the first ones
    take the remainder): ``shares(10, 3) == [4, 3, 3]``."""
    if procs < 1:
        raise ValueError(f"procs must be >= 1, not {procs}")
    if total < 0:
        raise ValueError(f"total must be >= 0, not {total}")
    base, extra = divmod(total, procs)
    return [base + (i < extra) for i in range(procs)]


def full_mask(num_layers: int) -> int:
    return (1 << num_layers) - 1


def span_mask(span: LayerRange, num_layers: int) -> int:
    """Bits ``span.start .. min(span.end, num_layers) - 1``."""
    end = min(span.end, num_layers)
    return 0 if end <= span.start else full_mask(end) ^ full_mask(span.start)


class ServedLayers:
    """Per layer of one model: how many live READY nodes of this process serve it."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.counts = [0] * num_layers
        self.mask = 0  # bit i: layer i is served by at least one node
        self._spans: dict[str, LayerRange] = {}

    def set(self, node_id: str, span: LayerRange | None) -> bool:
        """Node ``node_id`` now serves ``span`` (``None``: nothing, or it left). Returns
        whether :attr:`mask` changed."""
        old = self._spans.pop(node_id, None)
        if old == span:
            if span is not None:
                self._spans[node_id] = span
            return False
        before = self.mask
        if old is not None:
            for layer in range(old.start, min(old.end, self.num_layers)):
                self.counts[layer] -= 1
                if self.counts[layer] == 0:
                    self.mask &= ~(1 << layer)
        if span is not None:
            self._spans[node_id] = span
            for layer in range(span.start, min(span.end, self.num_layers)):
                if self.counts[layer] == 0:
                    self.mask |= 1 << layer
                self.counts[layer] += 1
        return self.mask != before

    def __len__(self) -> int:
        return len(self._spans)
