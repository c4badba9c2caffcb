"""
What a batch costs, from the model catalog's prices and each answer's ``usage``.

Prices are USD per million tokens at **list** price, per model, from
``daemon/models/catalog.toml`` (the one source of truth the emulator and the
pre-flight checks read too): input, output, cache writes for the 5-minute and
1-hour TTL, cache reads — each model has its own cache-read factor — and
Haiku 5.5's long-prompt tier, judged per request on its whole prompt (input plus
cache writes and reads). ``inference_geo = "us"`` adds 10 % to every category,
and the Message Batches API halves everything (:data:`BATCH_DISCOUNT`).

A config may override or add prices (``[prices."claude-x"] input = 3.0, output =
15.0``). A model neither the catalog nor the config prices is **not guessed**:
its cost is unknown, counted as such (``unpriced``) and warned about once; only
the budget's upper bound, which must never under-count, falls back to the
dearest known price.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from batchd.daemon.models.catalog import Catalog, Prices, default_catalog
from batchd.plugins.errors import ConfigError

__all__ = (
    "BATCH_DISCOUNT",
    "CHARS_PER_TOKEN",
    "GEO_US_FACTOR",
    "CostFn",
    "ModelPricing",
    "PriceTable",
    "batch_cost",
    "estimate_request_tokens",
    "estimate_tokens",
    "estimate_tool_tokens",
    "format_budget",
    "projected_cost",
)

BATCH_DISCOUNT = 0.5
GEO_US_FACTOR = 1.1
CACHE_WRITE_5M_FACTOR = 1.25
CACHE_WRITE_1H_FACTOR = 2.0
CACHE_READ_FACTOR = 0.1
CHARS_PER_TOKEN = 4
_MTOK = 1_000_000
_MEMO_SIZE = 4096  # distinct usages remembered by a cost function
# What may follow a base id: a date (-20251001, Vertex's @20251001) or -latest.
_SUFFIX = re.compile(r"(?:[-@]\d{8}|-latest)$")
_OVERRIDE_KEYS = ("input", "output", "cache_write", "cache_write_5m", "cache_write_1h",
                  "cache_read")
#: The collector's per-row cost: ``(model, usage) -> USD``, or None when the model has no price.
CostFn = Callable[[str, Mapping[str, Any]], float | None]


@dataclass(frozen=True, slots=True)
class ModelPricing:
    """A model's list prices, with the long-prompt tier where the model has one."""

    model: str
    base: Prices
    long_prompt_tokens: int | None = None
    long: Prices | None = None

    def for_prompt(self, prompt_tokens: int) -> Prices:
        if self.long is not None and self.long_prompt_tokens is not None and (
            prompt_tokens > self.long_prompt_tokens
        ):
            return self.long
        return self.base

    def dearest(self) -> Prices:
        return self.long if self.long is not None else self.base


def _from_input(input_price: float, output: float) -> Prices:
    """Cache prices from the input price by the usual factors (for models the catalog lacks)."""
    return Prices(input_price, output, input_price * CACHE_WRITE_5M_FACTOR,
                  input_price * CACHE_WRITE_1H_FACTOR, input_price * CACHE_READ_FACTOR)


