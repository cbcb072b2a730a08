"""Re-cutting a loaded model slice without copying weights.

A node hosts one :class:`ModelSlice` of layers ``[start, end)``. Two things need other
cuts of it, and both are views that share the hosted slice's modules (no tensor is
copied):

- :func:`view`: a session routed through part of the hosted range, ``[a, b)`` inside
  ``[start, end)``, runs only those layers. Its KV cache covers ``b - a`` layers.
- :func:`extend`: a reassignment to ``[s, e)`` reuses the blocks of the layers the node
  keeps and reads only the missing layers from the model files. A session whose
  layers are all kept holds a view made of the very same blocks, so it goes on
  untouched while the new slice serves new sessions; the dropped blocks are freed
  once no session holds them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from swarm_node.engine.loading import load_slice, mark_batch_invariant
from swarm_node.engine.model import ModelSlice, check_range

log = logging.getLogger(__name__)

__all__ = ["compose", "extend", "view"]


def compose(
    like: ModelSlice,
    start: int,
    end: int,
    blocks: list[nn.Module],
    *,
    embed: nn.Module | None,
    norm: nn.Module | None,
    head: nn.Module | None,
) -> ModelSlice:
    """A slice of layers ``[start, end)`` made of existing modules (shared, not copied)."""
    args = like.args
    check_range(args, start, end)
    if len(blocks) != end - start:
        raise ValueError(f"{len(blocks)} blocks for layers [{start}, {end})")
    with torch.device("meta"):  # placeholders, replaced below: nothing is allocated
        out = ModelSlice(args, start, end)
    out.layers = nn.ModuleList(blocks)
    out.rotary = like.rotary
    if out.is_head:
        assert embed is not None, "a head slice needs the embedding"
        out.embed_tokens = embed  # type: ignore[assignment]
    if out.is_tail:
        assert norm is not None and head is not None, "a tail slice needs the final norm and head"
        out.norm = norm  # type: ignore[assignment]
        out.lm_head = head  # type: ignore[assignment]
    mark_batch_invariant(out)
    out.eval()
    return out


def view(model: ModelSlice, start: int, end: int) -> ModelSlice:
    """Layers ``[start, end)`` of ``model`` (which must host them), sharing its modules."""
    if not model.start <= start < end <= model.end:
        raise ValueError(f"[{start}, {end}) is not inside the hosted layers [{model.start}, {model.end})")
    if (start, end) == (model.start, model.end):
        return model
    blocks = list(model.layers[start - model.start : end - model.start])
    return compose(model, start, end, blocks, embed=model.embed_tokens, norm=model.norm, head=model.lm_head)


def extend(
    model: ModelSlice,
    source: str | Path,
    start: int,
    end: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    weights: str = "float",
    kernel_dtype: torch.dtype | None = None,
) -> ModelSlice:
    """Layers ``[start, end)``: blocks ``model`` already holds are reused, the rest are read
    from ``source`` (only their tensors). Runs in a worker thread: it does not touch
    ``model`` beyond reading references to its modules."""
    check_range(model.args, start, end)
    keep_lo, keep_hi = max(start, model.start), min(end, model.end)
    if keep_lo >= keep_hi:
        return load_slice(source, start, end, dtype=dtype, device=device, weights=weights, kernel_dtype=kernel_dtype)
    blocks: list[nn.Module] = []
    embed, norm, head = model.embed_tokens, model.norm, model.lm_head
    if start < keep_lo:
        left = load_slice(source, start, keep_lo, dtype=dtype, device=device, weights=weights, kernel_dtype=kernel_dtype)
        blocks += list(left.layers)
        embed = left.embed_tokens if start == 0 else embed
    blocks += list(model.layers[keep_lo - model.start : keep_hi - model.start])
    if keep_hi < end:
        right = load_slice(source, keep_hi, end, dtype=dtype, device=device, weights=weights, kernel_dtype=kernel_dtype)
        blocks += list(right.layers)
        if right.is_tail:
            norm, head = right.norm, right.lm_head
    log.info(
        "layers [%d, %d) -> [%d, %d): kept [%d, %d), read %d layer(s)",
        model.start, model.end, start, end, keep_lo, keep_hi, (end - start) - (keep_hi - keep_lo),
    )
    return compose(model, start, end, blocks, embed=embed if start == 0 else None, norm=norm, head=head)
