"""A node's side of spot checks: commitments of its output, and the test-only liar.

Every step a node computes, it commits to its span's output: per position, the
``k`` entries of the output hidden state largest in magnitude (indices and values,
:mod:`swarm_proto.commit`). The commitment rides the forwarded Step to the tail,
which returns all of them to the client; a verifier recomputing the span compares.

``Lie`` is a fault-injection hook FOR TESTS ONLY, off unless the environment variable
``SWARM_TEST_LIE=MODE:N`` is set when the node starts: on every position ``p`` with
``(p + 1) % N == 0`` the node perturbs its output slightly (``slight``: every entry
scaled by 1.3, a wrong result that still decodes to plausible text), grossly
(``gross``: entries replaced by noise of the same scale), or, at the tail, returns a
wrong token (``token``: the sampled id + 1). Its commitments then describe what it
actually sent, as a lazy or malicious node's would. Nothing else reads it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

__all__ = ["ENV_LIE", "Lie", "commit_rows", "commit_tensors"]

ENV_LIE = "SWARM_TEST_LIE"
_MODES = ("slight", "gross", "token")


def commit_rows(hidden: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """Row-major [T, k] indices and values of the k largest-magnitude entries per row."""
    idx, values = commit_tensors(hidden, k)
    return idx.reshape(-1).tolist(), values.reshape(-1).tolist()


def commit_tensors(hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``commit_rows`` as tensors on hidden's device: indices [T, k] and float32 values [T, k]."""
    k = min(k, int(hidden.shape[-1]))
    h = hidden.float()  # [T, C]
    idx = h.abs().topk(k, dim=-1).indices  # [T, k]
    return idx, h.gather(-1, idx)


@dataclass(frozen=True)
class Lie:
    """Test-only fault injection (see the module docstring)."""

    mode: str
    every: int

    @classmethod
    def from_env(cls) -> Lie | None:
        text = os.environ.get(ENV_LIE, "").strip()
        if not text:
            return None
        mode, _, n = text.partition(":")
        if mode not in _MODES or not n.isdigit() or int(n) < 1:
            raise ValueError(f"{ENV_LIE}={text!r}: expected MODE:N with MODE one of {', '.join(_MODES)} and N >= 1")
        log.warning("TEST FAULT INJECTION ON: this node lies (%s) on 1 position in %s", mode, n)
        return cls(mode, int(n))

    def hits(self, position: int) -> bool:
        return (position + 1) % self.every == 0

    def perturb(self, hidden: torch.Tensor, start_pos: int) -> torch.Tensor:
        """``hidden`` [T, C] of positions from ``start_pos``, with the lying rows changed."""
        if self.mode == "token":
            return hidden
        rows = [i for i in range(hidden.shape[0]) if self.hits(start_pos + i)]
        if not rows:
            return hidden
        out = hidden.clone()
        for i in rows:
            if self.mode == "slight":
                out[i] = hidden[i] * 1.3
            else:
                gen = torch.Generator().manual_seed(start_pos + i)
                noise = torch.randn(hidden.shape[-1], generator=gen).to(hidden.dtype)
                out[i] = noise * hidden[i].float().abs().max().to(hidden.dtype)
        return out

    def token(self, token: int, position: int, vocab_size: int) -> int:
        """The token the tail returns for ``position`` (the sampled one unless lying)."""
        if self.mode == "token" and self.hits(position - 1):
            return (token + 1) % vocab_size
        return token
