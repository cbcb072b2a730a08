"""The Llama-family decoder, cut into slices of consecutive layers.

A `ModelSlice` runs layers [start, end) of a model; it owns the embedding when
start == 0 and the final norm + LM head when end == num_layers. One forward
carries several sequences packed along the token axis, each with its own KV
cache and start position, so a node can batch sessions that are at different
positions and lengths: the matrix work runs once on the packed tokens, the
attention runs per sequence against that sequence's cache, or, for a batch
of single decode steps, once over all the sequences' slots of the KV pool.

On CUDA a batch of decode steps replays a captured graph instead (engine/graphs.py,
``ModelSlice.decode_step``: the same operations, padded to fixed shapes, with no host
work inside); everything else runs eagerly.

Batch invariance: a slice whose every matrix product computes each row on its own
(`batch_invariant`, set by the loader for the int4-kernel formats) attends each
position alone, over exactly its keys 0..p, the very call a decode step makes; the
rotary tables are computed per fixed block of positions. A position's outputs are
then bitwise the same however it was batched: one step, a chunk of a prefill, a
replay after a failover, beside other sessions or drafted tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from swarm_node.engine import blockq
from swarm_node.engine.graphs import DecodeGraphs
from swarm_node.engine.kv_cache import KVCache, KVPool
from swarm_node.errors import SliceRangeError
from swarm_proto.model_args import ModelArgs

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class SeqChunk:
    """One sequence's share of a packed forward: `length` tokens from `start_pos`."""

    cache: KVCache
    start_pos: int
    length: int


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.fused = False  # the product it feeds applies it (engine.blockq.BlockLinear.fuse_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return x
        dtype = x.dtype
        if dtype == torch.float32:  # the same arithmetic without the two no-op casts' dispatch
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Linear(nn.Module):
    """nn.Linear's product, with its [out, in] weight stored column-major.

    With few rows, as in decode, the CPU's BLAS then streams the weight instead
    of repacking it at every call: up to twice as fast (docs/engine.md). The
    loader lays the weights out so (`loading._fuse`); moving to a device keeps it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def inv_freq(args: ModelArgs) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim // 2], float32, as transformers computes them."""
    dim = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if args.rope_freq_divisors is not None:
        return inv / torch.tensor(args.rope_freq_divisors, dtype=torch.float32)
    s = args.rope_scaling
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


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [T, D] with its first half negated: transformers' ``rotate_half(x) * sin``
    (``cat(-x2, x1) * sin``) equals ``x.roll(D / 2, -1) * signed_sin(sin)`` bit for bit (negation is exact), one
    operation per layer instead of three (`apply_rotary`)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_s: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (transformers' rotary, same bits) for x
    [T, H, D], cos and `signed_sin` [T, 1, D]."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_s


_ROTARY_BLOCK = 256  # positions whose cos/sin are computed by one call


class Rotary(nn.Module):
    """cos/sin tables for explicit positions, computed in float32 as transformers does.

    The tables are kept for the positions seen so far (bounded by the caches' max
    length), grown one block of `_ROTARY_BLOCK` positions at a time: a position's
    values never depend on which other positions a forward carries (a vectorized
    cos and its scalar tail may differ in the last bit)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq(args), persistent=False)
        # (inv_freq they were made from, cos [P, D], signed_sin [P, D]) in float32
        self._tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def forward(self, positions: torch.Tensor, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, `signed_sin` [T, D] for `positions` [T] on the device, all below `end`."""
        tables = self._tables
        if tables is None or tables[0] is not self.inv_freq or tables[1].shape[0] < end:
            tables = self._tables = self._grow(tables, end)
        _, cos, sin = tables
        return cos[positions].to(dtype), sin[positions].to(dtype)

    def reserve(self, end: int) -> None:
        """Make the tables cover positions [0, end) now (a captured graph reads them in place)."""
        tables = self._tables
        if tables is None or tables[0] is not self.inv_freq or tables[1].shape[0] < end:
            self._tables = self._grow(tables, end)

    def address(self) -> int:
        """Where the cos table lives (0 before any): it moves when the tables grow."""
        return 0 if self._tables is None else self._tables[1].data_ptr()

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, `signed_sin` [T, D] for positions already covered (`reserve`), with no host work."""
        assert self._tables is not None
        _, cos, sin = self._tables
        return cos[positions].to(dtype), sin[positions].to(dtype)

    def _grow(self, tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, end: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inv = self.inv_freq
        cos, sin = ([tables[1]], [tables[2]]) if tables is not None and tables[0] is inv else ([], [])
        for first in range(sum(c.shape[0] for c in cos), max(end, 1), _ROTARY_BLOCK):
            pos = torch.arange(first, first + _ROTARY_BLOCK, device=inv.device)
            freqs = pos[:, None].float() * inv[None, :]  # [B, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [B, D]
            cos.append(emb.cos())
            sin.append(signed_sin(emb.sin()))
        return inv, torch.cat(cos), torch.cat(sin)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        c = args.hidden_size
        # q, k and v share one matrix: one product per layer instead of three.
        self.wqkv: nn.Module = Linear(c, args.q_size + 2 * args.kv_size, bias=args.attention_bias)
        self.wo: nn.Module = Linear(args.q_size, c)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer: int,
        seqs: Sequence[SeqChunk],
        decode: DecodeBatch | None,
        each: bool = False,
    ) -> torch.Tensor:
        a = self.args
        t = x.shape[0]
        qk, v = self.wqkv(x).split([a.q_size + a.kv_size, a.kv_size], dim=-1)  # [T, (H + Hkv) D], [T, Hkv D]
        # q and k rotated together: one rotary instead of two (elementwise, same bits)
        qk = apply_rotary(qk.view(t, a.num_heads + a.num_kv_heads, a.head_dim), cos[:, None, :], sin[:, None, :])
        q, k = qk.split([a.num_heads, a.num_kv_heads], dim=1)  # [T, H, D], [T, Hkv, D]
        v = v.view(t, a.num_kv_heads, a.head_dim)
        groups = a.num_heads // a.num_kv_heads

        attend = _attend_each if each else _attend
        if decode is not None:
            out = _attend_decode(q, k, v, layer, decode, groups)
        elif len(seqs) == 1:  # no packing: the result is the output
            seq = seqs[0]
            keys, values = seq.cache.write(layer, seq.start_pos, k, v)  # [P, Hkv, D]
            out = attend(q, keys, values, seq.start_pos, groups)
        else:
            out = torch.empty_like(q)  # [T, H, D]
            offset = 0
            for seq in seqs:
                sl = slice(offset, offset + seq.length)
                keys, values = seq.cache.write(layer, seq.start_pos, k[sl], v[sl])  # [P, Hkv, D]
                out[sl] = attend(q[sl], keys, values, seq.start_pos, groups)
                offset += seq.length
        return self.wo(out.reshape(t, a.q_size))


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, groups: int, causal: bool = False
) -> torch.Tensor:
    """SDPA over [B, H*, S, D] tensors, with grouped KV heads."""
    if groups > 1 and not _SDPA_HAS_GQA:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=groups > 1)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, groups: int) -> torch.Tensor:
    """Causal attention of q [n, H, D] at [start_pos, start_pos + n) over k, v [start_pos + n, Hkv, D]."""
    n, total = q.shape[0], k.shape[0]
    mask = None
    if n > 1 and start_pos > 0:
        # Query i sees keys 0..start_pos + i: a causal mask aligned to the bottom right.
        mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n)
    # From position 0 the plain causal flag does it, and picks the kernel transformers runs.
    causal = n > 1 and start_pos == 0
    out = _sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask, groups, causal)
    return out[0].transpose(0, 1)  # [n, H, D]


def _attend_each(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, groups: int) -> torch.Tensor:
    """`_attend`, one query at a time over exactly its keys: each position's result is
    the one a decode step at that position computes, bit for bit (a causal kernel's
    blocking over queries and keys would make it depend on the chunk's size)."""
    if q.shape[0] == 1:
        return _attend_one(q, k, v, start_pos, groups)
    out = torch.empty_like(q)  # [n, H, D]
    for i in range(q.shape[0]):
        end = start_pos + i + 1
        out[i : i + 1] = _attend_one(q[i : i + 1], k[:end], v[:end], start_pos + i, groups)
    return out


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int, groups: int) -> torch.Tensor:
    """One query over all of k, v: the CPU kernel's (engine.blockq.attend_one) where it
    takes the tensors, else SDPA's."""
    out = blockq.attend_one(q, k, v)
    return out if out is not None else _attend(q, k, v, start_pos, groups)


@dataclass
class DecodeBatch:
    """One new position for each of several sequences whose caches share a pool."""

    pool: KVPool
    slots: list[int]  # empty in a captured graph: the slots are known on the device only
    slot_index: torch.Tensor  # [B] on the device
    positions: torch.Tensor  # [B] on the device
    length: int  # keys to attend to: the longest sequence's
    mask: torch.Tensor | None  # [B, 1, 1, length], None when all are equally long

    @staticmethod
    def of(seqs: Sequence[SeqChunk], positions: torch.Tensor) -> DecodeBatch | None:
        if len(seqs) < 2 or any(s.length != 1 for s in seqs):
            return None
        pool = seqs[0].cache.pool
        if pool is None or any(s.cache.pool is not pool for s in seqs):
            return None
        device = positions.device
        slots = [s.cache.slot for s in seqs]
        ends = [s.start_pos + 1 for s in seqs]
        mask = None
        if min(ends) != max(ends):
            mask = (torch.arange(max(ends), device=device)[None, :] < to_device(ends, device)[:, None])[:, None, None, :]
        return DecodeBatch(pool, slots, to_device(slots, device), positions, max(ends), mask)


def _attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, batch: DecodeBatch, groups: int) -> torch.Tensor:
    """q, k, v [B, H*, D] of one new position per sequence: one store, one read and one
    attention call for the whole batch (shorter sequences' extra keys masked out)."""
    batch.pool.write_decode(layer, batch.slot_index, batch.positions, k, v)
    keys, values = batch.pool.gather(layer, batch.slots, batch.slot_index, batch.length)  # [B, P, Hkv, D]
    out = _sdpa(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), batch.mask, groups)  # [B, H, 1, D]
    return out[:, :, 0]  # [B, H, D]


