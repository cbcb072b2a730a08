"""What a model is, without its weights: one frozen dataclass of hyperparameters,
filled from a Hugging Face `config.json` or from GGUF metadata, and the arithmetic
every side of the swarm does with it (bytes per layer, the swarm's name for a
model). No torch: the client and the coordinator read models too."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from swarm_proto.errors import ModelFormatError

# model_type in config.json -> does it carry q/k/v biases by default
SUPPORTED_ARCHITECTURES = {"llama": False, "mistral": False, "qwen2": True}

# Compute dtypes a node can run in, and the bytes one value takes.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class RopeScaling:
    """How rotary frequencies are stretched for long contexts.

    kind "linear": every inverse frequency divided by `factor`.
    kind "llama3": the Llama 3.1 piecewise rule (low/high frequency bands).
    """

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    # Llama 3 GGUF files ship precomputed rope divisors instead of metadata.
    rope_freq_divisors: tuple[float, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"{self.num_heads} attention heads cannot be grouped over {self.num_kv_heads} KV heads"
            )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        arch = cfg.get("model_type", "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelFormatError(
                f"unknown architecture {arch!r}: supported are {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if cfg.get("sliding_window") and cfg.get("use_sliding_window", arch == "mistral"):
            # Sliding windows only change results past the window; refuse rather than diverge.
            window = int(cfg["sliding_window"])
            max_pos = min(int(cfg.get("max_position_embeddings", window)), window)
        else:
            max_pos = int(cfg.get("max_position_embeddings", 4096))
        try:
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                arch=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=int(cfg["num_attention_heads"]),
                num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
                head_dim=int(cfg.get("head_dim") or 0),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(_rope_params(cfg).get("rope_theta", cfg.get("rope_theta", 10000.0))),
                rope_scaling=_rope_scaling(cfg),
                max_position_embeddings=max_pos,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", SUPPORTED_ARCHITECTURES[arch])),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                name=str(cfg.get("_name_or_path", "")),
            )
        except KeyError as exc:
            raise ModelFormatError(f"config.json lacks the field {exc.args[0]!r}") from exc


def _rope_params(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    # transformers >= 5 writes `rope_parameters`; older configs write `rope_scaling`.
    return cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}


def _rope_scaling(cfg: Mapping[str, Any]) -> RopeScaling | None:
    p = _rope_params(cfg)
    kind = p.get("rope_type", p.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return RopeScaling("linear", float(p["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            float(p["factor"]),
            float(p["low_freq_factor"]),
            float(p["high_freq_factor"]),
            int(p["original_max_position_embeddings"]),
        )
    raise ModelFormatError(f"unsupported rope scaling {kind!r}: supported are linear and llama3")


def read_args(source: str | Path) -> ModelArgs:
    """The hyperparameters of the model at `source` (a GGUF file or a Hugging Face
    folder), without reading any weights."""
    path = Path(source)
    if is_gguf(path):
        from swarm_proto import gguf_index  # numpy and gguf, only for GGUF files

        return gguf_index.read_args(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelFormatError(f"{path}: no config.json (nor is it a GGUF file)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelFormatError(f"{cfg_path}: not valid JSON ({exc})") from exc
    return ModelArgs.from_hf_config(cfg)


def is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"


def model_id(source: str | Path) -> str:
    """How the swarm names a model: its file or folder name (the same on every machine
    that shares the model volume, unlike absolute paths)."""
    return Path(str(source).rstrip("/")).name


def layer_bytes(args: ModelArgs, dtype: str) -> int:
    """Bytes of one decoder layer's weights held in ``dtype`` (a name in DTYPE_BYTES)."""
    c = args.hidden_size
    params = c * (args.q_size + 2 * args.kv_size) + args.q_size * c + 3 * c * args.intermediate_size + 2 * c
    if args.attention_bias:
        params += args.q_size + 2 * args.kv_size
    return params * DTYPE_BYTES[dtype]
