"""Model hyperparameters: one frozen dataclass, filled from a Hugging Face
`config.json` or from GGUF metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from swarm_node.errors import ModelFormatError

# model_type in config.json -> does it carry q/k/v biases by default
SUPPORTED_ARCHITECTURES = {"llama": False, "mistral": False, "qwen2": True}


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

    def layer_params(self) -> int:
        """Parameters in one decoder layer."""
        c, i = self.hidden_size, self.intermediate_size
        attn = c * (self.q_size + 2 * self.kv_size) + self.q_size * c
        bias = (self.q_size + 2 * self.kv_size) if self.attention_bias else 0
        return attn + bias + 3 * c * i + 2 * c

    def inv_freq(self) -> torch.Tensor:
        """Rotary inverse frequencies [head_dim // 2], float32, as transformers computes them."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if self.rope_freq_divisors is not None:
            return inv / torch.tensor(self.rope_freq_divisors, dtype=torch.float32)
        s = self.rope_scaling
        if s is None:
            return inv
        if s.kind == "linear":
            return inv / s.factor
        # llama3
        old = s.original_max_position_embeddings
        low_wavelen = old / s.low_freq_factor
        high_wavelen = old / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)

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
