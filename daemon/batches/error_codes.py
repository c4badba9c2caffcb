"""
What an API error means for the pipeline: pause, retry, or give up on the request.

The API names a cause in ``error.details.error_code`` (``ApiStatusError.error_code``,
read from the body as the SDK reads it); the status and the code are stable, the
message is not. A 429 is not one thing: a rate limit or a
full processing queue passes within seconds (retry after ``retry-after``, make
chunks smaller), a ramp limit passes too, but the tier's monthly spend limit
does not lift before the 1st of next month, so retrying it only fills the log.
Such causes **pause** the pipeline with an alarm naming the code and what the
operator must do; nothing already submitted is lost, and ``batchd resume``,
SIGHUP or a restart lifts the pause once the cause is gone. An unknown code
falls back to what its status means, as the SDK does.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from batchd.daemon.batches.api_errors import ApiStatusError

__all__ = (
    "ACCOUNT_ROW_ERRORS",
    "CODES",
    "Action",
    "Decision",
    "classify_error",
    "pause_kind_of_row",
    "retry_after_of",
)


class Action(StrEnum):
    PAUSE = "pause"  # not created; an account problem only the operator can fix
    RETRY = "retry"  # not created; wait (retry-after) and send again
    REJECTED = "rejected"  # not created; the batch itself is wrong: pause, keep the spool
    AMBIGUOUS = "ambiguous"  # may have been created: adopt it if it exists, else send again


@dataclass(frozen=True, slots=True)
class Decision:
    """One error's meaning: the action, the pause kind and alarm, and the operator's fix."""

    action: Action
    code: str  # details.error_code, else the error type, else the status
    kind: str = ""  # the pause kind (status and metrics), or what kind of retry
    alarm: str = ""  # the alarm kind (docs/operations.md has a section for each)
    advice: str = ""
    retry_after: float | None = None
    shrink: bool = False  # make the next chunks smaller (the queue may be full)
    pause_after: int | None = None  # retried this many times in a row, then paused


_RESUME = "then run `batchd resume PIPELINE` (or reload or restart batchd)"
# details.error_code -> its meaning; an unknown code falls back to its status below.
CODES: dict[str, Decision] = {
    "enforced_spend_limit_reached": Decision(
        Action.PAUSE, "enforced_spend_limit_reached", "spend_limit", "spend_limit",
        "the organization passed its API tier's monthly spend limit; it lifts at 00:00 UTC "
        f"on the 1st of next month or with a tier upgrade (Console → Billing); {_RESUME}",
    ),
    "contract_spend_limit_reached": Decision(
        Action.PAUSE, "contract_spend_limit_reached", "spend_limit", "spend_limit",
        "the contract's spend limit is reached; ask your Anthropic account team to raise "
        f"it; {_RESUME}",
    ),
    "organization_on_hold": Decision(
        Action.PAUSE, "organization_on_hold", "organization_on_hold", "organization_on_hold",
        "Anthropic put the organization on hold (trust and safety); see the Console or "
        f"appeal{{appeal}}; {_RESUME}",
    ),
    "cmek_key_disabled": Decision(
        Action.PAUSE, "cmek_key_disabled", "encryption_key", "billing_or_auth",
        f"the customer-managed encryption key is disabled or revoked; re-enable it; {_RESUME}",
    ),
    "claude_code_key_creator_not_member": Decision(
        Action.PAUSE, "claude_code_key_creator_not_member", "credentials", "billing_or_auth",
        f"the API key's creator is no longer a member of the organization; install a key "
        f"of a current member; {_RESUME}",
    ),
    "workspace_human_review_disabled": Decision(
        Action.PAUSE, "workspace_human_review_disabled", "workspace", "billing_or_auth",
        f"the workspace's setup refuses the request (human review disabled); fix it in the "
        f"Console; {_RESUME}",
    ),
    "ramp_limit_exceeded": Decision(
        Action.RETRY, "ramp_limit_exceeded", "ramp_limit",
        advice="usage grew faster than the organization's ramp allows; retrying after "
        "retry-after",
    ),
    "cmek_key_unreachable": Decision(
        Action.RETRY, "cmek_key_unreachable", "encryption_key", "billing_or_auth",
        f"the customer-managed key service is unreachable; check it; {_RESUME}",
        pause_after=5,
    ),
    "cmek_context_unavailable": Decision(
        Action.RETRY, "cmek_context_unavailable", "encryption_key", "billing_or_auth",
        f"the customer-managed key service is unavailable; check it; {_RESUME}",
        pause_after=5,
    ),
    "compaction_unavailable": Decision(Action.AMBIGUOUS, "compaction_unavailable", "transient"),
}
_BILLING_PROFILE = (
    "linked_organization_billing_unavailable", "linked_organization_spend_limit_reached",
    "user_profile_billing_not_authorized", "user_profile_not_billable",
    "user_profile_required", "user_profile_not_found",
)
for _code in _BILLING_PROFILE:
    CODES[_code] = Decision(
        Action.PAUSE, _code, "billing", "billing_or_auth",
        f"the billing profile refuses the request ({_code.replace('_', ' ')}); fix billing "
        f"for the organization or user profile in the Console; {_RESUME}",
    )
_BY_STATUS: dict[int, Decision] = {
    401: Decision(Action.PAUSE, "authentication_error", "authentication", "billing_or_auth",
                  "the API key is wrong or revoked; install a valid key of the same workspace "
                  f"(ANTHROPIC_API_KEY or the systemd credential); {_RESUME}"),
    402: Decision(Action.PAUSE, "billing_error", "billing", "billing_or_auth",
                  f"billing refuses the request; add credit or fix the payment method; {_RESUME}"),
    403: Decision(Action.PAUSE, "permission_error", "permission", "billing_or_auth",
                  "the key may not do this (its workspace may not use the model or the "
                  f"Batches API); fix the key's permissions; {_RESUME}"),
}
#: Errored rows whose type is an account problem: the row is held and the pipeline paused.
ACCOUNT_ROW_ERRORS = {"billing_error": "billing", "authentication_error": "authentication",
                      "permission_error": "permission"}
_USER_SPEND_LIMIT = "You have reached your specified"


def retry_after_of(exc: BaseException) -> float | None:
    """``retry-after-ms`` or ``retry-after`` (seconds) of an API error's answer."""
    headers = getattr(exc, "headers", None)
    if headers is None:
        return None
    for header, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(header)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None


