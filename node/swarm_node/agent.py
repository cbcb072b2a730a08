"""A node's side of the control plane: join the swarm, host what the coordinator assigns.

``swarm-node --coordinator HOST:PORT`` runs a :class:`NodeAgent`:

1. measure this node's speed (:mod:`swarm_node.engine.speed`) and memory budget;
2. ask the coordinator (``GetSwarmInfo``) for the swarm id and the MQTT broker, and
   check that both serve the same model;
3. announce itself over MQTT (retained status with an offline Last Will, load every
   ~2 s: :class:`swarm_proto.presence_client.PresenceClient`);
4. load the layer range the coordinator assigns (``assign/<id>``, retained), start
   serving, announce ``ready``; later assignments reload layers in place
   (:meth:`NodeService.reload`), keeping the sessions on the layers it keeps;
5. every ``probe_interval`` seconds, measure round trips to peers it may forward to
   (``Info`` pings, :class:`swarm_proto.links.LinkProbe`; peers from ``ListNodes``,
   the ones whose range holds this node's end first, at most ``MAX_PEER_RTTS``) and
   report them with its load, for link-aware routing (docs/wan.md).

With ``--layers A:B`` the node is *pinned*: it serves that range from the start,
announces it, and ignores assignments (the coordinator plans around it).

The coordinator is only needed to join; once the broker is known the node talks only
to the broker, and sessions never touch either.

Trust (:mod:`swarm_proto.trust`): every presence message is sealed with the node's
Ed25519 key and carries the swarm token's proof of membership; the node pins the
coordinator's key from ``GetSwarmInfo`` and believes only assignments sealed by it, and
even then refuses one for another model, past the model's last layer or beyond its
memory budget. With a swarm token and a broker URL without credentials, the node logs
in to the broker as its node id with the password derived from the token.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import torch

from swarm_node.config import NodeConfig
from swarm_node.engine import blockq
from swarm_node.engine.speed import Speed, default_memory_budget, measure, quantized_bits
from swarm_node.errors import SwarmNodeError
from swarm_node.server import NodeServer
from swarm_proto import swarm_pb2, swarm_pb2_grpc
from swarm_proto.errors import SwarmProtoError
from swarm_proto.links import LinkProbe
from swarm_proto.model_args import ModelArgs, model_id, read_args
from swarm_proto.presence import (
    MAX_LOAD_SESSIONS,
    MAX_PEER_RTTS,
    MAX_RTT_S,
    Assign,
    Event,
    EventKind,
    LayerRange,
    NodeLoad,
    NodeState,
    NodeStatus,
    PeerRtt,
    PresenceError,
    SessionLoad,
)
from swarm_proto.presence_client import BrokerAddress, PresenceClient
from swarm_proto.tls import TlsFiles, exposed, secure_aio_channel
from swarm_proto.transport import Metadata, call_metadata
from swarm_proto.trust import Identity, Sealer, membership_proof, mqtt_password
from swarm_proto.weight_format import describe, format_layer_bytes
from swarm_proto.wire import session_label

log = logging.getLogger(__name__)

__all__ = ["AgentError", "NodeAgent", "SwarmInfo", "fetch_swarm_info"]


class AgentError(SwarmNodeError):
    """The node could not join the swarm (coordinator unreachable, other model)."""


@dataclass(frozen=True)
class SwarmInfo:
    swarm_id: str
    broker: BrokerAddress
    model: str
    num_layers: int
    coordinator_key: bytes = b""  # empty from an older coordinator: pin the first seen


def _broker(url: str, coordinator_host: str) -> BrokerAddress:
    """The broker's address; a wildcard host means the coordinator's own host."""
    addr = BrokerAddress.parse(url)
    if addr.host in ("0.0.0.0", "::"):
        addr = replace(addr, host=coordinator_host)
    return addr


async def fetch_swarm_info(
    coordinator: str, *, timeout: float = 60.0, metadata: Metadata = None, tls: TlsFiles | None = None
) -> SwarmInfo:
    """Ask the coordinator at ``HOST:PORT`` (or the first of ``HOST:PORT,HOST:PORT,...``
    that answers: an active coordinator and its standby) for the swarm's id and broker;
    retries while they start (``timeout`` seconds in all)."""
    addresses = [a.strip() for a in coordinator.split(",") if a.strip()]
    if not addresses:
        raise AgentError(f"no coordinator address in {coordinator!r}")
    deadline = time.monotonic() + timeout
    delay = 0.2
    attempt = 0
    while True:
        address = addresses[attempt % len(addresses)]
        attempt += 1
        async with secure_aio_channel(address, tls) as channel:
            stub = swarm_pb2_grpc.CoordinatorStub(channel)
            try:
                info = await stub.GetSwarmInfo(swarm_pb2.SwarmInfoRequest(), timeout=5.0, metadata=metadata)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise AgentError(f"coordinator {address}: {exc.code().name}: {exc.details()}") from exc
                if time.monotonic() + delay > deadline:
                    raise AgentError(f"coordinator {coordinator} unreachable for {timeout:g} s: {exc.details()}") from exc
                log.info("waiting for the coordinator at %s: %s", address, exc.details())
        if attempt % len(addresses) == 0:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
    host = address.rsplit(":", 1)[0].strip("[]")
    return SwarmInfo(info.swarm_id, _broker(info.mqtt_url, host), info.model, info.num_layers, info.coordinator_key)


def _measure_alone(
    args: ModelArgs, device: str, dtype: torch.dtype, weights: str = "float", bits: int = 4,
    kernel_dtype: torch.dtype | None = None,
) -> Speed:
    """Measure while holding a machine-wide lock: nodes started together on one machine
    (``swarm up``, a benchmark) take turns instead of timing each other's load."""
    lock_path = Path(tempfile.gettempdir()) / "llama-swarm-speed.lock"
    try:
        import fcntl
    except ImportError:  # not POSIX: measure without the lock
        return measure(args, device=device, dtype=dtype, weights=weights, bits=bits, kernel_dtype=kernel_dtype)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return measure(args, device=device, dtype=dtype, weights=weights, bits=bits, kernel_dtype=kernel_dtype)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class NodeAgent:
    """One node process under a coordinator: ``start()``, then ``stop()`` on SIGTERM.

    ``speed`` overrides the measurement (layer-steps/s; tests and operators who know
    better); ``memory_budget`` 0 means 80% of the device's free memory.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        coordinator: str,
        memory_budget: int = 0,
        speed: float = 0.0,
        pinned: bool = False,
        advertise: str = "",
        load_interval: float = 2.0,
        keepalive: int = 5,
        identity: Identity | None = None,
        probe_interval: float = 10.0,
    ) -> None:
        self.config = config
        self.identity = identity or Identity.generate()
        self.coordinator = coordinator
        self.memory_budget = memory_budget
        self.speed_override = speed
        self.pinned = pinned
        self.advertise = advertise
        self.load_interval = load_interval
        self.keepalive = keepalive
        self.server: NodeServer | None = None
        self.presence: PresenceClient | None = None
        self.speed: Speed | None = None
        self.info: SwarmInfo | None = None
        self._wanted: Assign | None = None
        self._wake = asyncio.Event()
        self._applier: asyncio.Task[None] | None = None
        self._tokens_seen = (time.monotonic(), 0)
        self._tokens_per_s = 0.0
        self.hosted: LayerRange | None = None
        self.budget, self.layer_bytes, self.num_layers = 0, 0, 0  # set by start()
        self.applied = asyncio.Event()  # set whenever an assignment has been applied
        self.probe_interval = probe_interval
        self.links = LinkProbe(ttl=probe_interval / 2, max_nodes=MAX_PEER_RTTS, tls=config.tls)
        self.peer_rtts: dict[str, float] = {}
        self._prober: asyncio.Task[None] | None = None

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        args = read_args(cfg.model)
        device = cfg.resolve_device()
        weights = cfg.weight_format
        if self.speed_override > 0:
            self.speed = Speed(self.speed_override, self.speed_override * 10)
        else:
            bits = quantized_bits(weights, cfg.model)
            self.speed = await asyncio.to_thread(
                _measure_alone, args, device, cfg.torch_dtype, weights, bits, cfg.torch_kernel_dtype
            )
        budget = self.memory_budget or default_memory_budget(device)
        per_layer = format_layer_bytes(args, cfg.kernel_dtype, weights, cfg.model,
                                       blockq=device.split(":")[0] == "cpu" and blockq.available())
        weight_format = describe(weights, cfg.resolved_dtype, cfg.model)
        log.info(
            "memory budget %.1f MB: room for %d of %d layers (%.1f MB each, weights %s)",
            budget / 1e6, budget // per_layer, args.num_layers, per_layer / 1e6, weight_format,
        )
        self.info = info = await fetch_swarm_info(self.coordinator, metadata=call_metadata(cfg.token), tls=cfg.tls)
        mine = model_id(cfg.model)
        if info.model != mine or info.num_layers != args.num_layers:
            raise AgentError(
                f"the swarm serves {info.model!r} ({info.num_layers} layers); this node has {mine!r} "
                f"({args.num_layers} layers)"
            )
        status = NodeStatus(
            node_id=cfg.node_id,
            model=mine,
            device=device,
            memory_budget=budget,
            speed=self.speed.decode,
            prefill_speed=self.speed.prefill,
            state=NodeState.STARTING,
            pinned=self.pinned,
            layer_bytes=per_layer,
            weight_format=weight_format,
            exposed=exposed(cfg.host, token=cfg.token, tls=cfg.tls),
        )
        if self.pinned:
            self.server = NodeServer(cfg)
            await self.server.start()
            self.hosted = LayerRange(cfg.start, cfg.end)
            status = replace(status, address=self._address(), hosted=self.hosted, state=NodeState.READY)
        self.budget, self.layer_bytes, self.num_layers = budget, per_layer, args.num_layers
        broker = info.broker
        if cfg.token and broker.username is None:
            broker = replace(broker, username=cfg.node_id, password=mqtt_password(cfg.token, info.swarm_id, cfg.node_id))
        proof = membership_proof(cfg.token, info.swarm_id, self.identity.public)
        log.info("presence key %s", self.identity.public_hex)
        self.presence = PresenceClient(
            broker,
            info.swarm_id,
            status,
            load=self._load,
            on_assign=self._on_assign,
            load_interval=self.load_interval,
            keepalive=self.keepalive,
            sealer=Sealer(self.identity, proof),
            coordinator_key=info.coordinator_key or None,
            tls_context=cfg.tls.client_context() if cfg.tls and broker.tls else None,
        )
        self._applier = asyncio.get_running_loop().create_task(self._apply_loop(), name="swarm-assign")
        if self.probe_interval > 0:
            self._prober = asyncio.get_running_loop().create_task(self._probe_loop(), name="swarm-links")
        try:
            await self.presence.start(wait=30.0)
        except PresenceError as exc:
            await self.stop()
            raise AgentError(f"cannot reach the swarm's broker {info.broker.url}: {exc}") from exc
        log.info("node %s joined swarm %s via %s (broker %s)", cfg.node_id, info.swarm_id, self.coordinator, info.broker.url)

    async def stop(self) -> None:
        """Announce draining, drain the sessions, then leave (status offline, no Will)."""
        if self.presence is not None and self.presence.connected:
            await self.presence.set_status(replace(self.presence.status, state=NodeState.DRAINING))
        for task in (self._applier, self._prober):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.server is not None:
            await self.server.stop()
        if self.presence is not None:
            await self.presence.stop()

    # --- assignments ------------------------------------------------------------------

    def _on_assign(self, assign: Assign) -> None:
        if self.pinned:
            log.info("pinned to %s: ignoring the assignment %s", self.hosted, assign.layers)
            return
        problem = self._refusal(assign)
        if problem:
            log.warning("refusing the assignment %s (epoch %d): %s", assign.layers, assign.epoch, problem)
            return
        self._wanted = assign
        self._wake.set()

    def _refusal(self, assign: Assign) -> str:
        """Why a (coordinator-sealed) assignment cannot be hosted here, or ""."""
        mine = model_id(self.config.model)
        if assign.model != mine:
            return f"it is for model {assign.model!r}, this node holds {mine!r}"
        layers = assign.layers
        if layers is None:
            return ""
        if layers.end > self.num_layers:
            return f"the model has {self.num_layers} layers"
        need = len(layers) * self.layer_bytes
        if need > self.budget:
            return f"{len(layers)} layers need {need / 1e6:.1f} MB, the memory budget is {self.budget / 1e6:.1f} MB"
        return ""

    async def _apply_loop(self) -> None:
        """Apply the newest assignment; one that arrives while loading waits its turn
        (and replaces any older one still waiting)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            assign = self._wanted
            if assign is None:
                continue
            try:
                await self._apply(assign)
            except (SwarmNodeError, SwarmProtoError, OSError, RuntimeError, ValueError) as exc:
                log.error("could not host %s: %s", assign.layers, exc)
                await self._publish_event(EventKind.REASSIGN, f"failed to load {assign.layers}: {exc}")
            self.applied.set()

    async def _apply(self, assign: Assign) -> None:
        assert self.presence is not None
        layers = assign.layers
        if layers == self.hosted:
            return
        status = self.presence.status
        if layers is None:
            # Not needed now: stay connected and keep the weights for a later plan.
            log.info("assignment: host nothing (standby)")
            self.hosted = None
            await self.presence.set_status(replace(status, hosted=None, state=NodeState.STARTING))
            return
        t0 = time.monotonic()
        if self.server is None:
            await self.presence.set_status(replace(status, hosted=layers, state=NodeState.LOADING))
            server = NodeServer(replace(self.config, start=layers.start, end=layers.end))
            await server.start()
            self.server = server
        else:
            # Keep serving the old range (announced as such) while the new layers load.
            assert self.server.service is not None
            await self.server.service.reload(layers.start, layers.end)
        self.hosted = layers
        await self.presence.set_status(
            replace(self.presence.status, address=self._address(), hosted=layers, state=NodeState.READY)
        )
        log.info("hosting layers %s (epoch %d), ready after %.1f s", layers, assign.epoch, time.monotonic() - t0)

    # --- links ------------------------------------------------------------------------

    async def _probe_loop(self) -> None:
        metadata = call_metadata(self.config.token)
        while True:
            if self.hosted is not None:
                try:
                    peers = await self._peers(metadata)
                    self.peer_rtts = await self.links.rtts(peers, metadata)
                except grpc.aio.AioRpcError as exc:
                    log.debug("no peer list from the coordinator: %s", exc.code().name)
            await asyncio.sleep(self.probe_interval)

    async def _peers(self, metadata: Metadata) -> list[tuple[str, str]]:
        """Serving peers, the ones this node may forward to (its end in their range) first;
        from the first of the coordinators (``HOST:PORT,HOST:PORT``) that answers, over
        mutual TLS when the swarm has it."""
        addresses = [a.strip() for a in self.coordinator.split(",") if a.strip()]
        for i, address in enumerate(addresses):
            async with secure_aio_channel(address, self.config.tls) as channel:
                try:
                    reply = await swarm_pb2_grpc.CoordinatorStub(channel).ListNodes(
                        swarm_pb2.ListNodesRequest(), timeout=10.0, metadata=metadata
                    )
                    break
                except grpc.aio.AioRpcError:
                    if i == len(addresses) - 1:
                        raise
        end = self.hosted.end if self.hosted is not None else -1
        peers = [n for n in reply.nodes if n.node_id != self.config.node_id and n.address and n.end > n.start]
        peers.sort(key=lambda n: (not n.start <= end < n.end, n.node_id))
        return [(n.node_id, n.address) for n in peers[:MAX_PEER_RTTS]]

    # --- reporting --------------------------------------------------------------------

    def _address(self) -> str:
        assert self.server is not None
        if self.advertise:
            return self.advertise if ":" in self.advertise else f"{self.advertise}:{self.server.address.rsplit(':', 1)[1]}"
        host, port = self.server.address.rsplit(":", 1)
        if host in ("0.0.0.0", "::", "[::]"):
            host = socket.gethostname()
        return f"{host}:{port}"

    def _load(self) -> NodeLoad:
        server = self.server
        if server is None or server.service is None or server.scheduler is None:
            return NodeLoad()
        service = server.service
        active = len(service.sessions)
        now, tokens = time.monotonic(), server.scheduler.stats.tokens
        t_prev, tok_prev = self._tokens_seen
        if now - t_prev >= 0.5:
            self._tokens_per_s = (tokens - tok_prev) / (now - t_prev)
            self._tokens_seen = (now, tokens)
        recent = sorted(service.sessions.values(), key=lambda x: x.last_active, reverse=True)[:MAX_LOAD_SESSIONS]
        sessions = tuple(
            SessionLoad(
                session_label(x.sid), x.spec.start, x.spec.end, len(x.history), x.spec.generation.prompt_length,
                x.spec.generation.max_new_tokens, max(0.0, now - x.opened_at), max(0.0, now - x.last_active),
            )
            for x in recent
        )
        return NodeLoad(
            active_sessions=active,
            queued_steps=server.scheduler.queued,
            free_kv_tokens=service.free_kv_tokens(),
            tokens_per_s=max(0.0, self._tokens_per_s),
            kv_tokens=service.kv_tokens(),
            free_sessions=service.admission.free_sessions,
            opening_sessions=service.admission.opening,
            sessions=sessions,
            peer_rtts=tuple(PeerRtt(n, min(rtt, MAX_RTT_S)) for n, rtt in list(self.peer_rtts.items())[:MAX_PEER_RTTS]),
        )

    async def _publish_event(self, kind: EventKind, detail: str) -> None:
        if self.presence is not None:
            await self.presence.publish_event(Event(kind, self.config.node_id, detail))
