"""
The errors the Message Batches calls raise, batchd's own rather than the SDK's.

Importing ``anthropic`` costs ~90 MB and ~2 s (2.x builds every pydantic type at
import), more than the whole engine's working set, so the engine speaks HTTP
itself and raises these. They carry what the SDK's ``APIStatusError`` carries
and callers read (status, ``error.type``, ``error.details.error_code``, the
message, ``request-id``, the response headers for ``retry-after``); the classes
follow the SDK's status mapping, which tests/test_api_client.py checks against
the SDK's own ``make_status_error`` so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

__all__ = (
    "ApiConnectionError",
    "ApiError",
    "ApiStatusError",
    "ApiTimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "ContentTooLargeError",
    "InternalServerError",
    "NotFoundError",
    "PaymentRequiredError",
    "PermissionDeniedError",
    "RateLimitedError",
    "ResultsNotReady",
    "status_error",
)


class ApiError(Exception):
    """Any failed call to the API: no answer, or an answer that is an error."""


class ApiConnectionError(ApiError):
    """No HTTP answer (refused, reset, DNS, TLS): whether the call took effect is unknown."""


class ApiTimeoutError(ApiConnectionError):
    """The call timed out: as with a lost connection, it may or may not have taken effect."""


class ResultsNotReady(ApiError):
    """A batch has no ``results_url`` yet (it has not ended)."""


class ApiStatusError(ApiError):
    """A 4xx/5xx answer. ``status_code`` and ``error_code`` are stable; the message is not."""

    def __init__(self, status_code: int, body: Any, headers: Mapping[str, str]) -> None:
        self.status_code = status_code
        self.body = body
        self.headers: Mapping[str, str] = headers
        error = body.get("error") if isinstance(body, dict) else None
        error = error if isinstance(error, dict) else {}
        details = error.get("details")
        self.details: dict[str, Any] | None = details if isinstance(details, dict) else None
        code = self.details.get("error_code") if self.details else None
        self.error_code: str | None = code if isinstance(code, str) else None
        kind = error.get("type")
        self.type: str | None = kind if isinstance(kind, str) else None
        message = error.get("message")
        self.api_message: str | None = message if isinstance(message, str) else None
        self.request_id: str | None = headers.get("request-id")
        super().__init__(f"Error code: {status_code} - {body}")


class BadRequestError(ApiStatusError):
    """400"""


class AuthenticationError(ApiStatusError):
    """401"""


class PaymentRequiredError(ApiStatusError):
    """402"""


class PermissionDeniedError(ApiStatusError):
    """403"""


class NotFoundError(ApiStatusError):
    """404: also a known transient just after a batch is created or ends."""


class ConflictError(ApiStatusError):
    """409"""


class ContentTooLargeError(ApiStatusError):
    """413"""


class RateLimitedError(ApiStatusError):
    """429: a rate, ramp, queue or spend limit (``error_code`` tells which)."""


class InternalServerError(ApiStatusError):
    """5xx, including 529 overloaded."""


_BY_STATUS: dict[int, type[ApiStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: PaymentRequiredError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: ContentTooLargeError,
    429: RateLimitedError,
}


def status_error(status_code: int, content: bytes, headers: Mapping[str, str]) -> ApiStatusError:
    """The error for an answer's status; the body is kept parsed if it is JSON, else as text."""
    body: Any
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        body = content.decode("utf-8", "replace").strip()
    cls = _BY_STATUS.get(status_code) or (
        InternalServerError if status_code >= 500 else ApiStatusError)
    return cls(status_code, body, headers)
