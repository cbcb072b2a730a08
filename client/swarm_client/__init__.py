"""llama-swarm client: tokenizer, sampling options, generation API and the `swarm` CLI.

Importing this package is cheap: torch and transformers load only when a model
or tokenizer is.
"""

from __future__ import annotations

from swarm_client.api import AsyncSwarmClient, SwarmClient
from swarm_client.errors import (
    ContentPolicyError,
    GenerationError,
    InvalidRequestError,
    ModelUnavailableError,
    SwarmError,
    TokenizerError,
)
from swarm_client.params import SamplingOptions
from swarm_client.types import (
    AsyncTokenSource,
    FinishReason,
    GenerationResult,
    SampledToken,
    StreamEvent,
    Timing,
    TokenSource,
)

__all__ = [
    "AsyncSwarmClient",
    "AsyncTokenSource",
    "ContentPolicyError",
    "FinishReason",
    "GenerationError",
    "GenerationResult",
    "InvalidRequestError",
    "ModelUnavailableError",
    "SampledToken",
    "SamplingOptions",
    "StreamEvent",
    "SwarmClient",
    "SwarmError",
    "Timing",
    "TokenSource",
    "TokenizerError",
]

__version__ = "0.1.0"
