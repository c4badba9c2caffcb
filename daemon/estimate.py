"""
``batchd estimate``: what a backlog will cost before a cent is spent.

It reads the source from the start exactly as ``run`` would and shapes every
record with the pipeline's template, but submits nothing and writes nothing
(no manifest, no ledger, no sinks). Input tokens are the chars/4 estimate;
the range runs from "every answer is empty" to "every answer uses all of
``max_tokens``", at batch prices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from daemon.config import Config, PipelineConfig
from daemon.factories import build_source
from daemon.pricing import PriceTable, estimate_request_tokens
from daemon.shaper import ShapeError, Shaper

__all__ = ("Estimate", "estimate_pipeline")


@dataclass(slots=True)
class Estimate:
    pipeline: str
    rows: int = 0
    unusable_rows: int = 0
    input_tokens: int = 0
    max_output_tokens: int = 0
    cost_low_usd: float = 0.0
    cost_high_usd: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def estimate_pipeline(config: Config, pipeline: PipelineConfig) -> Estimate:
    prices = PriceTable(config.prices, source=str(config.path))
    shaper = Shaper(pipeline)
    result = Estimate(pipeline.name)
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
                tokens = estimate_request_tokens(params)
                max_tokens = int(params.get("max_tokens") or 0)
                low, high = prices.projected_cost(str(params.get("model")), tokens, max_tokens)
                result.rows += 1
                result.input_tokens += tokens
                result.max_output_tokens += max_tokens
                result.cost_low_usd += low
                result.cost_high_usd += high
    finally:
        await source.aclose()
    return result