def to_device(values: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Small int64 index data on `device`; on CUDA the copy is queued, so the host
    goes on launching kernels instead of waiting for the ones already queued."""
    t = torch.as_tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.hidden = args.intermediate_size
        self.w13: nn.Module = Linear(args.hidden_size, 2 * args.intermediate_size)  # gate ++ up
        self.w2: nn.Module = Linear(args.intermediate_size, args.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer: int,
        seqs: Sequence[SeqChunk],
        decode: DecodeBatch | None,
        each: bool = False,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, layer, seqs, decode, each)
        return h + self.feed_forward(self.ffn_norm(h))


class ModelSlice(nn.Module):
    """Layers [start, end) of a model, plus the embedding and/or head at the ends."""

    def __init__(self, args: ModelArgs, start: int, end: int) -> None:
        super().__init__()
        check_range(args, start, end)
        self.args, self.start, self.end = args, start, end
        self.rotary = Rotary(args)
        self.layers = nn.ModuleList(Block(args) for _ in range(start, end))
        # embedding: [V] ids -> [V, C]; head: [T, C] -> [T, V] (quantized modules may stand in)
        self.embed_tokens: nn.Module | None = nn.Embedding(args.vocab_size, args.hidden_size) if self.is_head else None
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps) if self.is_tail else None
        self.lm_head: nn.Module | None = Linear(args.hidden_size, args.vocab_size) if self.is_tail else None
        self._pool: KVPool | None = None
        # Decode steps from CUDA graphs (engine/graphs.py): "auto" captures them on CUDA,
        # "off" never, "fake" runs the same path without capture (CPU tests).
        self.graph_mode = "auto"
        self._graphs: DecodeGraphs | None = None
        # Every product computes each row on its own (the loader decides): then positions
        # are attended one by one too, and outputs do not depend on the batch (module doc).
        self.batch_invariant = False

    @property
    def is_head(self) -> bool:
        return self.start == 0

    @property
    def is_tail(self) -> bool:
        return self.end == self.args.num_layers

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def device(self) -> torch.device:
        return self.rotary.inv_freq.device

    @property
    def dtype(self) -> torch.dtype:
        # The first parameter (what next(self.parameters()) finds, without walking the
        # module tree on every step): the first layer's attention norm.
        return self.layers[0].attention_norm.weight.dtype

    def new_cache(self, max_length: int) -> KVCache:
        """A KV cache for one sequence, in this slice's pool (see swarm_node.engine.kv_cache)."""
        if self._pool is None:
            a = self.args
            self._pool = KVPool(self.num_layers, a.num_kv_heads, a.head_dim, dtype=self.dtype, device=self.device)
        return self._pool.allocate(max_length)

    def decode_graphs(self) -> DecodeGraphs | None:
        """The slice's graph runner per ``graph_mode`` (made on first use), or None."""
        mode = self.graph_mode
        if mode == "off" or (mode == "auto" and self.device.type != "cuda"):
            return None  # captured graphs are kept for when the mode is back
        fake = mode == "fake"
        if self._graphs is None or self._graphs.fake != fake:
            self._graphs = DecodeGraphs(self, fake=fake)
        return self._graphs

    def decode_step(
        self, x: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decode position for each row, every input on the device and no host sync
        (what a CUDA graph captures): x [B] ids or [B, C] hidden states at ``positions``
        [B] of the pool's ``slots`` [B], attending over each slot's first ``length``
        keys, those past the row's position masked. Returns (hidden [B, C], logits [B, V]
        float32 at the tail, else None). The caches' lengths are the caller's to update."""
        pool = self._pool
        assert pool is not None
        h = self.embed_tokens(x) if self.embed_tokens is not None else x.to(self.dtype)  # [B, C]
        cos, sin = self.rotary.lookup(positions, h.dtype)
        keys = torch.arange(length, device=positions.device)
        mask = (keys[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, length]
        decode = DecodeBatch(pool, [], slots, positions, length, mask)
        for i, block in enumerate(self.layers):
            h = block(h, cos, sin, i, (), decode)
        if self.norm is None or self.lm_head is None:
            return h, None
        return h, self.lm_head(self.norm(h)).float()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, seqs: Sequence[SeqChunk], *, all_logits: bool = False) -> torch.Tensor:
        """Run the packed chunks through this slice.

        x: int64 token ids [T] at the head, hidden states [T, C] elsewhere, where
        T is the sum of the chunks' lengths and the chunks lie in order.
        Returns hidden states [T, C], or at the tail logits [len(seqs), V] of
        each chunk's last position ([T, V] with all_logits).
        """
        h, logits = self.run(x, seqs, all_logits=all_logits)
        return h if logits is None else logits

    @torch.inference_mode()
    def run(
        self, x: torch.Tensor, seqs: Sequence[SeqChunk], *, all_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward``, also returning the blocks' output hidden states [T, C] at the
        tail (what a spot check's commitment covers): (hidden, logits or None)."""
        total = sum(s.length for s in seqs)
        if x.shape[0] != total:
            raise ValueError(f"{x.shape[0]} inputs for chunks totalling {total} positions")
        for s in seqs:
            s.cache.check(s.start_pos, s.length)
        graphs = self.decode_graphs()
        if graphs is not None and graphs.applies(seqs, all_logits):
            out = graphs.run(x, seqs)
            if out is not None:
                return out
        positions = to_device(torch.cat([torch.arange(s.start_pos, s.start_pos + s.length) for s in seqs]), self.device)

        h = self.embed_tokens(x) if self.embed_tokens is not None else x.to(self.dtype)  # [T, C]
        cos, sin = self.rotary(positions, max((s.start_pos + s.length for s in seqs), default=0), h.dtype)
        each = self.batch_invariant
        decode = None if each else DecodeBatch.of(seqs, positions)
        for i, block in enumerate(self.layers):
            h = block(h, cos, sin, i, seqs, decode, each)
        for s in seqs:
            s.cache.length = s.start_pos + s.length

        if self.norm is None or self.lm_head is None:
            return h, None
        out = h
        if not all_logits:
            last = torch.tensor([s.length for s in seqs]).cumsum(0) - 1
            out = h[to_device(last, self.device)]
        return h, self.lm_head(self.norm(out)).float()


def check_range(args: ModelArgs, start: int, end: int) -> None:
    if not 0 <= start < end <= args.num_layers:
        raise SliceRangeError(
            f"layer range [{start}, {end}) is not inside the model's {args.num_layers} layers"
        )
