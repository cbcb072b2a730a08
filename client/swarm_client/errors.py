"""Errors raised by the client package.

    SwarmError
    ├── InvalidRequestError   bad sampling options, empty or too long prompt
    ├── ModelUnavailableError the model cannot be found or loaded (run `swarm model pull`)
    ├── TokenizerError        no tokenizer for the source, or no chat template
    ├── ContentPolicyError    a gateway's acceptable-use policy refused the prompt or
    │                         stopped the completion (``rule``, ``stage``, ``text``)
    └── GenerationError       generation failed while running
        └── BusyError         the swarm had no room within the caller's wait (retry later)

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
    "BusyError",
    "ContentPolicyError",
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


class BusyError(GenerationError):
    """No room for the generation in time: every route was busy (full, not failed).

    ``retry_after`` is the swarm's hint of when room is expected, in seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ContentPolicyError(SwarmError):
    """A gateway's acceptable-use policy refused the prompt (``stage == "prompt"``, HTTP
    400 ``content_policy_violation``) or stopped the completion (``stage ==
    "completion"``, ``finish_reason`` ``content_filter``). ``rule`` is the rule's id;
    ``text`` what the gateway sent before it stopped ("" for a prompt)."""

    def __init__(self, message: str, rule: str, stage: str, text: str = "") -> None:
        super().__init__(message)
        self.rule = rule
        self.stage = stage
        self.text = text
