"""Errors answered in OpenAI's shape, and the translation of the client library's errors.

``{"error": {"message", "type", "param", "code"}}`` with OpenAI's status codes (see
:mod:`swarm_coordinator.http.openai_api` for the table).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from starlette.responses import JSONResponse

from swarm_client.errors import GenerationError, InvalidRequestError, ModelUnavailableError, SwarmError, TokenizerError
from swarm_coordinator.errors import CoordinatorError

log = logging.getLogger(__name__)

__all__ = ["OpenAIError", "invalid", "translate"]


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


def translate(exc: BaseException) -> OpenAIError:
    """The HTTP answer for an exception raised while generating."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        code = "context_length_exceeded" if "context" in str(exc) else None
        return invalid(str(exc), code=code)
    if isinstance(exc, TokenizerError):
        return invalid(str(exc))
    if isinstance(exc, (ModelUnavailableError, CoordinatorError)):
        return OpenAIError(503, f"the swarm cannot serve this request now: {exc}", type="server_error", code="unavailable")
    if isinstance(exc, (GenerationError, SwarmError)):
        return OpenAIError(503, f"generation failed: {exc}", type="server_error", code="generation_failed")
    log.error("unexpected error while generating", exc_info=exc)
    return OpenAIError(500, "internal error in the gateway (see its log)", type="server_error")
