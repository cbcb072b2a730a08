"""The coordinator's view of the swarm, as immutable data.

:class:`SwarmState` is built by the registry from MQTT messages and read by the pure
functions of :mod:`assignment` and :mod:`routing`. Nothing here does I/O or reads a
clock: times are passed in.

The wire payloads (:class:`NodeStatus`, :class:`NodeLoad`, :class:`LayerRange`) are
defined once in :mod:`swarm_proto.presence` and re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from swarm_proto.presence import Assign, LayerRange, NodeLoad, NodeState, NodeStatus

__all__ = [
    "Assignment",
    "LayerRange",
    "NodeLoad",
    "NodeState",
    "NodeStatus",
    "NodeView",
    "SwarmState",
    "runs",
]


def runs(flags: Iterable[bool]) -> tuple[LayerRange, ...]:
    """The maximal ranges of consecutive layers whose flag is true."""
    out: list[LayerRange] = []
    start: int | None = None
    n = 0
    for n, flag in enumerate(flags):
        if flag and start is None:
            start = n
        elif not flag and start is not None:
            out.append(LayerRange(start, n))
            start = None
    else:
        if start is not None:
            out.append(LayerRange(start, n + 1))
    return tuple(out)


@dataclass(frozen=True)
class NodeView:
    """Everything the coordinator knows about one node."""

    status: NodeStatus
    load: NodeLoad | None = None
    assign: Assign | None = None  # the coordinator's last word to it (retained on MQTT)
    last_seen: float = 0.0  # registry clock (monotonic seconds) of its last message

    @property
    def node_id(self) -> str:
        return self.status.node_id

    @property
    def address(self) -> str:
        return self.status.address

    @property
    def speed(self) -> float:
        return self.status.speed

    @property
    def assigned(self) -> LayerRange | None:
        return self.assign.layers if self.assign is not None else None

    @property
    def online(self) -> bool:
        return self.status.state is not NodeState.OFFLINE

    @property
    def serving(self) -> LayerRange | None:
        """The range it serves sessions on right now (``None`` unless ready)."""
        return self.status.hosted if self.status.state is NodeState.READY else None

    def capacity(self, bytes_per_layer: int) -> int:
        """How many layers fit in its memory budget."""
        per_layer = self.status.layer_bytes or bytes_per_layer  # the node's own format, else the swarm default
        return self.status.memory_budget // per_layer if per_layer > 0 else 0


@dataclass(frozen=True)
class Assignment:
    """Which contiguous range each node hosts; nodes not in it host nothing."""

    ranges: Mapping[str, LayerRange] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ranges", MappingProxyType(dict(sorted(self.ranges.items()))))

    def __getitem__(self, node_id: str) -> LayerRange:
        return self.ranges[node_id]

    def __contains__(self, node_id: object) -> bool:
        return node_id in self.ranges

    def __iter__(self) -> Iterator[str]:
        return iter(self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Assignment) and dict(self.ranges) == dict(other.ranges)

    def __hash__(self) -> int:
        return hash(tuple(self.ranges.items()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}: {v}" for k, v in self.ranges.items())
        return f"Assignment({{{inner}}})"

    def get(self, node_id: str) -> LayerRange | None:
        return self.ranges.get(node_id)

    def items(self) -> Iterable[tuple[str, LayerRange]]:
        return self.ranges.items()

    def with_range(self, node_id: str, layers: LayerRange | None) -> Assignment:
        ranges = dict(self.ranges)
        if layers is None:
            ranges.pop(node_id, None)
        else:
            ranges[node_id] = layers
        return Assignment(ranges)

    def without(self, node_ids: Iterable[str]) -> Assignment:
        drop = set(node_ids)
        return Assignment({k: v for k, v in self.ranges.items() if k not in drop})

    def coverage(self, num_layers: int) -> tuple[int, ...]:
        """How many nodes host each layer."""
        counts = [0] * num_layers
        for r in self.ranges.values():
            for layer in range(r.start, min(r.end, num_layers)):
                counts[layer] += 1
        return tuple(counts)

    def uncovered(self, num_layers: int) -> tuple[LayerRange, ...]:
        return runs(c == 0 for c in self.coverage(num_layers))

    def covers(self, num_layers: int) -> bool:
        return not self.uncovered(num_layers)

    def replicas(self, num_layers: int) -> int:
        """The smallest number of copies of any layer (0 when coverage is broken)."""
        return min(self.coverage(num_layers), default=0)

    def changes(self, other: Assignment) -> dict[str, LayerRange | None]:
        """What ``other`` sets differently: node id -> new range (``None``: host nothing)."""
        out: dict[str, LayerRange | None] = {}
        for node_id in sorted(set(self.ranges) | set(other.ranges)):
            if self.ranges.get(node_id) != other.ranges.get(node_id):
                out[node_id] = other.ranges.get(node_id)
        return out


@dataclass(frozen=True)
class SwarmState:
    """The swarm serving one model: its shape and the nodes known to the registry."""

    model: str
    num_layers: int
    bytes_per_layer: int
    nodes: Mapping[str, NodeView] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_layers <= 0 or self.bytes_per_layer <= 0:
            raise ValueError("num_layers and bytes_per_layer must be positive")
        object.__setattr__(self, "nodes", MappingProxyType(dict(sorted(self.nodes.items()))))

    @classmethod
    def of(
        cls, model: str, num_layers: int, bytes_per_layer: int, views: Iterable[NodeView] = ()
    ) -> SwarmState:
        return cls(model, num_layers, bytes_per_layer, {v.node_id: v for v in views})

    def node(self, node_id: str) -> NodeView | None:
        return self.nodes.get(node_id)

    def with_node(self, view: NodeView) -> SwarmState:
        nodes = dict(self.nodes)
        nodes[view.node_id] = view
        return replace(self, nodes=nodes)

    def without_node(self, node_id: str) -> SwarmState:
        return replace(self, nodes={k: v for k, v in self.nodes.items() if k != node_id})

    def online(self) -> tuple[NodeView, ...]:
        return tuple(v for v in self.nodes.values() if v.online)

    def serves_model(self, view: NodeView) -> bool:
        """A node that has not picked a model yet may be given this one."""
        return view.status.model in ("", self.model)

    def serving(self) -> Assignment:
        """What the nodes serve right now (ready, online, this model)."""
        return Assignment(
            {v.node_id: v.serving for v in self.nodes.values() if v.serving is not None and self.serves_model(v)}
        )

    def current_assignment(self) -> Assignment:
        """What online nodes were told to host, or what they host if never told."""
        ranges: dict[str, LayerRange] = {}
        for view in self.online():
            layers = view.assign.layers if view.assign is not None else view.status.hosted
            if layers is not None and self.serves_model(view):
                ranges[view.node_id] = layers
        return Assignment(ranges)