class PriceTable:
    """
    The catalog's prices with a config's ``[prices]`` overrides on top.

    Args:
        overrides: ``{model: {"input", "output", "cache_write_5m" (or "cache_write"),
            "cache_write_1h", "cache_read"}}`` in USD per million tokens at list price.
            For a catalog model any subset may be given (a new input price moves the
            cache prices by the catalog's own ratios unless they are given too); a model
            the catalog lacks needs ``input`` and ``output`` (cache prices then default to
            1.25x, 2x and 0.1x input).
        catalog: The model catalog (the bundled one by default).
        source: Named in error messages (the config file's path).

    Raises:
        ConfigError: An override is not a table of non-negative numbers, names an unknown
            key, or adds a model without ``input`` and ``output``.
    """

    def __init__(
        self,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        catalog: Catalog | None = None,
        source: str = "config",
    ) -> None:
        self.catalog = catalog if catalog is not None else default_catalog()
        self._overrides: dict[str, ModelPricing] = {}
        for model, fields in (overrides or {}).items():
            self._overrides[model] = _override(model, fields, self._catalog_pricing(model),
                                               source)
        self._resolved: dict[str, ModelPricing | None] = {}
        self._reported: set[str] = set()

    def _catalog_pricing(self, model: str) -> ModelPricing | None:
        info = self.catalog.get(model)
        if info is None:
            base = _SUFFIX.sub("", model)
            info = self.catalog.get(base) if base != model else None
        if info is None or info.price is None:
            return None
        return ModelPricing(model, info.price, info.long_prompt_tokens, info.price_long)

    def pricing(self, model: str) -> ModelPricing | None:
        """The prices for ``model`` (config first, then the catalog), or None if unknown."""
        if model in self._resolved:
            return self._resolved[model]
        found = self._overrides.get(model) or self._overrides.get(_SUFFIX.sub("", model))
        if found is None:
            # An alias answer priced by an override under the dated id it stands for.
            target = self.catalog.aliases.get(model)
            found = self._overrides.get(target) if target else None
        if found is None:
            found = self._catalog_pricing(model)
        self._resolved[model] = found
        return found

    def known(self, model: str) -> bool:
        return self.pricing(model) is not None

    def report_unknown(self, model: str) -> bool:
        """True the first time an unpriced ``model`` is asked about, so the caller warns once."""
        if self.pricing(model) is not None or model in self._reported:
            return False
        self._reported.add(model)
        return True

    def dearest(self) -> Prices:
        """The highest price of every category over every priced model (budget bounds only)."""
        every = [p.dearest() for p in self._overrides.values()]
        every += [m.price_long or m.price for m in self.catalog if m.price is not None]
        return Prices(*(max(getattr(p, name) for p in every) for name in Prices.__slots__))

    def batch_cost(
        self, model: str, usage: Mapping[str, Any], *, geo: str | None = None
    ) -> float | None:
        """
        USD for one answer at batch price from the API's ``usage``, or None if unpriced.

        Reads ``input_tokens``, ``output_tokens`` (which includes thinking),
        ``cache_creation_input_tokens`` with its ``cache_creation`` split into 5-minute and
        1-hour writes (all 5-minute when the split is absent), ``cache_read_input_tokens``
        and ``inference_geo`` (``geo``, the request's setting, when usage has none).

        Raises:
            ValueError: A count is negative or not a number.
        """
        pricing = self.pricing(model)
        input_tokens = _count(usage, "input_tokens")
        output_tokens = _count(usage, "output_tokens")
        cache_write = _count(usage, "cache_creation_input_tokens")
        cache_read = _count(usage, "cache_read_input_tokens")
        breakdown = usage.get("cache_creation")
        if breakdown is not None and not isinstance(breakdown, Mapping):
            raise ValueError(f"usage.cache_creation must be an object, got {breakdown!r}")
        write_1h = _count(breakdown, "ephemeral_1h_input_tokens") if breakdown else 0
        write_1h = min(write_1h, cache_write)
        if pricing is None:
            return None
        price = pricing.for_prompt(input_tokens + cache_write + cache_read)
        list_usd = (
            input_tokens * price.input
            + output_tokens * price.output
            + (cache_write - write_1h) * price.cache_write_5m
            + write_1h * price.cache_write_1h
            + cache_read * price.cache_read
        ) / _MTOK
        where = usage.get("inference_geo") or geo
        factor = GEO_US_FACTOR if where == "us" else 1.0
        return list_usd * factor * BATCH_DISCOUNT

    def cost_function(
        self, on_unknown: Callable[[str], None], *, geo: str | None = None
    ) -> CostFn:
        """
        :meth:`batch_cost` for the collector's hot path, called once per billed answer.

        A results file repeats a few hundred distinct usages a hundred thousand times,
        so each distinct (model, usage) is priced once and remembered (at most
        ``_MEMO_SIZE`` at a time). ``on_unknown(model)`` runs the first time a model
        without a price is seen, for the caller's warning.
        """
        costs: dict[tuple[Any, ...], float | None] = {}

        def cost(model: str, usage: Mapping[str, Any]) -> float | None:
            get = usage.get
            breakdown = get("cache_creation")
            if breakdown is not None and type(breakdown) is not dict:
                return self.batch_cost(model, usage, geo=geo)  # odd shape: let it judge
            key = (
                model, get("input_tokens"), get("output_tokens"),
                get("cache_creation_input_tokens"), get("cache_read_input_tokens"),
                breakdown and breakdown.get("ephemeral_1h_input_tokens"),
                get("inference_geo"),
            )  # fmt: skip
            if key in costs:
                return costs[key]
            found = self.batch_cost(model, usage, geo=geo)
            if found is None and self.report_unknown(model):
                on_unknown(model)
            if len(costs) >= _MEMO_SIZE:
                costs.clear()
            costs[key] = found
            return found

        return cost

    def projected_cost(
        self,
        model: str,
        input_tokens: int,
        max_tokens: int,
        *,
        cached_tokens: int = 0,
        cache_ttl: str | None = None,
        geo: str | None = None,
    ) -> tuple[float, float] | None:
        """
        Bounds in USD at batch price for one request not sent yet, or None if unpriced.

        ``input_tokens`` is the whole prompt; ``cached_tokens`` of it carry
        ``cache_control`` with ``cache_ttl``. ``low`` pays the uncached input, a cache
        read of the cached part and no output; ``high`` pays a cache *write* of the cached
        part (a miss writes again) and a full ``max_tokens`` of output, thinking included
        (thinking counts toward ``max_tokens``).
        """
        if input_tokens < 0 or max_tokens < 0 or cached_tokens < 0:
            raise ValueError(
                f"token counts must be non-negative, got input_tokens={input_tokens}, "
                f"max_tokens={max_tokens}, cached_tokens={cached_tokens}"
            )
        pricing = self.pricing(model)
        if pricing is None:
            return None
        price = pricing.for_prompt(input_tokens)
        cached = min(cached_tokens, input_tokens) if cache_ttl else 0
        write = price.cache_write_1h if cache_ttl == "1h" else price.cache_write_5m
        plain = (input_tokens - cached) * price.input
        factor = (GEO_US_FACTOR if geo == "us" else 1.0) * BATCH_DISCOUNT / _MTOK
        low = (plain + cached * price.cache_read) * factor
        high = (plain + cached * write + max_tokens * price.output) * factor
        return low, high


