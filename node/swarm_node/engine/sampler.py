"""Deterministic token sampling for the tail of a route.

The random draw for the token at sequence position ``p`` depends only on
``(seed, p)``: a counter-based hash (splitmix64) turns the pair into one uniform
number ``u`` in [0, 1), and the token is the inverse CDF of the processed
distribution at ``u`` (token ids in vocabulary order, probabilities in float64).
No generator state is carried between steps, so any tail node -- or a replay after
failover -- produces the same token for the same logits, whatever else is in the
batch.

``position`` is the index the sampled token will occupy in the sequence, i.e. the
number of tokens (prompt + generated) before it.

Logits are processed in the order Hugging Face applies them: repetition penalty,
temperature, top-k, top-p. ``temperature == 0`` is greedy (argmax after the
repetition penalty; top-k and top-p do not matter then). The returned logprob is
the log-probability of the chosen token under the model's raw distribution
(``log_softmax`` of the unprocessed logits), which is what a client asking for
logprobs usually wants to see.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, cast, overload

import torch

from swarm_proto.wire import SamplingParams

__all__ = [
    "Sample",
    "BatchSample",
    "sample",
    "uniform",
    "apply_repetition_penalty",
    "apply_top_k",
    "apply_top_p",
]

_MASK64 = (1 << 64) - 1


class Sample(NamedTuple):
    token: int
    logprob: float


class BatchSample(NamedTuple):
    tokens: torch.Tensor  # [N] int64
    logprobs: torch.Tensor  # [N] float32


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, position: int) -> float:
    """The uniform draw in [0, 1) for ``(seed, position)``; a pure function."""
    h = _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64))
    return (h >> 11) * (1.0 / (1 << 53))


# --- logits processors (HF semantics, per-row parameters) --------------------------


def _history_mask(histories: Sequence[Sequence[int] | torch.Tensor], vocab: int, device: torch.device) -> torch.Tensor:
    """[N, V] bool: token v occurs in row n's history."""
    mask = torch.zeros(len(histories), vocab, dtype=torch.bool, device=device)
    for row, hist in enumerate(histories):
        ids = torch.as_tensor(hist, dtype=torch.int64, device=device).reshape(-1)
        if ids.numel():
            mask[row, ids] = True
    return mask


def apply_repetition_penalty(
    logits: torch.Tensor,
    histories: Sequence[Sequence[int] | torch.Tensor],
    penalties: torch.Tensor | float,
) -> torch.Tensor:
    """HF's RepetitionPenaltyLogitsProcessor: over tokens seen in the history, divide
    positive logits by the penalty and multiply negative ones. ``logits`` is [N, V]."""
    pen = torch.as_tensor(penalties, dtype=logits.dtype, device=logits.device).reshape(-1, 1)  # [N|1, 1]
    seen = _history_mask(histories, logits.shape[-1], logits.device)  # [N, V]
    penalised = torch.where(logits < 0, logits * pen, logits / pen)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor | int) -> torch.Tensor:
    """HF's TopKLogitsWarper with per-row k (0 = off): keep every logit >= the k-th largest."""
    vocab = logits.shape[-1]
    k = torch.as_tensor(top_k, dtype=torch.int64, device=logits.device).reshape(-1)  # [N|1]
    k = k.clamp(max=vocab).expand(logits.shape[0])  # [N]
    kmax = int(k.max())
    if kmax == 0:
        return logits
    top = torch.topk(logits, kmax, dim=-1).values  # [N, kmax]
    kth = top.gather(-1, (k - 1).clamp(min=0).unsqueeze(-1))  # [N, 1]
    kth = kth.masked_fill((k == 0).unsqueeze(-1), float("-inf"))  # rows with k == 0 keep all
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor | float) -> torch.Tensor:
    """HF's TopPLogitsWarper with per-row p (1.0 = off): drop the lowest-probability
    tokens whose cumulative probability stays <= 1 - p, always keeping the top one."""
    p = torch.as_tensor(top_p, dtype=logits.dtype, device=logits.device).reshape(-1, 1)  # [N|1, 1]
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)  # [N, V]
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [N, V]
    remove_sorted = cum <= (1 - p)
    remove_sorted[..., -1:] = False
    remove_sorted &= p < 1.0  # rows with p == 1 keep everything, as HF skips the warper
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


