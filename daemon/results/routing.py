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

from batchd.daemon.batches.error_codes import CODES, Action

__all__ = ("PAUSING", "PERMANENT", "Route", "error_of", "route")

PERMANENT = frozenset(
    {
        "invalid_request_error",
        "not_found_error",
        "request_too_large",
    }
)
# Account problems (§6 of the API facts): the row is held and the pipeline paused.
PAUSING = frozenset({"billing_error", "authentication_error", "permission_error"})


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


def _error_code(result: dict[str, Any]) -> str | None:
    """``details.error_code`` of an errored row, when the API sends one (unverified)."""
    outer = result.get("error")
    inner = outer.get("error") if isinstance(outer, dict) else None
    details = inner.get("details") if isinstance(inner, dict) else None
    code = details.get("error_code") if isinstance(details, dict) else None
    return code if isinstance(code, str) else None


def classify_row_code(code: str) -> Route | None:
    """A row's error code that says more than its type: an account pause, or a retry."""
    decision = CODES.get(code)
    if decision is None:
        return None
    if decision.action is Action.PAUSE:
        return Route.PAUSE
    return Route.RETRY


def route(result: dict[str, Any]) -> tuple[Route, str | None, str | None]:
    """The route for one ``result`` object, with the error type and message when not a success."""
    if result.get("type") == "succeeded":
        return Route.SUCCEEDED, None, None
    error_type, message = error_of(result)
    code = _error_code(result)
    if code is not None:
        decided = classify_row_code(code)
        if decided is not None:
            return decided, code, message
    if error_type in PERMANENT:
        return Route.DEAD, error_type, message
    if error_type in PAUSING:
        return Route.PAUSE, error_type, message
    return Route.RETRY, error_type, message
