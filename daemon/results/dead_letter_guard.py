"""
``[pipeline] max_dead_letter_ratio``: stop burning the backlog when answers go bad wholesale.

A wrong template, a missing rules file or an ``allowed`` list that does not match
the prompt turn every answer into a dead letter, and nothing in a single row says
so. Like Kafka Connect's ``errors.tolerance``, the pipeline then stops: once the
latest ``dead_letter_min_sample`` terminal rows (or a few more, whole batches at a
time) hold more than the ratio of dead letters, the pipeline pauses with the
alarm ``dead_letter_ratio``. Batches already in flight are still collected; no new
one is submitted until an operator fixes the cause and restarts, which resumes
the pipeline (and starts the count afresh).
"""

from __future__ import annotations

from collections import Counter, deque

from batchd.daemon.batches.control import RunnerControl
from batchd.daemon.config import PipelineConfig
from batchd.daemon.results.collector import CollectSummary
from batchd.daemon.wal.records import PauseKind

__all__ = ("ALARM", "DeadLetterGuard")

ALARM = "dead_letter_ratio"


class DeadLetterGuard:
    """The latest committed batches' outcomes, just enough of them to judge the ratio."""

    def __init__(self, pipeline: PipelineConfig, control: RunnerControl) -> None:
        self.control = control
        self.ratio = pipeline.max_dead_letter_ratio
        self.min_sample = pipeline.dead_letter_min_sample
        self._window: deque[tuple[int, int, Counter[str], dict[str, str]]] = deque()

    async def check(self, summary: CollectSummary) -> None:
        """Called after each batch's results are committed; pauses the pipeline if tripped."""
        if self.ratio is None:
            return
        total = summary.succeeded + summary.truncated + summary.dead
        if total == 0:
            return
        window = self._window
        window.append((summary.dead, total, Counter(summary.dead_types),
                       dict(summary.dead_examples)))
        while len(window) > 1 and sum(t for _, t, _, _ in window) - window[0][1] >= self.min_sample:
            window.popleft()
        seen = sum(t for _, t, _, _ in window)
        dead = sum(d for d, _, _, _ in window)
        if seen < self.min_sample or dead <= self.ratio * seen or self.control.paused:
            return
        kinds: Counter[str] = Counter()
        examples: dict[str, str] = {}
        for _, _, types, samples in window:
            kinds.update(types)
            for kind, text in samples.items():
                examples.setdefault(kind, text)
        top = kinds.most_common(1)
        why = ""
        if top:
            kind, count = top[0]
            example = examples.get(kind, "")
            why = f"; mostly {kind} ({count}){': ' + example[:160] if example else ''}"
        reason = (f"dead letters: {dead} of the latest {seen} rows ({dead / seen:.0%}) exceed "
                  f"max_dead_letter_ratio = {self.ratio:g}{why}. Fix the cause (template, "
                  "model rules, [pipeline.output] allowed), check `batchd dead-letters list`, "
                  "then restart")
        await self.control.pause(reason, alarm_kind=ALARM, kind=PauseKind.DEAD_LETTER_RATIO)