def _body_field(exc: ApiStatusError, *path: str) -> Any:
    value: Any = exc.body
    for name in path:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def classify_error(exc: BaseException) -> Decision:
    """What a failed create means (§6 of the API facts): by error_code, then by status."""
    if not isinstance(exc, ApiStatusError):
        return Decision(Action.AMBIGUOUS, type(exc).__name__, "transient")
    status = exc.status_code
    code = exc.error_code
    retry_after = retry_after_of(exc)
    known = CODES.get(code) if isinstance(code, str) else None
    if known is not None:
        advice = known.advice
        if "{appeal}" in advice:
            url = _body_field(exc, "error", "details", "appeal_url")
            advice = advice.replace("{appeal}", f" at {url}" if url else "")
        return Decision(known.action, known.code, known.kind, known.alarm, advice, retry_after,
                        known.shrink, known.pause_after)
    kind = exc.type
    label = code if isinstance(code, str) else kind if isinstance(kind, str) else str(status)
    if status == 429:
        return Decision(Action.RETRY, label, "rate_limited",
                        advice="rate limited or the processing queue is full; waiting "
                        "retry-after with smaller chunks",
                        retry_after=retry_after, shrink=True)
    message = exc.api_message or ""
    if status == 400 and str(message).startswith(_USER_SPEND_LIMIT):
        return Decision(Action.PAUSE, label, "spend_limit", "spend_limit",
                        "a spend limit set in the Console for the workspace or organization is "
                        f"reached; raise it (Console → Limits) or wait for it to reset; {_RESUME}")
    by_status = _BY_STATUS.get(status)
    if by_status is not None:
        return Decision(by_status.action, label, by_status.kind, by_status.alarm,
                        by_status.advice)
    if status == 413:
        return Decision(Action.REJECTED, label, "create_rejected", "create_rejected",
                        "the batch body is over the API's size limit; lower [pipeline.batching] "
                        f"max_bytes; {_RESUME}")
    if 400 <= status < 500 and status not in (408, 409):
        return Decision(Action.REJECTED, label, "create_rejected", "create_rejected",
                        "the API refused the batch itself; the spool file is the exact body "
                        f"sent; fix the config if it is at fault; {_RESUME}")
    return Decision(Action.AMBIGUOUS, label, "transient", retry_after=retry_after)


def pause_kind_of_row(error_type: str) -> str:
    """The pause kind for an errored row that pauses the pipeline (by type or code)."""
    known = CODES.get(error_type)
    if known is not None and known.kind:
        return known.kind
    return ACCOUNT_ROW_ERRORS.get(error_type, "billing")
