"""The lifecycle of one node process: load the slice, serve gRPC, drain, stop."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import torch

from swarm_node.config import NodeConfig
from swarm_node.engine.loading import load_slice, model_bytes
from swarm_node.engine.model import ModelSlice
from swarm_node.rpc import NodeService
from swarm_node.scheduler import Scheduler
from swarm_proto import swarm_pb2_grpc
from swarm_proto.daemon import Service
from swarm_proto.transport import TokenInterceptor, server_options

log = logging.getLogger(__name__)


class NodeServer(Service):
    """``start()`` loads and binds, ``stop()`` drains in-flight steps then closes.

    Usable as ``async with NodeServer(config) as node: ...``; ``node.address`` is the
    bound ``host:port`` (useful with port 0).
    """

    def __init__(self, config: NodeConfig, model: ModelSlice | None = None) -> None:
        self.config = config
        self._model = model
        self._server: grpc.aio.Server | None = None
        self._janitor: asyncio.Task[None] | None = None
        self.scheduler: Scheduler | None = None
        self.service: NodeService | None = None
        self.address = ""

    async def start(self) -> str:
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model = self._model
        if model is None:
            device = cfg.resolve_device()
            t0 = time.monotonic()
            model = await asyncio.to_thread(
                load_slice, cfg.model, cfg.start, cfg.end, dtype=cfg.torch_dtype, device=device, weights=cfg.weight_format,
                kernel_dtype=cfg.torch_kernel_dtype,
            )
            log.info(
                "layers [%d, %d) on %s in %s, weights %s (%.1f MB held), loaded in %.1f s", cfg.start, cfg.end, device,
                cfg.resolved_dtype, cfg.weight_format, model_bytes(model) / 1e6, time.monotonic() - t0,
            )
        model.graph_mode = "auto" if cfg.cuda_graphs else "off"
        self.scheduler = Scheduler(model, max_batch_tokens=cfg.max_batch_tokens)
        self.scheduler.start()
        # A step carries at most max_length positions of hidden states (float32 at most).
        max_receive = max(4 << 20, cfg.max_length * (model.args.hidden_size * 4 + 8) + (1 << 20))
        interceptors = [TokenInterceptor(cfg.token)] if cfg.token else []
        server = grpc.aio.server(options=server_options(max_receive), interceptors=interceptors)
        bind = f"{cfg.host}:{cfg.port}"
        port = server.add_secure_port(bind, cfg.tls.server_credentials()) if cfg.tls else server.add_insecure_port(bind)
        if port == 0:
            raise OSError(f"cannot bind {cfg.host}:{cfg.port}")
        self.address = f"{cfg.host}:{port}"
        self.service = NodeService(cfg, model, self.scheduler, address=self.address)
        swarm_pb2_grpc.add_NodeServicer_to_server(self.service, server)
        await server.start()
        self._server = server
        self._janitor = asyncio.get_running_loop().create_task(self._expire_idle())
        log.info(
            "node %s serving layers [%d, %d) of %d on %s (max %d sessions of %d positions)",
            cfg.node_id, cfg.start, cfg.end, model.args.num_layers, self.address, cfg.max_sessions, cfg.max_length,
        )
        return self.address

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Refuse new work, let in-flight steps finish (and forward), then close."""
        if self._server is None or self.service is None or self.scheduler is None:
            return
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        service = self.service
        service.draining = True
        t0 = time.monotonic()
        drained = await service.wait_steps_done(timeout)
        if not drained:
            log.warning("drain timed out after %.1f s with steps still in flight", timeout)
        active = len(service.sessions)
        service.fail_all(grpc.StatusCode.UNAVAILABLE, "node is shutting down")
        deadline = time.monotonic() + 2.0
        while service.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await service.wait_background(timeout)
        if self._janitor is not None:
            self._janitor.cancel()
        await self._server.stop(grace=1.0)
        await self.scheduler.stop()
        await service.close_channels()
        self._server = None
        log.info("stopped after draining for %.2f s (%d sessions ended)", time.monotonic() - t0, active)

    async def _expire_idle(self) -> None:
        assert self.service is not None
        period = min(1.0, self.config.idle_timeout / 4)
        while True:
            await asyncio.sleep(period)
            self.service.expire_idle()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(drain_timeout=5.0)
