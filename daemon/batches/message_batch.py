"""
A Message Batch as the API describes it, reduced to the fields the engine reads.

Parsed from the JSON with orjson into frozen dataclasses instead of the SDK's
pydantic ``MessageBatch`` (whose import alone outweighs the engine). Times are
timezone-aware datetimes, as the SDK gives them, so ``str(batch.created_at)``
(what the manifest stores) reads the same as before. Fields the API adds later
are ignored; a field the engine needs and the answer lacks is an ``ApiError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from batchd.daemon.batches.api_errors import ApiError

__all__ = ("MessageBatch", "RequestCounts", "parse_time")


def parse_time(value: Any) -> datetime | None:
    """An RFC 3339 timestamp (``…Z`` or an offset) as an aware datetime; None stays None."""
    if value is None:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


@dataclass(frozen=True, slots=True)
class RequestCounts:
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int

    def total(self) -> int:
        return self.processing + self.succeeded + self.errored + self.canceled + self.expired


@dataclass(frozen=True, slots=True)
class MessageBatch:
    id: str
    processing_status: str  # in_progress | canceling | ended
    request_counts: RequestCounts
    created_at: datetime
    expires_at: datetime | None = None
    ended_at: datetime | None = None
    archived_at: datetime | None = None
    cancel_initiated_at: datetime | None = None
    results_url: str | None = None

    @classmethod
    def from_json(cls, data: Any) -> MessageBatch:
        """One batch object of a create, retrieve or list answer."""
        try:
            counts = data["request_counts"]
            created_at = parse_time(data["created_at"])
            assert created_at is not None
            return cls(
                id=str(data["id"]),
                processing_status=str(data["processing_status"]),
                request_counts=RequestCounts(
                    int(counts["processing"]), int(counts["succeeded"]), int(counts["errored"]),
                    int(counts["canceled"]), int(counts["expired"]),
                ),
                created_at=created_at,
                expires_at=parse_time(data.get("expires_at")),
                ended_at=parse_time(data.get("ended_at")),
                archived_at=parse_time(data.get("archived_at")),
                cancel_initiated_at=parse_time(data.get("cancel_initiated_at")),
                results_url=data.get("results_url"),
            )
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise ApiError(f"the API answered a batch without a usable {exc}: {data!r:.300}") \
                from exc
