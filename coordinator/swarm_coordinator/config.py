"""The configuration of one ``swarm-coordinator`` process: a frozen dataclass, no globals."""

from __future__ import annotations

from dataclasses import dataclass, field

from swarm_proto.model_args import DTYPE_BYTES
from swarm_proto.presence import check_id
from swarm_proto.tls import TlsFiles, exposed

__all__ = ["CoordinatorConfig", "DEFAULT_GRPC_PORT", "DEFAULT_HTTP_PORT", "DEFAULT_MQTT_PORT"]

DEFAULT_GRPC_PORT = 7600
DEFAULT_HTTP_PORT = 8000
DEFAULT_MQTT_PORT = 1883


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything a coordinator needs; ``swarm_coordinator.cli`` fills it from flags and
    ``SWARM_*`` environment variables."""

    model: str  # model source (file or folder); read for its shape only, never loaded
    host: str = "127.0.0.1"  # address the gRPC (and HTTP) servers bind
    port: int = DEFAULT_GRPC_PORT  # gRPC Coordinator service; 0 picks a free port
    http_port: int = DEFAULT_HTTP_PORT  # HTTP gateway; served when the server is given an http_app (swarm-coordinator always gives it)
    mqtt: str = "embedded"  # "embedded" (broker in this process) or mqtt://host:port
    mqtt_port: int = DEFAULT_MQTT_PORT  # the embedded broker's port; 0 picks a free one
    swarm_id: str = "default"
    replicas: int = 1  # copies of each layer wanted, where memory allows
    min_gain: float = 0.2  # hysteresis: reshuffle a working swarm only for more than this gain
    dtype: str = "float32"  # the nodes' compute dtype, for bytes per layer
    node_timeout: float = 10.0  # silence after which a node counts as offline
    forget_after: float = 600.0  # a node offline this long is forgotten (its retained status cleared)
    keepalive: int = 5  # MQTT keepalive of the registry's connection, seconds
    settle: float = 1.0  # seconds to let changes (joins in a burst, retained messages) gather before planning
    failure_backoff: float = 2.0  # a reported node is avoided this long, doubling per report
    failure_backoff_max: float = 60.0
    rebalance_interval: float = 60.0  # seconds between whole-swarm proposals; plans in between are incremental
    reload_budget: int = 2  # times a node may be moved off a range it hosts per reload_window (coverage comes first)
    reload_window: float = 3600.0
    coordinator_id: str = ""  # this coordinator's name on the lease (unique per swarm); "" draws one
    token: str = field(default="", repr=False)  # the swarm token: asked of every gRPC caller, sent to the nodes
    state_dir: str = ""  # where the coordinator's presence key lives ("": <cache>/state)
    allow_keys: str = ""  # file of node public keys (hex, one a line) admitted without the token's proof
    mqtt_password: str = field(default="", repr=False)  # the user "coordinator" on an external broker
    tls: TlsFiles | None = None  # mutual TLS on gRPC, TLS on the embedded broker, HTTPS (None: in clear)

    def __post_init__(self) -> None:
        check_id("swarm id", self.swarm_id)
        for name in ("port", "http_port", "mqtt_port"):
            value = getattr(self, name)
            if not 0 <= value < 65536:
                raise ValueError(f"{name} must be in 0..65535, got {value}")
        if self.mqtt != "embedded" and "://" not in self.mqtt:
            raise ValueError(f"mqtt must be 'embedded' or mqtt://host:port, got {self.mqtt!r}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.min_gain < 0:
            raise ValueError(f"min_gain must be >= 0, got {self.min_gain}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        for name in ("node_timeout", "forget_after", "failure_backoff", "failure_backoff_max"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.rebalance_interval <= 0 or self.reload_window <= 0 or self.reload_budget < 0:
            raise ValueError("rebalance_interval and reload_window must be positive, reload_budget >= 0")
        if self.coordinator_id:
            check_id("coordinator id", self.coordinator_id)
        if self.keepalive < 1 or self.settle < 0:
            raise ValueError("keepalive must be >= 1 s and settle >= 0 s")

    @property
    def embedded(self) -> bool:
        return self.mqtt == "embedded"

    @property
    def exposed(self) -> bool:
        """Bound to more than loopback with neither TLS nor a token: anyone who can reach
        the ports can join, read and steer the swarm."""
        return exposed(self.host, token=self.token, tls=self.tls)
