"""Errors raised by the client package.

    SwarmError
    ├── InvalidRequestError   bad sampling options, empty or too long prompt
    ├── ModelUnavailableError the model cannot be found or loaded (run `swarm model pull`)
    ├── TokenizerError        no tokenizer for the source, or no chat template
    └── GenerationError       generation failed while running

Errors from the node package (model files, KV cache) and from transports are
translated at the boundary: ``raise ModelUnavailableError(...) from exc``.
"""

from __future__ import annotations

__all__ = [
    "SwarmError",
    "InvalidRequestError",
    "ModelUnavailableError",
    "TokenizerError",
    "GenerationError",
]


class SwarmError(Exception):
    """Base class of every error the client package raises on purpose."""


class InvalidRequestError(SwarmError, ValueError):
    """The request cannot be served as asked (options out of range, prompt too long)."""


class ModelUnavailableError(SwarmError):
    """The model cannot be found or loaded."""


class TokenizerError(SwarmError):
    """No usable tokenizer (or chat template) for the model."""


class GenerationError(SwarmError):
    """Generation failed after it started."""
