"""
Cost budgets: stop submitting before the money runs out, not after.

Before a chunk is sealed, the pipeline's spend so far plus the *upper*
bound of everything in flight plus this chunk must stay within ``budget_usd``.
The upper bound takes every request's input as ``bytes / 4`` tokens at the
input price (or the cache-write price, when the pipeline caches and that is
dearer), and every answer as a full ``max_tokens`` (thinking counts toward it)
at the output price, at batch prices, with the ``inference_geo`` surcharge.
Upper bounds make the check conservative: a pipeline may stop a little early,
never late. Spend settles at collect, from each answer's real usage. Nothing
already submitted is lost; those batches finish and are collected.

A model chosen per record is bounded at the dearest price known (catalog and
config); a constant model without a price cannot have a budget (pre-flight
refuses that config).

In cluster mode the same sum is a shared counter row, ``budget:<pipeline>``:
``spent`` is every worker's settled cost, ``reserved`` the upper bounds of every
worker's unsettled chunks (held from seal to commit), and the seal's own
transaction reserves the next chunk's bound or refuses it
(:meth:`Budget.counter_refusal` words the refusal the same way).
"""

from __future__ import annotations

from collections.abc import Iterable

from batchd.daemon.config import PipelineConfig
from batchd.daemon.models.catalog import Prices
from batchd.daemon.models.pricing import (
    BATCH_DISCOUNT,
    CHARS_PER_TOKEN,
    GEO_US_FACTOR,
    ModelPricing,
    PriceTable,
    format_budget,
)
from batchd.daemon.wal.manifest_state import ChunkState, PipelineState, Stage

__all__ = ("Budget",)

_UNSETTLED = (Stage.SEALED, Stage.INTENT, Stage.SUBMITTED, Stage.ENDED)
_MTOK = 1_000_000


class Budget:
    def __init__(self, pipeline: PipelineConfig, prices: PriceTable) -> None:
        self.limit = pipeline.budget_usd
        request = pipeline.request
        self.max_tokens = request.max_tokens
        self.cache = request.options.cache
        self.factor = (GEO_US_FACTOR if request.options.inference_geo == "us" else 1.0) * (
            BATCH_DISCOUNT / _MTOK
        )
        self.pricing: ModelPricing | None = None
        self.dearest: Prices | None = None
        if request.model.is_constant:
            self.pricing = prices.pricing(request.model.source)
        if self.pricing is None and self.limit is not None:
            self.dearest = prices.dearest()

    def _prices(self, tokens_per_request: float) -> Prices | None:
        if self.pricing is not None:
            return self.pricing.for_prompt(int(tokens_per_request))
        return self.dearest

    def upper_bound(self, requests: int, request_bytes: int) -> float:
        """Cost if every request's input is ``bytes / 4`` tokens and every answer is full."""
        tokens = request_bytes // CHARS_PER_TOKEN
        price = self._prices(tokens / max(requests, 1))
        if price is None:
            return 0.0
        input_price = price.input
        if self.cache == "1h":
            input_price = max(input_price, price.cache_write_1h)
        elif self.cache == "5m":
            input_price = max(input_price, price.cache_write_5m)
        return (tokens * input_price + requests * self.max_tokens * price.output) * self.factor

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
        return _refusal(self.limit, spent, pending, self.upper_bound(requests, request_bytes))

    def counter_refusal(self, cap: float | None, spent: float, held: float,
                        next_chunk: float) -> str | None:
        """
        Why a new chunk may not be sealed by the shared counter's figures (cluster mode):
        its *cap* (the last config defined), *spent*, and *held* (every worker's unsettled
        upper bounds, plus any external use); None when it fits.
        """
        if cap is None:
            return None
        return _refusal(cap, spent, held, next_chunk, where=" across the cluster")


def _refusal(limit: float, spent: float, pending: float, next_chunk: float,
             where: str = "") -> str | None:
    if spent + pending + next_chunk <= limit:
        return None
    return (
        f"budget exhausted: spent ${spent:.4f} + in flight up to ${pending:.4f}{where} + next "
        f"chunk up to ${next_chunk:.4f} would pass budget_usd {format_budget(limit)}"
    )
