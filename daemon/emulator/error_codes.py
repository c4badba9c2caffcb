"""
The HTTP errors the emulator can answer any /v1 call with, codes and all.

A batch daemon must tell apart a 429 it should retry (a rate limit, a ramp
limit) from one it must not (the tier's spend cap), and a 400 that is its own
mistake from one that says the organisation is on hold. The API tells them
apart by ``error.details.error_code`` (the SDK maps ``(status, code)`` to its
exception classes in ``anthropic/_error_classes.py``) and by ``retry-after``,
so each fault here carries exactly those (shared/BATCHES_API.md §5, §6).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ("HTTP_FAULT_ERRORS", "HttpFault")


def _first_of_next_month(now: float) -> str:
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    year, month = (today.year + 1, 1) if today.month == 12 else (today.year, today.month + 1)
    return dt.date(year, month, 1).isoformat()


@dataclass(frozen=True)
class HttpFault:
    """
    One kind of HTTP error answer.

    ``retry_after`` says whether the answer carries a ``retry-after`` header:
    the API sends one where waiting helps (rate and ramp limits) and not where
    it does not (spend caps, holds, credentials).
    """

    kind: str
    status: int
    error_type: str
    error_code: str | None
    retry_after: bool
    message: Callable[[float], str]


def _fixed(text: str) -> Callable[[float], str]:
    return lambda _now: text


_FAULTS = (
    HttpFault(
        "http429", 429, "rate_limit_error", None, True,
        _fixed("Number of request tokens has exceeded your rate limit"),
    ),
    HttpFault("http500", 500, "api_error", None, False, _fixed("Internal server error")),
    HttpFault("http529", 529, "overloaded_error", None, False, _fixed("Overloaded")),
    HttpFault(
        "spend_limit", 429, "rate_limit_error", "enforced_spend_limit_reached", False,
        lambda now: (
            "Your organization has reached the monthly API usage limit of its tier. "
            f"Access resumes on {_first_of_next_month(now)} at 00:00 UTC, or sooner "
            "after a tier upgrade"
        ),
    ),
    HttpFault(
        "contract_spend_limit", 429, "rate_limit_error", "contract_spend_limit_reached", False,
        _fixed("Your organization has reached the spend limit of its contract"),
    ),
    HttpFault(
        "ramp_limit", 429, "rate_limit_error", "ramp_limit_exceeded", True,
        _fixed(
            "Your usage is growing faster than your ramp limit allows; "
            "retry after the time in the retry-after header"
        ),
    ),
    HttpFault(
        "org_on_hold", 400, "invalid_request_error", "organization_on_hold", False,
        _fixed("This organization has been disabled"),
    ),
    HttpFault(
        "user_spend_limit", 400, "invalid_request_error", None, False,
        lambda now: (
            "You have reached your specified workspace API usage limits. "
            f"You will regain access on {_first_of_next_month(now)} at 00:00 UTC"
        ),
    ),
    HttpFault("http401", 401, "authentication_error", None, False, _fixed("invalid x-api-key")),
    HttpFault(
        "http402", 402, "billing_error", None, False,
        _fixed("Your credit balance is too low to access the Anthropic API"),
    ),
    HttpFault(
        "http403", 403, "permission_error", None, False,
        _fixed("Your API key does not have permission to use the specified resource"),
    ),
)  # fmt: skip

#: Every HTTP fault kind (the `FaultSettings` key) and how it answers.
HTTP_FAULT_ERRORS: dict[str, HttpFault] = {fault.kind: fault for fault in _FAULTS}
