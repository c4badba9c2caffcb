"""
Where each result goes, decided on the *inner* error type.

A results line reads ``result.error.error.type``; the outer
``result.error.type`` is always ``"error"``, and code that tests it retries
everything forever. The lists are DESIGN.md's: permanent errors are never
resent unchanged; anything unknown is treated as transient (bounded by
``max_attempts``), because a new error type is far more likely a new kind of
overload than a new kind of bad request.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

__all__ = ("PAUSING", "PERMANENT", "Route", "error_of", "route")

PERMANENT = frozenset(
    {
        "invalid_request_error",
        "not_found_error",
        "permission_error",
        "request_too_large",
    }
)
PAUSING = frozenset({"billing_error", "authentication_error"})


class Route(StrEnum):
    SUCCEEDED = "succeeded"
    DEAD = "dead"  # permanent: dead-letter at once
    RETRY = "retry"  # transient: a retry chunk, attempt + 1, bounded
    PAUSE = "pause"  # billing/auth: keep the row, pause the pipeline, alarm


def error_of(result: dict[str, Any]) -> tuple[str, str]:
    """``(type, message)`` of a result that did not succeed."""
    kind = result.get("type")
    if kind == "errored":
        outer = result.get("error") or {}
        inner = outer.get("error") if isinstance(outer, dict) else None
        if isinstance(inner, dict):
            return str(inner.get("type") or "unknown_error"), str(inner.get("message") or "")
        return "unknown_error", str(outer)
    if kind in ("expired", "canceled"):
        return str(kind), f"request {kind} before it was processed"
    return "unknown_result", f"unknown result type {kind!r}"


def route(result: dict[str, Any]) -> tuple[Route, str | None, str | None]:
    """The route for one ``result`` object, with the error type and message when not a success."""
    if result.get("type") == "succeeded":
        return Route.SUCCEEDED, None, None
    error_type, message = error_of(result)
    if error_type in PERMANENT:
        return Route.DEAD, error_type, message
    if error_type in PAUSING:
        return Route.PAUSE, error_type, message
    return Route.RETRY, error_type, message
