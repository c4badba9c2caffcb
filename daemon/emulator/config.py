"""
The emulator's options and the knobs tests turn at runtime.

Start-up options (`EmulatorConfig`) and runtime fault settings (`FaultSettings`)
are kept apart because the admin endpoint may replace the second while the
server runs, and a reset must be able to go back to what the operator started
with.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchd.daemon.durations import parse_duration
from batchd.daemon.emulator.tiers import parse_tier

__all__ = (
    "HTTP_FAULTS",
    "PER_REQUEST_FAULTS",
    "SUCCEEDED_TWISTS",
    "EmulatorConfig",
    "FaultSettings",
    "parse_fault_spec",
)

#: Per-request fault kinds, in the order their fractions are stacked.
PER_REQUEST_FAULTS = ("api_error", "overloaded_error", "invalid_request", "expired")
#: Faults that keep a request ``succeeded`` but change its reply, stacked in this order.
SUCCEEDED_TWISTS = ("refusal", "context_exceeded")
#: HTTP-level fault kinds, in the order their fractions are stacked (see `error_codes`).
HTTP_FAULTS = (
    "http429",
    "http500",
    "http529",
    "spend_limit",
    "contract_spend_limit",
    "ramp_limit",
    "org_on_hold",
    "user_spend_limit",
    "http401",
    "http402",
    "http403",
)
#: Which /v1 calls the HTTP faults hit.
HTTP_FAULT_TARGETS = ("all", "create")
_DURATION_KEYS = frozenset({"retry_after", "slow", "transient_404_seconds"})
_OPTIONAL_COUNTS = frozenset({"cut_results_after", "queue_limit", "rpm_limit"})


@dataclass(frozen=True)
class FaultSettings:
    """
    What the emulator breaks on purpose; every field may be changed at runtime.

    Fractions are probabilities in [0, 1]. Per-request faults are a pure
    function of (seed, custom_id, attempt), HTTP faults come from a seeded
    random stream, so a test run is reproducible.
    """

    api_error: float = 0.0
    overloaded_error: float = 0.0
    invalid_request: float = 0.0
    expired: float = 0.0
    refusal: float = 0.0
    context_exceeded: float = 0.0
    cache_miss: float = 0.0
    http429: float = 0.0
    http500: float = 0.0
    http529: float = 0.0
    spend_limit: float = 0.0
    contract_spend_limit: float = 0.0
    ramp_limit: float = 0.0
    org_on_hold: float = 0.0
    user_spend_limit: float = 0.0
    http401: float = 0.0
    http402: float = 0.0
    http403: float = 0.0
    http_fault_on: str = "all"
    retry_after: float = 1.0
    slow: float = 0.0
    cut_results_after: int | None = None
    cut_results_times: int = 1
    drop_after_create: float = 0.0
    transient_404_seconds: float = 0.0
    queue_limit: int | None = None
    rpm_limit: int | None = None
    retention_days: float = 29.0

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], base: FaultSettings | None = None
    ) -> FaultSettings:
        """
        Settings from ``values`` laid over ``base`` (defaults when None).

        Raises:
            ValueError: naming the key whose name or value is wrong.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        changes: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in known:
                raise ValueError(
                    f"unknown fault setting {key!r} (known: {', '.join(sorted(known))})"
                )
            changes[key] = _coerce(key, raw)
        settings = dataclasses.replace(base or cls(), **changes)
        settings._check_sums()
        return settings

    def as_dict(self) -> dict[str, Any]:
        """The settings as the admin endpoint reports them."""
        return dataclasses.asdict(self)

    def _check_sums(self) -> None:
        for group in (PER_REQUEST_FAULTS, SUCCEEDED_TWISTS, HTTP_FAULTS):
            total = sum(getattr(self, key) for key in group)
            if total > 1.0 + 1e-9:
                raise ValueError(f"fractions {', '.join(group)} add up to {total:g} > 1")


def _coerce(key: str, raw: Any) -> Any:
    """One setting's value checked and converted; the error names the key."""
    try:
        if key == "http_fault_on":
            if raw not in HTTP_FAULT_TARGETS:
                raise ValueError(f"must be one of {', '.join(HTTP_FAULT_TARGETS)}")
            return raw
        if key in _OPTIONAL_COUNTS:
            if raw is None or raw == "" or raw == "none":
                return None
            value = int(raw)
            if value < 0:
                raise ValueError("must be >= 0")
            return value
        if key == "cut_results_times":
            value = int(raw)
            if value < 0:
                raise ValueError("must be >= 0")
            return value
        if key in _DURATION_KEYS:
            return parse_duration(raw if isinstance(raw, str) else float(raw), what=key)
        number = float(raw)
        if not math.isfinite(number) or number < 0:
            raise ValueError("must be a finite number >= 0")
        if key == "retention_days" or key == "drop_after_create":
            if key == "drop_after_create" and number >= 1 and number != int(number):
                raise ValueError("a count (>= 1) must be a whole number")
            return number
        if number > 1:
            raise ValueError("a fraction must be within 0..1")
        return number
    except (TypeError, ValueError) as exc:
        raise ValueError(f"fault setting {key}={raw!r}: {exc}") from None


def parse_fault_spec(spec: str) -> dict[str, str]:
    """``api_error=0.05,http429=0.1`` as a dict of raw strings (checked by `FaultSettings`)."""
    values: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"fault {part!r}: expected key=value")
        values[key.strip()] = value.strip()
    return values


@dataclass
class EmulatorConfig:
    """
    How an emulator starts.

    Args:
        host, port: where to listen; port 0 picks a free one.
        latency: seconds from create to ``ended`` (0: ended at the first read).
        ttl: seconds from create to ``expires_at``; a batch slower than this expires.
        retention: seconds from create until results are archived (overrides
            ``faults.retention_days`` when set).
        rules: a rules file (TOML/JSON) or the rules themselves, see `responder`.
        faults: initial `FaultSettings` values (strings are parsed).
        queue_limit: requests in progress allowed across all batches (overrides the tier's).
        tier: ``start``, ``build``, ``scale`` or ``custom:N``: the processing-queue size
            and the RPM limit of the batch endpoints (None: neither is limited).
        models: extra model catalog files laid over the bundled one.
        seed: makes faults and result order reproducible.
        state_dir: where request and result files go (a temp dir when None).
        max_body_bytes, max_requests: the API's create limits.

    .. versionadded:: 0.1
    """

    host: str = "127.0.0.1"
    port: int = 0
    latency: float = 0.0
    ttl: float = 24 * 3600.0
    retention: float | None = None
    rules: str | Path | Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None
    faults: Mapping[str, Any] = field(default_factory=dict)
    queue_limit: int | None = None
    tier: str | None = None
    models: Sequence[str | Path] = ()
    seed: int = 0
    state_dir: str | Path | None = None
    max_body_bytes: int = 256_000_000
    max_requests: int = 100_000

    def initial_faults(self) -> FaultSettings:
        """The fault settings a fresh (or reset) emulator starts with."""
        base = FaultSettings()
        if self.tier is not None:
            tier = parse_tier(self.tier)
            base = dataclasses.replace(base, queue_limit=tier.queue, rpm_limit=tier.rpm)
        settings = FaultSettings.from_mapping(self.faults, base=base)
        extra: dict[str, Any] = {}
        if self.queue_limit is not None:
            extra["queue_limit"] = self.queue_limit
        if self.retention is not None:
            extra["retention_days"] = self.retention / 86400.0
        return FaultSettings.from_mapping(extra, base=settings) if extra else settings
