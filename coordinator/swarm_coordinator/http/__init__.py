"""The coordinator's HTTP port: OpenAI-compatible API, dashboard, Prometheus metrics.

``create_app(backend, registry_view, config)`` builds the ASGI app; ``HttpServer``
serves it with uvicorn inside a running event loop (:mod:`.serving`). See :mod:`.app`.
"""

from __future__ import annotations

from swarm_coordinator.http.app import Gateway, GatewayConfig, create_app, model_id_for
from swarm_coordinator.http.auth import ApiKeys, KeyLimits, RateLimiter
from swarm_coordinator.http.dashboard import StaticView, SwarmView
from swarm_coordinator.http.serving import HttpServer, ThreadedHttpServer

__all__ = [
    "ApiKeys",
    "Gateway",
    "GatewayConfig",
    "HttpServer",
    "KeyLimits",
    "RateLimiter",
    "StaticView",
    "SwarmView",
    "ThreadedHttpServer",
    "create_app",
    "model_id_for",
]