def _override(
    model: str, fields: Any, base: ModelPricing | None, source: str
) -> ModelPricing:
    where = f'{source}: [prices."{model}"]'
    if not isinstance(fields, Mapping):
        raise ConfigError(f"{where} must be a table like {{ input = 3.0, output = 15.0 }}")
    unknown = sorted(set(fields) - set(_OVERRIDE_KEYS))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(_OVERRIDE_KEYS)})"
        )
    values: dict[str, float] = {}
    for key, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(
                f"{where}: {key} must be a non-negative number of USD per million tokens, "
                f"got {value!r}"
            )
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {key} must be finite, got {value!r}")
        values["cache_write_5m" if key == "cache_write" else key] = float(value)
    if base is None:
        missing = [k for k in ("input", "output") if k not in values]
        if missing:
            raise ConfigError(
                f"{where}: {model!r} is not in the model catalog, so both input and output "
                f"prices are needed (missing: {', '.join(missing)})"
            )
        start = _from_input(values["input"], values["output"])
        return ModelPricing(model, Prices(**{**_asdict(start), **values}))
    old = base.base
    scaled = _asdict(old)
    if "input" in values and old.input > 0:
        # The cache prices keep the catalog's ratios to input (each model has its own).
        ratio = values["input"] / old.input
        for key in ("cache_write_5m", "cache_write_1h", "cache_read"):
            scaled[key] = getattr(old, key) * ratio
    return ModelPricing(model, Prices(**{**scaled, **values}), base.long_prompt_tokens,
                        base.long)


def _asdict(prices: Prices) -> dict[str, float]:
    return {name: getattr(prices, name) for name in Prices.__slots__}


def _count(usage: Mapping[str, Any], key: str) -> int:
    value = usage.get(key)
    if type(value) is int and value >= 0:  # the common case, checked cheaply per row
        return value
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"usage.{key} must be a non-negative token count, got {value!r}")
    return int(value)


def format_budget(usd: float) -> str:
    """
    A budget as the operator set it: ``$25.00``, ``$0.12``, but ``$0.004`` (not ``$0.00``).

    Cents are enough for budgets of whole cents; a smaller one keeps up to four decimals,
    as costs are shown, so a test budget of a fraction of a cent does not read as zero.
    """
    if round(usd, 2) == usd:
        return f"${usd:,.2f}"
    return f"${usd:,.4f}".rstrip("0")


def estimate_tokens(text: str) -> int:
    """
    A rough token count for ``text``: one token per four characters, rounded up.

    This is an estimate, good for budgets and ``batchd estimate``, not for billing:
    English prose is close, code and non-Latin scripts use more tokens per character.
    The bill comes from the API's ``usage`` (:meth:`PriceTable.batch_cost`).
    """
    return -(-len(text) // CHARS_PER_TOKEN)


def estimate_request_tokens(params: Mapping[str, Any]) -> int:
    """
    :func:`estimate_tokens` over a Messages request: tool definitions (as JSON: they are
    sent, and billed, with every request), ``system`` and the messages.

    Images and documents are not counted, so this is a lower estimate for requests that
    carry them.
    """
    total = estimate_tool_tokens(params.get("tools"))
    total += _text_tokens(params.get("system"))
    for message in params.get("messages") or ():
        if isinstance(message, Mapping):
            total += _text_tokens(message.get("content"))
    return total


def estimate_tool_tokens(tools: Any) -> int:
    """:func:`estimate_tokens` over each tool definition's compact JSON."""
    if not isinstance(tools, list | tuple):
        return 0
    return sum(estimate_tokens(orjson.dumps(tool).decode()) for tool in tools)


def _text_tokens(content: Any) -> int:
    if isinstance(content, str):
        return estimate_tokens(content)
    if isinstance(content, list | tuple):
        return sum(
            estimate_tokens(block["text"])
            for block in content
            if isinstance(block, Mapping) and isinstance(block.get("text"), str)
        )
    return 0


_DEFAULT: PriceTable | None = None


def _default() -> PriceTable:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = PriceTable()
    return _DEFAULT


def batch_cost(model: str, usage: Mapping[str, Any]) -> float | None:
    """:meth:`PriceTable.batch_cost` with the catalog's prices."""
    return _default().batch_cost(model, usage)


def projected_cost(model: str, input_tokens: int, max_tokens: int) -> tuple[float, float] | None:
    """:meth:`PriceTable.projected_cost` with the catalog's prices, no caching."""
    return _default().projected_cost(model, input_tokens, max_tokens)
