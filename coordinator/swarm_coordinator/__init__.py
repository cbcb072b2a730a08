"""llama-swarm coordinator: registry of nodes, layer assignment and routing.

The swarm's view is immutable data (:mod:`swarm_coordinator.state`); assignment and
routing are pure functions of it. The registry builds that view from MQTT presence
messages (:mod:`swarm_proto.presence`); the broker module runs an MQTT broker
in-process (amqtt) or as a mosquitto process; import those two modules explicitly.
"""

from __future__ import annotations

from swarm_coordinator.assignment import AssignmentPolicy, estimate_throughput, plan, propose
from swarm_coordinator.errors import BrokerError, CoordinatorError, CoverageError, NoRouteError
from swarm_coordinator.routing import RecentRoutes, RoutingPolicy, Span, find_route
from swarm_coordinator.state import Assignment, LayerRange, NodeView, SwarmState

__all__ = [
    "Assignment",
    "AssignmentPolicy",
    "BrokerError",
    "CoordinatorError",
    "CoverageError",
    "LayerRange",
    "NoRouteError",
    "NodeView",
    "RecentRoutes",
    "RoutingPolicy",
    "Span",
    "SwarmState",
    "estimate_throughput",
    "find_route",
    "plan",
    "propose",
]
