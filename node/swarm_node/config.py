"""The configuration of one ``swarm-node`` process: a frozen dataclass, no globals."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import torch

from swarm_proto.model_args import DTYPE_BYTES
from swarm_proto.tls import TlsFiles
from swarm_proto.weight_format import QUANTIZE_CHOICES, compute_dtypes, resolve

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPE_CHOICES = ("auto", *DTYPE_BYTES)




@dataclass(frozen=True)
class NodeConfig:
    """Everything a node needs to serve layers [start, end) of one model."""

    model: str
    start: int
    end: int
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port (printed at startup)
    device: str = "auto"
    dtype: str = "auto"  # see swarm_proto.weight_format.compute_dtypes; float32: the exact, dequantized path
    quantize: str = "auto"  # weight format, see swarm_proto.weight_format.resolve
    threads: int = 0  # 0: leave torch's default
    max_sessions: int = 256  # a bound on streams and tasks; the capacity follows from kv_budget
    max_length: int = 2048
    kv_budget: int = 0  # bytes of KV cache for sessions (0: room for 16 sessions of max_length on the hosted layers)
    idle_timeout: float = 300.0  # seconds without a step before a session is freed
    drain_timeout: float = 30.0  # seconds SIGTERM waits for in-flight steps
    open_timeout: float = 30.0  # seconds to open the rest of a route
    park_timeout: float = 60.0  # seconds a failed resumable session's cache is kept for a resume
    open_idle_timeout: float = 30.0  # seconds a session that never got a step is kept
    idle_evict_after: float = 30.0  # a session idle this long gives way to a new one when the node is full
    max_pending_results: int = 256  # results waiting at the tail for the client to read, per session
    max_pending_result_bytes: int = 64 << 20  # ... and their bytes (a step's logits must fit too)
    max_batch_tokens: int = 2048  # positions merged into one forward pass
    cuda_graphs: bool = True  # decode steps on CUDA replay captured graphs (swarm_node.engine.graphs)
    token: str = field(default="", repr=False)  # swarm token required on every call; "" = none
    metrics_port: int | None = None  # Prometheus /metrics on host:metrics_port (0: pick one; None: off)
    tls: TlsFiles | None = None  # mutual TLS on the gRPC server and every outgoing channel (None: in clear)
    node_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"layer range {self.start}:{self.end} is empty or negative")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}")
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)} (cuda:N allowed), got {self.device!r}")
        for name in ("max_sessions", "max_length", "max_batch_tokens", "max_pending_results", "max_pending_result_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.kv_budget < 0:
            raise ValueError(f"kv_budget must be >= 0, got {self.kv_budget}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        for name in ("idle_timeout", "drain_timeout", "open_timeout", "park_timeout", "open_idle_timeout", "idle_evict_after"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def resolved_dtype(self) -> str:
        """The activations' dtype, ``auto`` resolved (swarm_proto.weight_format.compute_dtypes)."""
        return compute_dtypes(self.dtype, self.weight_format, self.resolve_device())[0]

    @property
    def kernel_dtype(self) -> str:
        """The dtype quantized matrices' kernels run in."""
        return compute_dtypes(self.dtype, self.weight_format, self.resolve_device())[1]

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, self.resolved_dtype)
        return dtype

    @property
    def torch_kernel_dtype(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, self.kernel_dtype)
        return dtype

    @property
    def weight_format(self) -> str:
        """How this node holds its weights: float, gguf, int8 or int4 (ValueError when
        ``quantize`` does not apply to the model or device)."""
        return resolve(self.quantize, self.model, self.dtype, self.resolve_device())

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def resolve_device(self) -> str:
        """The concrete device for ``auto``: CUDA, then MPS, then CPU."""
        if self.device != "auto":
            return self.device
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"


def parse_layers(text: str) -> tuple[int, int]:
    """``"A:B"`` -> (A, B), the half-open layer range [A, B)."""
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(f"layers must look like START:END, got {text!r}")
    try:
        start, end = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"layers must be two integers START:END, got {text!r}") from None
    return start, end
