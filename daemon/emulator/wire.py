"""
The API's wire conventions: error shape, ids, timestamps, JSON responses.

Kept in one place so every handler answers exactly like the real API does and
a test that checks one error shape checks them all.
"""

from __future__ import annotations

import secrets
import string
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

__all__ = (
    "ERROR_STATUS",
    "ApiError",
    "error_body",
    "json_response",
    "new_id",
    "retry_after_header",
    "rfc3339",
)

#: The API's error type for each status the emulator answers with.
ERROR_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

_ALPHABET = string.ascii_letters + string.digits


class ApiError(Exception):
    """
    An answer in the API's error shape; raised by handlers, rendered by the middleware.

    ``error_code`` becomes ``error.details.error_code``, which is what the SDK
    picks its exception class by (with the status).
    """

    def __init__(
        self,
        error_type: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        status: int | None = None,
        error_code: str | None = None,
    ):
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.status = status if status is not None else ERROR_STATUS[error_type]
        self.headers = headers or {}
        self.error_code = error_code


def new_id(prefix: str) -> str:
    """An id in the API's style, e.g. ``msgbatch_01Ab…`` or ``req_01…``."""
    return prefix + "01" + "".join(secrets.choice(_ALPHABET) for _ in range(22))


def rfc3339(timestamp: float | None) -> str | None:
    """A Unix time as the API's RFC 3339 string (UTC, microseconds, ``Z``)."""
    if timestamp is None:
        return None
    text = datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


def error_body(
    error_type: str, message: str, request_id: str, error_code: str | None = None
) -> dict[str, Any]:
    """The API's error object; ``details`` only when there is a code, as the API sends it."""
    error: dict[str, Any] = {"type": error_type, "message": message}
    if error_code is not None:
        error["details"] = {"error_code": error_code}
    return {"type": "error", "error": error, "request_id": request_id}


def json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response serialised with orjson."""
    return web.Response(
        body=orjson.dumps(payload),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def retry_after_header(seconds: float) -> str:
    """
    A ``retry-after`` value: whole seconds as the API sends them.

    A fraction (a test asking for 0.1 s) is sent as a decimal; the SDK accepts it.
    """
    if seconds == int(seconds):
        return str(int(seconds))
    return f"{seconds:g}"
