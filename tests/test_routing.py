"""
Routing decides on the *inner* error type: the outer ``result.error.type`` is
always ``"error"`` and must never be what a row is routed or labelled by.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchd.daemon.results.routing import PAUSING, PERMANENT, Route, error_of, route


def errored(inner_type: str, message: str = "boom") -> dict[str, Any]:
    """A results line's ``result`` for an errored request, shaped like the API's."""
    return {
        "type": "errored",
        "error": {"type": "error", "error": {"type": inner_type, "message": message},
                  "request_id": "req_1"},
    }


class TestRoute:
    def test_succeeded(self) -> None:
        """A succeeded result is routed to the sinks with no error."""
        assert route({"type": "succeeded", "message": {}}) == (Route.SUCCEEDED, None, None)

    @pytest.mark.parametrize(
        "inner",
        ["invalid_request_error", "not_found_error", "request_too_large"],
    )
    def test_permanent_errors_are_dead_lettered(self, inner: str) -> None:
        """Errors a resend cannot fix go to the dead letters at once, under their inner type."""
        assert route(errored(inner, "bad max_tokens")) == (Route.DEAD, inner, "bad max_tokens")

    @pytest.mark.parametrize("inner", ["billing_error", "authentication_error", "permission_error"])
    def test_billing_and_auth_pause(self, inner: str) -> None:
        """Account problems (§6: billing, key, permission) pause the pipeline, rows held."""
        assert route(errored(inner))[:2] == (Route.PAUSE, inner)

    @pytest.mark.parametrize(
        ("code", "inner", "expected"),
        [("enforced_spend_limit_reached", "rate_limit_error", Route.PAUSE),
         ("organization_on_hold", "invalid_request_error", Route.PAUSE),
         ("ramp_limit_exceeded", "rate_limit_error", Route.RETRY),
         ("some_future_code", "invalid_request_error", Route.DEAD)],
    )
    def test_a_rows_error_code_decides_before_its_type(
        self, code: str, inner: str, expected: Route
    ) -> None:
        """details.error_code, when a row carries one, outranks its type; unknown codes don't."""
        result = errored(inner, "no")
        result["error"]["error"]["details"] = {"error_code": code}
        where, error_type, _ = route(result)
        assert where is expected
        assert error_type == (inner if expected is Route.DEAD else code)

    @pytest.mark.parametrize(
        "inner",
        ["api_error", "overloaded_error", "rate_limit_error", "timeout_error",
         "gateway_timeout_error", "brand_new_error"],
    )
    def test_transient_and_unknown_errors_are_retried(self, inner: str) -> None:
        """Transient errors, and types not known yet, are retried (bounded by max_attempts)."""
        assert route(errored(inner))[:2] == (Route.RETRY, inner)

    @pytest.mark.parametrize("kind", ["expired", "canceled"])
    def test_expired_and_canceled_are_retried(self, kind: str) -> None:
        """Expired and canceled requests were never processed: retry them."""
        where, error_type, message = route({"type": kind})
        assert (where, error_type) == (Route.RETRY, kind)
        assert message and kind in message

    def test_outer_type_is_never_the_discriminator(self) -> None:
        """An errored result is never labelled ``error`` (the outer type)."""
        for inner in (*PERMANENT, *PAUSING, "api_error"):
            assert route(errored(inner))[1] == inner != "error"

    @given(st.text(min_size=1, max_size=40))
    def test_error_type_is_the_inner_type(self, inner: str) -> None:
        """Whatever the inner type, it is what the row is routed and labelled by."""
        where, error_type, _ = route(errored(inner))
        assert error_type == inner
        expected = (
            Route.DEAD if inner in PERMANENT else Route.PAUSE if inner in PAUSING else Route.RETRY
        )
        assert where is expected


class TestMalformedResults:
    def test_errored_without_inner_error_is_retried(self) -> None:
        """An errored result without an inner error object is an unknown (transient) error."""
        where, error_type, message = route({"type": "errored", "error": {"type": "error"}})
        assert (where, error_type) == (Route.RETRY, "unknown_error")
        assert message is not None and "error" in message

    def test_unknown_result_type_is_retried(self) -> None:
        """A result type the API may add later is retried, not dropped or dead-lettered."""
        assert route({"type": "mystery"})[:2] == (Route.RETRY, "unknown_result")
        assert route({})[:2] == (Route.RETRY, "unknown_result")

    def test_error_of_inner_type_without_message(self) -> None:
        """A missing message becomes an empty string, a missing type ``unknown_error``."""
        result = {"type": "errored", "error": {"type": "error", "error": {}}}
        assert error_of(result) == ("unknown_error", "")
