"""The lifecycle of one coordinator process: broker, registry, planner, gRPC, HTTP.

``start()`` brings them up in that order, ``stop()`` takes them down in reverse::

    async with CoordinatorServer(config) as coordinator:
        print(coordinator.address, coordinator.broker_url)
        await coordinator.serve()          # until stop()

The HTTP port serves the ASGI app that ``http_app(coordinator)`` builds (the gateway
of :mod:`swarm_coordinator.http`), started after the gRPC service so the app can read
the swarm through :attr:`registry` (a ``SwarmView``: ``state`` and ``events``) and ask
:attr:`address` for routes like any client. Without ``http_app`` nothing listens on
the HTTP port.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc

from swarm_coordinator.assignment import AssignmentPolicy
from swarm_coordinator.broker import EmbeddedBroker
from swarm_coordinator.config import CoordinatorConfig
from swarm_coordinator.errors import BrokerError
from swarm_coordinator.lease import LeaseKeeper
from swarm_coordinator.planner import Planner, ReloadBudget
from swarm_coordinator.registry import Registry, RegistryConfig
from swarm_coordinator.rpc import CoordinatorService
from swarm_coordinator.state import SwarmState
from swarm_proto import swarm_pb2_grpc, version
from swarm_proto.backoff import Backoff
from swarm_proto.daemon import Service
from swarm_proto.model_args import layer_bytes, model_id, read_args
from swarm_proto.presence import PresenceError
from swarm_proto.presence_client import BrokerAddress, redact
from swarm_proto.tls import exposure_warning
from swarm_proto.transport import TokenInterceptor
from swarm_proto.trust import Identity, key_path, read_allowed_keys

log = logging.getLogger(__name__)

LAG_PROBE_S = 0.01  # the loop-lag probe's timer (stats: loop_lag_p50_ms, loop_lag_p99_ms)

__all__ = ["CoordinatorServer", "HttpAppFactory"]

HttpAppFactory = Callable[["CoordinatorServer"], Any]  # coordinator -> ASGI app


class CoordinatorServer(Service):
    def __init__(self, config: CoordinatorConfig, *, http_app: HttpAppFactory | None = None) -> None:
        self.config = config
        self._http_app = http_app
        self.broker: EmbeddedBroker | None = None
        self._registry: Registry | None = None
        self.planner: Planner | None = None
        self.lease: LeaseKeeper | None = None
        self.service: CoordinatorService | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: Any = None  # swarm_coordinator.http.HttpServer when an app is given
        self._stopped = asyncio.Event()
        self.address = ""  # host:port of the gRPC service once started
        self.http_address = ""  # host:port of the HTTP gateway, "" when none
        self.broker_url = ""  # the broker as this process reaches it
        self.advertised_mqtt_url = ""  # the broker as nodes should reach it (GetSwarmInfo; no credentials)
        self.identity: Identity | None = None  # the key that seals assignments
        self.warnings: list[str] = []  # shown at start and on the dashboard
        self.loop_lag: deque[float] = deque(maxlen=20_000)  # seconds the event loop ran a timer late
        self._lag_task: asyncio.Task[None] | None = None

    # --- what the HTTP gateway (and tests) read ------------------------------------------

    @property
    def registry(self) -> Registry:
        assert self._registry is not None, "coordinator not started"
        return self._registry

    @property
    def advertised_address(self) -> str:
        """The gRPC address as others should dial it (the lease names it)."""
        host, _, port = self.address.rpartition(":")
        return f"127.0.0.1:{port}" if host in ("0.0.0.0", "::", "[::]") else self.address

    @property
    def state(self) -> SwarmState:
        return self.registry.state

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> str:
        cfg = self.config
        args = await asyncio.to_thread(read_args, cfg.model)
        self.identity = await asyncio.to_thread(Identity.load_or_create, key_path(cfg.state_dir, f"coordinator-{cfg.swarm_id}"))
        allowed = await asyncio.to_thread(read_allowed_keys, cfg.allow_keys)
        if cfg.exposed:
            self.warnings.append(exposure_warning("swarm-coordinator", cfg.host))
        for line in self.warnings:
            log.warning("%s", line)
        if cfg.embedded:
            tls = (cfg.tls.cert, cfg.tls.key, cfg.tls.ca) if cfg.tls else None
            self.broker = EmbeddedBroker(cfg.host, cfg.mqtt_port, swarm_id=cfg.swarm_id, token=cfg.token, tls=tls)
            await self.broker.start()
            reach = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
            scheme = "mqtts" if tls else "mqtt"
            self.broker_url = f"{scheme}://{reach}:{self.broker.port}"
            self.advertised_mqtt_url = f"{scheme}://{cfg.host}:{self.broker.port}"
            login = BrokerAddress("", 0, "coordinator", self.broker.admin_password)
        else:
            self.broker_url = cfg.mqtt
            parsed = BrokerAddress.parse(cfg.mqtt)
            # nodes log in with their own credentials: never hand out the coordinator's
            self.advertised_mqtt_url = parsed.url
            login = parsed
            if cfg.mqtt_password and parsed.username is None:
                login = BrokerAddress(parsed.host, parsed.port, "coordinator", cfg.mqtt_password, parsed.tls)
        reach_broker = BrokerAddress.parse(self.broker_url)
        reach_broker = BrokerAddress(reach_broker.host, reach_broker.port, login.username, login.password, reach_broker.tls)
        self._registry = Registry(
            RegistryConfig(
                broker_url=self.broker_url,
                swarm_id=cfg.swarm_id,
                model=model_id(cfg.model),
                num_layers=args.num_layers,
                bytes_per_layer=layer_bytes(args, cfg.dtype),
                node_timeout_s=cfg.node_timeout,
                forget_after_s=cfg.forget_after,
                keepalive=cfg.keepalive,
                token=cfg.token,
                allowed_keys=allowed,
            ),
            identity=self.identity,
            broker=reach_broker,
            tls_context=cfg.tls.client_context() if cfg.tls and reach_broker.tls else None,
        )
        try:
            await self._registry.start(wait=30.0)
        except PresenceError as exc:
            raise BrokerError(f"no MQTT broker at {redact(self.broker_url)}: {exc}") from exc
        self.planner = Planner(
            self._registry,
            AssignmentPolicy(cfg.replicas, cfg.min_gain),
            settle=cfg.settle,
            rebalance_interval=cfg.rebalance_interval,
            budget=ReloadBudget(cfg.reload_budget, cfg.reload_window),
        )
        self.planner.active = False  # until this coordinator holds the lease
        self.planner.start()
        self.service = CoordinatorService(
            self._registry,
            mqtt_url=self.advertised_mqtt_url,
            version=version(),
            failures=Backoff(cfg.failure_backoff, cfg.failure_backoff_max),
            coordinator_key=self.identity.public,
        )
        server = grpc.aio.server(interceptors=[TokenInterceptor(cfg.token)] if cfg.token else [])
        swarm_pb2_grpc.add_CoordinatorServicer_to_server(self.service, server)
        bind = f"{cfg.host}:{cfg.port}"
        port = server.add_secure_port(bind, cfg.tls.server_credentials()) if cfg.tls else server.add_insecure_port(bind)
        if port == 0:
            raise OSError(f"cannot bind {cfg.host}:{cfg.port}")
        await server.start()
        self._grpc = server
        self.address = f"{cfg.host}:{port}"
        self.lease = LeaseKeeper(
            self._registry,
            cfg.coordinator_id or f"c-{secrets.token_hex(4)}",
            self.advertised_address,
            self.planner.activate,
            keepalive=cfg.keepalive,
        )
        self.lease.start()
        self._lag_task = asyncio.get_running_loop().create_task(self._probe_lag(), name="loop-lag")
        await self._start_http()
        log.info(
            "coordinator of swarm %s (model %s, %d layers) on %s, broker %s%s",
            cfg.swarm_id, model_id(cfg.model), args.num_layers, self.address, self.advertised_mqtt_url,
            f", HTTP on {self.http_address}" if self.http_address else "",
        )
        return self.address

    async def _start_http(self) -> None:
        if self._http_app is None:
            log.info("no HTTP app given: nothing listens on port %d", self.config.http_port)
            return
        from swarm_coordinator.http import HttpServer

        self._http = HttpServer(self._http_app(self), self.config.host, self.config.http_port, tls=self.config.tls)
        await self._http.start()
        self.http_address = f"{self.config.host}:{self._http.port}"

    async def serve(self) -> None:
        """Wait until :meth:`stop` is called."""
        await self._stopped.wait()

    async def _probe_lag(self) -> None:
        """How late the event loop runs a timer: about what a request arriving at a random
        moment waits before its handler starts (behind a plan, a batch of presence)."""
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(LAG_PROBE_S)
            self.loop_lag.append(max(0.0, loop.time() - asked - LAG_PROBE_S))

    def stats(self) -> dict[str, float]:
        """What the scale bench reads: route handling times, planner work, reloads."""
        times = sorted(self.service.route_seconds) if self.service is not None else []
        cpu = sorted(self.service.route_cpu_seconds) if self.service is not None else []
        lag = sorted(self.loop_lag)
        planner = self.planner

        def pct(q: float, values: list[float] = times) -> float:
            return round(1000 * values[min(len(values) - 1, int(q * len(values)))], 3) if values else 0.0

        return {
            "routes": self.service.routes_given if self.service is not None else 0,
            "route_p50_ms": pct(0.5),
            "route_p99_ms": pct(0.99),
            "route_cpu_p50_ms": pct(0.5, cpu),  # CPU time: the work, whatever else the machine runs
            "route_cpu_p99_ms": pct(0.99, cpu),
            "loop_lag_p50_ms": pct(0.5, lag),  # a request's wait before its handler, roughly
            "loop_lag_p99_ms": pct(0.99, lag),
            "loop_lag_max_ms": round(1000 * lag[-1], 3) if lag else 0.0,  # the longest stall (last 200 s)
            "plans": planner.runs if planner else 0,
            "plan_ms_mean": round(1000 * planner.plan_seconds / planner.runs, 3) if planner and planner.runs else 0.0,
            "reloads": planner.reloads if planner else 0,
            "first_loads": planner.first_loads if planner else 0,
            "mqtt_messages": self._registry.messages if self._registry else 0,
            "nodes_known": len(self._registry.state.nodes) if self._registry else 0,
        }

    async def stop(self) -> None:
        log.info("coordinator stats %s", json.dumps(self.stats()))
        if self._lag_task is not None:
            self._lag_task.cancel()
            await asyncio.gather(self._lag_task, return_exceptions=True)
            self._lag_task = None
        if self._http is not None:
            await self._http.stop()
            self._http = None
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
            self._grpc = None
        if self.lease is not None:
            await self.lease.stop()
        if self.planner is not None:
            await self.planner.stop()
        if self._registry is not None:
            try:
                await asyncio.wait_for(self._registry.stop(), 10.0)
            except asyncio.TimeoutError:
                log.warning("the registry's MQTT connection did not close within 10 s")
        if self.broker is not None:
            await self.broker.stop()
            self.broker = None
        self._stopped.set()
        log.info("coordinator stopped")

