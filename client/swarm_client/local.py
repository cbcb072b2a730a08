"""The in-process backend: the whole model in this process, one token at a time.

``LocalBackend`` is a ``TokenSource`` (see ``swarm_client.types``): it prefills the
prompt into a fresh KV cache, then samples and feeds back one token per step with
the same sampler the swarm's tail runs, so a local run and a swarm run with the
same seed produce the same tokens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from swarm_client.errors import GenerationError, ModelUnavailableError
from swarm_client.types import SampledToken

if TYPE_CHECKING:
    import torch

    from swarm_node.engine.model import ModelSlice
    from swarm_proto.wire import SamplingParams

__all__ = ["LocalBackend"]

logger = logging.getLogger(__name__)


class LocalBackend:
    """All layers of a model in this process."""

    def __init__(self, model: ModelSlice, source: str = "") -> None:
        if not (model.is_head and model.is_tail):
            raise ValueError("a local backend needs the whole model (layers [0, num_layers))")
        self.model = model
        self.source = source

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
    ) -> LocalBackend:
        """Load every layer of ``model`` (a path, a known name, or None for the default)."""
        try:
            import torch

            from swarm_node.engine.loading import load_slice
            from swarm_node.errors import SwarmNodeError
        except ImportError as exc:
            raise ModelUnavailableError(
                f'running the model in this process needs the engine: pip install "llama-swarm[node]" ({exc})'
            ) from exc
        from swarm_proto.errors import SwarmProtoError
        from swarm_proto.model_args import DTYPE_BYTES, read_args
        from swarm_proto.store import resolve_model

        torch_dtype = getattr(torch, dtype) if dtype in DTYPE_BYTES else dtype
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPE_BYTES)})")
        try:
            path = resolve_model(None if model is None else os.fspath(model))
            args = read_args(path)
            logger.info("loading %s (%d layers) as %s on %s", path, args.num_layers, torch_dtype, device)
            model_slice = load_slice(path, 0, args.num_layers, dtype=torch_dtype, device=device)
        except (SwarmNodeError, SwarmProtoError, OSError) as exc:
            raise ModelUnavailableError(str(exc)) from exc
        return cls(model_slice, source=str(path))

    @property
    def max_context(self) -> int:
        return int(self.model.args.max_position_embeddings)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.model.args.eos_token_ids)

    def tokens(
        self, prompt_ids: Sequence[int], params: SamplingParams, max_new_tokens: int
    ) -> Iterator[SampledToken]:
        import torch

        from swarm_node.engine.model import SeqChunk
        from swarm_node.engine.sampler import sample

        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        n = len(prompt_ids)
        if max_new_tokens < 1:
            return
        device = self.model.device
        cache = self.model.new_cache(n + max_new_tokens)
        history = [int(t) for t in prompt_ids]
        wants_history = params.repetition_penalty != 1.0
        x = torch.tensor(history, dtype=torch.int64, device=device)  # [T]
        try:
            with torch.inference_mode():
                logits = self.model(x, [SeqChunk(cache, 0, n)])  # [1, V]
                for step in range(max_new_tokens):
                    position = len(history)
                    token, logprob = sample(logits[0], params, position, history if wants_history else None)
                    history.append(token)
                    yield SampledToken(token_id=token, logprob=logprob)
                    if step + 1 == max_new_tokens:
                        break
                    x = torch.tensor([token], dtype=torch.int64, device=device)
                    logits = self.model(x, [SeqChunk(cache, position, 1)])  # [1, V]
        except (RuntimeError, ValueError) as exc:
            raise GenerationError(f"local generation failed: {exc}") from exc

    def __repr__(self) -> str:
        args: Any = self.model.args
        return f"LocalBackend({self.source or args.name!r}, layers={args.num_layers}, dtype={self.model.dtype})"
