"""
``batchd estimate``: what a backlog will cost before a cent is spent.

It reads the source from the start exactly as ``run`` would and shapes every
record with the pipeline's template (and the same per-record model check), but
submits nothing and writes nothing (no manifest, no ledger, no sinks). Input
tokens are the chars/4 estimate. Prices come from the model catalog (and the
config's ``[prices]``), per model, at batch prices with the ``inference_geo``
surcharge; a model nobody prices is flagged and left out of the cost, never
guessed.

The range per model:

* **low**: with ``cache``, the cached prefix (the system prompt) is written once and
  read by every other request (all within the TTL: the best case); each
  answer is its thinking alone, at batchd's planning figure for the effort
  (:data:`THINKING_FLOOR`; half of ``budget_tokens`` for manual thinking), no text.
* **high**: every request writes the cache (caching in batches is best effort: a miss
  writes again), and every answer uses all of ``max_tokens``, thinking included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from batchd.daemon.config import Config, PipelineConfig
from batchd.daemon.factories import build_source
from batchd.daemon.intake.shaper import ShapeError, Shaper
from batchd.daemon.models.catalog import Catalog, ModelInfo
from batchd.daemon.models.preflight import catalog_for, record_check
from batchd.daemon.models.pricing import (
    BATCH_DISCOUNT,
    GEO_US_FACTOR,
    PriceTable,
    estimate_request_tokens,
    estimate_tokens,
    estimate_tool_tokens,
)

__all__ = ("THINKING_FLOOR", "Estimate", "ModelEstimate", "estimate_pipeline")

#: Thinking tokens per answer that batchd plans with, by effort (the emulator thinks as much).
THINKING_FLOOR = {"low": 32, "medium": 128, "high": 512, "xhigh": 1024, "max": 2048}
_MTOK = 1_000_000


@dataclass(slots=True)
class ModelEstimate:
    model: str
    known: bool = True  # in the model catalog
    priced: bool = True
    rows: int = 0
    input_tokens: int = 0
    cached_tokens: int = 0  # of input_tokens, the part marked for caching
    max_output_tokens: int = 0
    thinking_tokens: int = 0  # the low bound's thinking (planning figure)
    cost_low_usd: float | None = 0.0
    cost_high_usd: float | None = 0.0
    note: str = ""


@dataclass(slots=True)
class Estimate:
    pipeline: str
    rows: int = 0
    unusable_rows: int = 0
    input_tokens: int = 0
    max_output_tokens: int = 0
    cost_low_usd: float = 0.0
    cost_high_usd: float = 0.0
    unpriced_rows: int = 0
    models: list[ModelEstimate] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _thinking_floor(pipeline: PipelineConfig, info: ModelInfo | None) -> tuple[int, str]:
    """Thinking tokens per answer for the low bound, and how the model thinks."""
    options = pipeline.request.options
    thinking = options.thinking
    if thinking is not None and thinking.type == "enabled" and thinking.budget_tokens:
        return thinking.budget_tokens // 2, f"manual thinking, budget {thinking.budget_tokens:,}"
    on = thinking.type != "disabled" if thinking is not None else (
        info is not None and info.thinks_by_default()
    )
    if not on:
        return 0, "thinking off"
    effort = options.effort or (info.effort_default if info is not None else None) or "high"
    how = "thinks by default" if thinking is None else f"thinking {thinking.type}"
    return THINKING_FLOOR.get(effort, 512), f"{how}, effort {effort}"


class _Accumulator:
    """One model's running figures; the cost is summed per request (price tiers differ)."""

    def __init__(self, model: str, info: ModelInfo | None, priced: bool, note: str) -> None:
        self.figures = ModelEstimate(model, known=info is not None, priced=priced, note=note)
        self.low = 0.0
        self.high = 0.0
        self.write_extra = 0.0  # low bound: the one cache write, over the read price


async def estimate_pipeline(config: Config, pipeline: PipelineConfig) -> Estimate:
    catalog: Catalog = catalog_for(config)
    prices = PriceTable(config.prices, catalog=catalog, source=str(config.path))
    check = record_check(pipeline, catalog=catalog, api_version=config.api.version)
    shaper = Shaper(pipeline, check)
    options = pipeline.request.options
    factor = (GEO_US_FACTOR if options.inference_geo == "us" else 1.0) * BATCH_DISCOUNT / _MTOK
    # `cache` marks the last tool and the system prompt: the prefix is both.
    cached_per_row = (estimate_tokens(pipeline.request.system or "")
                      + estimate_tool_tokens(list(options.tools))) if options.cache else 0
    result = Estimate(pipeline.name)
    models: dict[str, _Accumulator] = {}
    source = build_source(config, pipeline.name, pipeline.source, until_drained=True)
    try:
        await source.start(None)
        while (records := await source.poll()) is not None:
            for record in records:
                if record.error is not None:
                    result.unusable_rows += 1
                    continue
                try:
                    params = shaper.params(record)
                except ShapeError:
                    result.unusable_rows += 1
                    continue
                model = str(params.get("model"))
                acc = models.get(model)
                if acc is None:
                    info = catalog.get(model)
                    floor, how = _thinking_floor(pipeline, info)
                    note = how if info is not None else "not in the model catalog"
                    priced = prices.known(model)
                    if not priced:
                        note += "; no price: cost not estimated"
                    acc = models[model] = _Accumulator(model, info, priced, note)
                    acc.figures.thinking_tokens = floor
                tokens = estimate_request_tokens(params)
                max_tokens = int(params.get("max_tokens") or 0)
                cached = min(cached_per_row, tokens)
                figures = acc.figures
                figures.rows += 1
                figures.input_tokens += tokens
                figures.cached_tokens += cached
                figures.max_output_tokens += max_tokens
                result.rows += 1
                result.input_tokens += tokens
                result.max_output_tokens += max_tokens
                pricing = prices.pricing(model)
                if pricing is None:
                    result.unpriced_rows += 1
                    continue
                price = pricing.for_prompt(tokens)
                write = price.cache_write_1h if options.cache == "1h" else price.cache_write_5m
                plain = (tokens - cached) * price.input
                thinking = min(figures.thinking_tokens, max_tokens)
                acc.low += plain + cached * price.cache_read + thinking * price.output
                acc.high += plain + cached * write + max_tokens * price.output
                if cached and figures.rows == 1:
                    acc.write_extra += cached * (write - price.cache_read)
    finally:
        await source.aclose()
    for acc in models.values():
        figures = acc.figures
        if figures.priced:
            figures.cost_low_usd = (acc.low + acc.write_extra) * factor
            figures.cost_high_usd = acc.high * factor
            result.cost_low_usd += figures.cost_low_usd
            result.cost_high_usd += figures.cost_high_usd
        else:
            figures.cost_low_usd = figures.cost_high_usd = None
        result.models.append(figures)
    result.models.sort(key=lambda m: -m.rows)
    return result
