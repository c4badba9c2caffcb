"""
One batch's metadata and its lifecycle arithmetic.

Only this small record lives in memory; the requests and results are files in
the batch's directory. Its state is a pure function of the (virtual) time at
which it is read, which is what lets tests jump to the TTL or to retention by
moving the clock instead of waiting.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchd.daemon.emulator.schedule import FINISH_STEPS, OUTCOMES, FinishTally, steps_done
from batchd.daemon.emulator.wire import rfc3339

__all__ = ("Batch",)

_BUCKETS = ("succeeded", "errored", "canceled", "expired")


@dataclass
class Batch:
    """
    A batch as the emulator remembers it.

    ``tally`` counts its requests by outcome and finish step (see `schedule`)
    while it runs; once it has ended only the final counts are kept.
    """

    id: str
    seq: int
    directory: Path
    created_at: float
    expires_at: float
    latency: float
    count: int
    tally: FinishTally | None
    version: str = ""
    cancel_initiated_at: float | None = None
    cancel_end_at: float | None = None
    ended_at: float | None = None
    end_kind: str | None = None
    #: Requests whose finish step is below this keep their own outcome at the end.
    finished_steps: int = FINISH_STEPS
    final_counts: dict[str, int] | None = None
    archived_at: float | None = None
    cut_fetches: int = 0
    results_job: asyncio.Future[Any] | None = field(default=None, repr=False)

    @property
    def requests_path(self) -> Path:
        return self.directory / "requests.jsonl"

    @property
    def results_path(self) -> Path:
        return self.directory / "results.jsonl"

    def advance(self, now: float, retention_seconds: float) -> bool:
        """
        Move the batch to where it is at ``now``; True when it has just ended.

        A cancel ends it min(latency, 1 s) later (so ``canceling`` can be seen);
        the requests that finished before the cancel keep their results and the
        rest are canceled. A batch slower than its TTL ends at the TTL, where
        the unfinished requests expire.
        """
        just_ended = False
        if self.ended_at is None:
            natural_end = self.created_at + self.latency
            if self.cancel_end_at is not None:
                if now >= self.cancel_end_at:
                    assert self.cancel_initiated_at is not None
                    self._end(self.cancel_end_at, "canceled", self.cancel_initiated_at)
                    just_ended = True
            elif natural_end > self.expires_at:
                if now >= self.expires_at:
                    self._end(self.expires_at, "expired", self.expires_at)
                    just_ended = True
            elif now >= natural_end:
                self._end(natural_end, "natural", None)
                just_ended = True
        archive_at = self.created_at + retention_seconds
        if self.archived_at is None and self.ended_at is not None and now >= archive_at:
            self.archived_at = max(archive_at, self.ended_at)
        return just_ended

    def _end(self, at: float, kind: str, cut_at: float | None) -> None:
        self.ended_at = at
        self.end_kind = kind
        if cut_at is not None:
            self.finished_steps = steps_done(self.created_at, self.latency, cut_at)
        self.final_counts = self._final_counts()
        self.tally = None

    def _final_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("processing", *_BUCKETS), 0)
        tally = self.tally
        assert tally is not None
        for outcome in OUTCOMES:
            counts[outcome] += tally.finished(self.finished_steps, outcome)
        unfinished = self.count - tally.finished(self.finished_steps)
        if self.end_kind in ("canceled", "expired"):
            counts[self.end_kind] += unfinished
        return counts

    def unfinished(self, now: float) -> int:
        """Requests not yet processed at ``now``: what the processing queue counts."""
        if self.ended_at is not None or self.tally is None:
            return 0
        at = now if self.cancel_initiated_at is None else min(now, self.cancel_initiated_at)
        return self.count - self.tally.finished(steps_done(self.created_at, self.latency, at))

    @property
    def processing_status(self) -> str:
        if self.ended_at is not None:
            return "ended"
        return "canceling" if self.cancel_initiated_at is not None else "in_progress"

    def request_counts(self) -> dict[str, int]:
        """The API's counts: all ``processing`` until the batch ends, then the terminal buckets."""
        if self.final_counts is None:
            counts = dict.fromkeys(("processing", *_BUCKETS), 0)
            counts["processing"] = self.count
            return counts
        return dict(self.final_counts)

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
