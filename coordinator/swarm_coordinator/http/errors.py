"""Errors answered in OpenAI's shape, and the translation of the client library's errors.

``{"error": {"message", "type", "param", "code"}}`` with OpenAI's status codes (see
:mod:`swarm_coordinator.http.openai_api` for the table).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

from swarm_client.errors import (
    BusyError,
    GenerationError,
    InvalidRequestError,
    ModelUnavailableError,
    SwarmError,
    TokenizerError,
)
from swarm_coordinator.errors import CoordinatorError
from swarm_coordinator.http.queue import QueueBusy

log = logging.getLogger(__name__)

__all__ = ["OpenAIError", "busy", "invalid", "translate"]


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def busy(message: str, retry_after: str) -> OpenAIError:
    """Overload: 429 with ``Retry-After``, as OpenAI (and vLLM, TGI) answer it; never a 5xx."""
    return OpenAIError(
        429,
        f"{message} (Retry-After {retry_after} s)",
        type="server_overloaded",
        code="server_overloaded",
        headers={"Retry-After": retry_after},
    )


def translate(exc: BaseException) -> OpenAIError:
    """The HTTP answer for an exception raised while generating."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        code = "context_length_exceeded" if "context" in str(exc) else None
        return invalid(str(exc), code=code)
    if isinstance(exc, TokenizerError):
        return invalid(str(exc))
    if isinstance(exc, QueueBusy):
        return busy(str(exc), exc.retry_after_header)
    if isinstance(exc, BusyError):
        return busy(f"the swarm is busy: {exc}", str(max(1, math.ceil(exc.retry_after))))
    if isinstance(exc, (ModelUnavailableError, CoordinatorError)):
        return OpenAIError(503, f"the swarm cannot serve this request now: {exc}", type="server_error", code="unavailable")
    if isinstance(exc, (GenerationError, SwarmError)):
        return OpenAIError(503, f"generation failed: {exc}", type="server_error", code="generation_failed")
    log.error("unexpected error while generating", exc_info=exc)
    return OpenAIError(500, "internal error in the gateway (see its log)", type="server_error")