# --- sampling ------------------------------------------------------------------------


def _as_rows(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    rows = list(params)
    if len(rows) != n:
        raise ValueError(f"got {len(rows)} sampling params for {n} rows")
    return rows


def _sample_rows(
    logits: torch.Tensor,
    rows: list[SamplingParams],
    positions: Sequence[int],
    histories: Sequence[Sequence[int] | torch.Tensor] | None,
) -> BatchSample:
    n, vocab = logits.shape
    device = logits.device
    logits = logits.float()  # [N, V]
    raw_logprobs = torch.log_softmax(logits, dim=-1)  # [N, V]

    scores = logits
    penalties = [r.repetition_penalty for r in rows]
    if histories is not None and any(pen != 1.0 for pen in penalties):
        if len(histories) != n:
            raise ValueError(f"got {len(histories)} histories for {n} rows")
        scores = apply_repetition_penalty(scores, histories, torch.tensor(penalties))

    tokens = scores.argmax(dim=-1)  # [N]
    if not all(r.greedy for r in rows):  # decided on the host: no wait for the device
        greedy = torch.tensor([r.greedy for r in rows], device=device)  # [N]
        temps = torch.tensor([r.temperature if not r.greedy else 1.0 for r in rows], device=device)
        scores = scores / temps.unsqueeze(-1)
        if any(r.top_k > 0 for r in rows):
            scores = apply_top_k(scores, torch.tensor([r.top_k for r in rows], device=device))
        if any(r.top_p < 1.0 for r in rows):
            scores = apply_top_p(scores, torch.tensor([r.top_p for r in rows], device=device))
        # float64 so that the CDF of a row is the same whatever the batch and device.
        probs = torch.softmax(scores.double(), dim=-1)  # [N, V]
        cdf = probs.cumsum(dim=-1)  # [N, V]
        u = torch.tensor(
            [uniform(r.seed, pos) for r, pos in zip(rows, positions)], dtype=torch.float64, device=device
        )  # [N]
        target = (u * cdf[:, -1]).unsqueeze(-1)  # [N, 1]
        drawn = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # [N]
        # u*total may round up to total: fall back to the last token with mass.
        last_live = (vocab - 1) - (probs > 0).flip(-1).int().argmax(dim=-1)  # [N]
        drawn = torch.minimum(drawn, last_live)
        tokens = torch.where(greedy, tokens, drawn)

    logprobs = raw_logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [N]
    return BatchSample(tokens=tokens.to(torch.int64), logprobs=logprobs)


@overload
def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    position: int,
    history: Sequence[int] | torch.Tensor | None = None,
) -> Sample: ...


@overload
def sample(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    position: Sequence[int],
    history: Sequence[Sequence[int] | torch.Tensor] | None = None,
) -> BatchSample: ...


def sample(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    position: int | Sequence[int],
    history: Sequence[int] | torch.Tensor | Sequence[Sequence[int] | torch.Tensor] | None = None,
) -> Sample | BatchSample:
    """Pick the next token(s).

    ``logits`` [V] with one ``SamplingParams``, an int ``position`` and one history
    returns a ``Sample(token, logprob)``. ``logits`` [N, V] with one or N params,
    N positions and N histories returns a ``BatchSample`` of [N] tensors.
    ``history`` (the tokens so far, prompt included) is only read for the
    repetition penalty and may be None when no row uses one.
    """
    if logits.dim() == 1:
        if not isinstance(params, SamplingParams) or not isinstance(position, int):
            raise TypeError("1-D logits take one SamplingParams and an int position")
        hist = None if history is None else [cast("Sequence[int] | torch.Tensor", history)]
        out = _sample_rows(logits.unsqueeze(0), [params], [position], hist)
        return Sample(token=int(out.tokens[0]), logprob=float(out.logprobs[0]))
    if logits.dim() != 2:
        raise ValueError(f"logits must be [V] or [N, V], got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if isinstance(position, int):
        raise TypeError("batched logits take one position per row")
    positions = list(position)
    if len(positions) != n:
        raise ValueError(f"got {len(positions)} positions for {n} rows")
    histories = None if history is None else list(cast("Sequence[Sequence[int] | torch.Tensor]", history))
    return _sample_rows(logits, _as_rows(params, n), positions, histories)
