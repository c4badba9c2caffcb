"""HTTP error codes, tiers and RPM: each answer raises the SDK's own exception class."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import pytest

from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.emulator.tiers import TIERS, parse_tier
from tests.fixtures.emulator import message_requests, sdk_client

# (fault key, status, SDK class, error type, details.error_code, has retry-after)
_CODES: list[tuple[str, int, type[anthropic.APIStatusError], str, str | None, bool]] = [
    ("http429", 429, anthropic.RateLimitError, "rate_limit_error", None, True),
    ("http500", 500, anthropic.InternalServerError, "api_error", None, False),
    ("http529", 529, anthropic.OverloadedError, "overloaded_error", None, False),
    ("spend_limit", 429, anthropic.EnforcedSpendLimitReachedError, "rate_limit_error",
     "enforced_spend_limit_reached", False),
    ("contract_spend_limit", 429, anthropic.ContractSpendLimitReachedError, "rate_limit_error",
     "contract_spend_limit_reached", False),
    ("ramp_limit", 429, anthropic.RampLimitExceededError, "rate_limit_error",
     "ramp_limit_exceeded", True),
    ("org_on_hold", 400, anthropic.OrganizationOnHoldError, "invalid_request_error",
     "organization_on_hold", False),
    ("user_spend_limit", 400, anthropic.BadRequestError, "invalid_request_error", None, False),
    ("http401", 401, anthropic.AuthenticationError, "authentication_error", None, False),
    ("http402", 402, anthropic.PaymentRequiredError, "billing_error", None, False),
    ("http403", 403, anthropic.PermissionDeniedError, "permission_error", None, False),
]  # fmt: skip


class TestErrorCodes:
    @pytest.mark.parametrize(
        ("fault", "status", "cls", "error_type", "code", "retry_after"),
        _CODES,
        ids=[row[0] for row in _CODES],
    )
    def test_fault_raises_the_sdk_class(
        self,
        emulator: EmulatorThread,
        fault: str,
        status: int,
        cls: type[anthropic.APIStatusError],
        error_type: str,
        code: str | None,
        retry_after: bool,
    ) -> None:
        """The create gets the status, type, code and retry-after the API sends for it."""
        emulator.set_faults(**{fault: 1.0})
        with pytest.raises(anthropic.APIStatusError) as caught:
            sdk_client(emulator.base_url).messages.batches.create(requests=message_requests(1))
        error = caught.value
        assert type(error) is cls
        assert error.status_code == status
        assert error.type == error_type
        assert error.error_code == code
        assert ("retry-after" in error.response.headers) is retry_after
        body: Any = error.body
        if code is None:
            assert "details" not in body["error"]
        else:
            assert body["error"]["details"] == {"error_code": code}
        if fault == "user_spend_limit":
            assert error.api_message is not None
            assert error.api_message.startswith(
                "You have reached your specified workspace API usage limits"
            )
        stats = emulator.stats()
        assert stats["http_errors"] == {f"{status}:{code or error_type}": 1}
        assert stats["batches_created"] == 0

    def test_faults_on_create_only(self, emulator: EmulatorThread) -> None:
        """``http_fault_on=create`` leaves retrieve, list and results alone."""
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(2))
        emulator.set_faults(spend_limit=1.0, http_fault_on="create")
        assert client.messages.batches.retrieve(batch.id).processing_status == "ended"
        assert len(list(client.messages.batches.results(batch.id))) == 2
        assert [b.id for b in client.messages.batches.list()] == [batch.id]
        with pytest.raises(anthropic.EnforcedSpendLimitReachedError):
            client.messages.batches.create(requests=message_requests(1, prefix="x"))
        assert emulator.stats()["faults_injected"] == {"spend_limit": 1}

    def test_bad_http_fault_on_is_refused(self, emulator: EmulatorThread) -> None:
        with pytest.raises(ValueError, match="http_fault_on"):
            emulator.set_faults(http_fault_on="retrieve")

    def test_http_fault_fractions_stack(self, emulator: EmulatorThread) -> None:
        """All HTTP fault fractions share one budget of 1."""
        with pytest.raises(ValueError, match="add up to"):
            emulator.set_faults(http429=0.6, spend_limit=0.6)


class TestTiers:
    @pytest.mark.parametrize(
        ("text", "queue", "rpm"),
        [("start", 200_000, 1_000), ("build", 300_000, 2_000), ("scale", 500_000, 4_000),
         ("custom:7", 7, None), ("Scale", 500_000, 4_000)],
    )  # fmt: skip
    def test_parse(self, text: str, queue: int, rpm: int | None) -> None:
        tier = parse_tier(text)
        assert (tier.queue, tier.rpm) == (queue, rpm)

    @pytest.mark.parametrize("text", ["gold", "custom:", "custom:0", "custom:x"])
    def test_bad_tier_names_it(self, text: str) -> None:
        with pytest.raises(ValueError, match="tier"):
            parse_tier(text)

    def test_tier_sets_queue_and_rpm(self, emulator_factory: Callable[..., EmulatorThread]) -> None:
        for name, tier in TIERS.items():
            faults = emulator_factory(tier=name).faults()
            assert (faults["queue_limit"], faults["rpm_limit"]) == (tier.queue, tier.rpm)
        custom = emulator_factory(tier="custom:5", queue_limit=9).faults()
        assert (custom["queue_limit"], custom["rpm_limit"]) == (9, None)

    def test_full_queue_is_429_with_retry_after(
        self, emulator_factory: Callable[..., EmulatorThread]
    ) -> None:
        """A create past the tier's queue: 429 rate_limit_error, retry-after, no error code."""
        emulator = emulator_factory(tier="custom:5", latency=60.0)
        client = sdk_client(emulator.base_url)
        client.messages.batches.create(requests=message_requests(4))
        with pytest.raises(anthropic.RateLimitError) as caught:
            client.messages.batches.create(requests=message_requests(2, prefix="q"))
        assert type(caught.value) is anthropic.RateLimitError
        assert caught.value.error_code is None
        assert caught.value.response.headers["retry-after"] == "1"
        client.messages.batches.create(requests=message_requests(1, prefix="q"))
        stats = emulator.stats()
        assert stats["peak_in_progress_requests"] == 5
        assert stats["http_errors"] == {"429:rate_limit_error": 1}

    def test_rpm_limit_on_the_virtual_clock(self, emulator: EmulatorThread) -> None:
        """Past the RPM limit every batch call is a 429 until a minute has passed."""
        emulator.set_faults(rpm_limit=3)
        client = sdk_client(emulator.base_url)
        batch = client.messages.batches.create(requests=message_requests(1))
        client.messages.batches.retrieve(batch.id)
        client.messages.batches.list()
        with pytest.raises(anthropic.RateLimitError) as caught:
            client.messages.batches.retrieve(batch.id)
        assert int(caught.value.response.headers["retry-after"]) >= 50
        emulator.advance_clock(60)
        client.messages.batches.retrieve(batch.id)
        assert emulator.stats()["faults_injected"]["rpm_limit"] == 1
