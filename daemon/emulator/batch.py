"""
One batch's metadata and its lifecycle arithmetic.

Only this small record lives in memory; the requests and results are files in
the batch's directory. Its state is a pure function of the (virtual) time at
which it is read, which is what lets tests jump to the TTL or to retention by
moving the clock instead of waiting.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.emulator.wire import rfc3339

__all__ = ("Batch",)

_BUCKETS = ("succeeded", "errored", "canceled", "expired")


@dataclass
class Batch:
    """A batch as the emulator remembers it."""

    id: str
    seq: int
    directory: Path
    created_at: float
    expires_at: float
    latency: float
    count: int
    outcomes: Counter[str]
    cancel_initiated_at: float | None = None
    cancel_end_at: float | None = None
    ended_at: float | None = None
    end_kind: str | None = None
    archived_at: float | None = None
    cut_fetches: int = 0
    #: Results jobs by end kind; ``natural`` starts at create so a big batch's
    #: file is usually ready by the time a client asks for it.
    results_jobs: dict[str, asyncio.Future[int]] = field(default_factory=dict, repr=False)

    @property
    def requests_path(self) -> Path:
        return self.directory / "requests.jsonl"

    def results_path(self, kind: str) -> Path:
        """The results file for the batch ending as ``kind``."""
        return self.directory / f"results.{kind}.jsonl"

    def advance(self, now: float, retention_seconds: float) -> bool:
        """
        Move the batch to where it is at ``now``; True when it has just ended.

        A cancel before the batch's latency elapsed cancels every request (it
        ends min(latency, 1 s) after the cancel, so ``canceling`` can be seen);
        a batch slower than its TTL ends at the TTL with every request expired.
        """
        just_ended = False
        if self.ended_at is None:
            natural_end = self.created_at + self.latency
            if self.cancel_end_at is not None:
                if now >= self.cancel_end_at:
                    self._end(self.cancel_end_at, "canceled")
                    just_ended = True
            elif natural_end > self.expires_at:
                if now >= self.expires_at:
                    self._end(self.expires_at, "expired")
                    just_ended = True
            elif now >= natural_end:
                self._end(natural_end, "natural")
                just_ended = True
        archive_at = self.created_at + retention_seconds
        if self.archived_at is None and self.ended_at is not None and now >= archive_at:
            self.archived_at = max(archive_at, self.ended_at)
        return just_ended

    def _end(self, at: float, kind: str) -> None:
        self.ended_at = at
        self.end_kind = kind

    @property
    def processing_status(self) -> str:
        if self.ended_at is not None:
            return "ended"
        return "canceling" if self.cancel_initiated_at is not None else "in_progress"

    def request_counts(self) -> dict[str, int]:
        """The API's counts: all ``processing`` until the batch ends, then the terminal buckets."""
        counts = dict.fromkeys(("processing", *_BUCKETS), 0)
        if self.end_kind is None:
            counts["processing"] = self.count
        elif self.end_kind in ("canceled", "expired"):
            counts[self.end_kind] = self.count
        else:
            for bucket in _BUCKETS:
                counts[bucket] = self.outcomes.get(bucket, 0)
        return counts

    def to_api(self, base_url: str) -> dict[str, Any]:
        """The MessageBatch object."""
        ended = self.ended_at is not None
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.processing_status,
            "request_counts": self.request_counts(),
            "created_at": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at),
            "ended_at": rfc3339(self.ended_at),
            "cancel_initiated_at": rfc3339(self.cancel_initiated_at),
            "archived_at": rfc3339(self.archived_at),
            "results_url": f"{base_url}/v1/messages/batches/{self.id}/results" if ended else None,
        }
