"""
Cost budgets: stop submitting before the money runs out, not after.

Before a chunk is sealed, the pipeline's spend so far plus the *upper*
bound of everything in flight plus this chunk (estimated input tokens and
a full ``max_tokens`` answer for every request, at batch prices) must stay
within ``budget_usd``. Upper bounds make the check conservative: a pipeline
may stop a little early, never late. Nothing already submitted is lost;
those batches finish and are collected.
"""

from __future__ import annotations

from collections.abc import Iterable

from daemon.config import PipelineConfig
from daemon.manifest_state import ChunkState, PipelineState, Stage
from daemon.pricing import CHARS_PER_TOKEN, PriceTable

__all__ = ("Budget",)

_UNSETTLED = (Stage.SEALED, Stage.INTENT, Stage.SUBMITTED, Stage.ENDED)


class Budget:
    def __init__(self, pipeline: PipelineConfig, prices: PriceTable) -> None:
        self.limit = pipeline.budget_usd
        self.max_tokens = pipeline.request.max_tokens
        model = pipeline.request.model
        self.model = model.source if model.is_constant else "unknown-model"
        self.prices = prices

    def upper_bound(self, requests: int, request_bytes: int) -> float:
        """Cost if every request's input is ``bytes / 4`` tokens and every answer is full."""
        _, high = self.prices.projected_cost(
            self.model, request_bytes // CHARS_PER_TOKEN, requests * self.max_tokens
        )
        return high

    def in_flight(self, chunks: Iterable[ChunkState]) -> float:
        return sum(
            self.upper_bound(c.requests, c.bytes) for c in chunks if c.stage in _UNSETTLED
        )

    def refusal(
        self,
        state: PipelineState | None,
        chunks: Iterable[ChunkState],
        requests: int,
        request_bytes: int,
    ) -> str | None:
        """Why a new chunk may not be sealed, or None when it fits the budget."""
        if self.limit is None:
            return None
        spent = state.cost_usd if state is not None else 0.0
        pending = self.in_flight(chunks)
        projected = spent + pending + self.upper_bound(requests, request_bytes)
        if projected <= self.limit:
            return None
        return (
            f"budget exhausted: spent ${spent:.4f} + in flight up to ${pending:.4f} + next chunk "
            f"up to ${projected - spent - pending:.4f} would pass budget_usd ${self.limit:.2f}"
        )
