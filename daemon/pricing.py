"""
What a batch costs: list prices per model, the batch discount, and rough projections.

Prices are USD per million tokens at **list** price, as Anthropic publishes them; the
Message Batches API charges half of that for every token kind (the prompt-caching
multipliers stack with the discount). The table is a snapshot: prices change and new
models appear, so a pipeline can override or add models in its config
(``[prices."claude-x"] input = 3.0, output = 15.0``).

An unknown model is priced as the most expensive known one, never as free: a budget
that under-counts lets spend run past it, one that over-counts only stops early. The
engine warns once per model (:meth:`PriceTable.cost_function`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from plugins.errors import ConfigError

__all__ = (
    "BATCH_DISCOUNT",
    "LIST_PRICES",
    "ModelPrice",
    "PriceTable",
    "batch_cost",
    "estimate_request_tokens",
    "estimate_tokens",
    "projected_cost",
)

BATCH_DISCOUNT = 0.5
CACHE_WRITE_5M_FACTOR = 1.25
CACHE_WRITE_1H_FACTOR = 2.0
CACHE_READ_FACTOR = 0.1
CHARS_PER_TOKEN = 4
_MTOK = 1_000_000
_MEMO_SIZE = 4096  # distinct usages remembered by a cost function


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """
    List prices in USD per million tokens for one model.

    ``known`` is false for the conservative stand-in used when a model is not in the table.
    """

    input: float
    output: float
    cache_write: float
    cache_read: float
    known: bool = True

    @classmethod
    def from_list(cls, input: float, output: float) -> ModelPrice:
        """Derive the cache prices from the input price, as Anthropic's table does."""
        return cls(
            input=input,
            output=output,
            cache_write=input * CACHE_WRITE_5M_FACTOR,
            cache_read=input * CACHE_READ_FACTOR,
        )


# List prices (USD / MTok). Dated ids and "-latest" aliases resolve by prefix.
LIST_PRICES: dict[str, ModelPrice] = {
    "claude-opus-4-5": ModelPrice.from_list(5.0, 25.0),
    "claude-opus-4-1": ModelPrice.from_list(15.0, 75.0),
    "claude-opus-4": ModelPrice.from_list(15.0, 75.0),
    "claude-sonnet-4-5": ModelPrice.from_list(3.0, 15.0),
    "claude-sonnet-4": ModelPrice.from_list(3.0, 15.0),
    "claude-3-7-sonnet": ModelPrice.from_list(3.0, 15.0),
    "claude-haiku-4-5": ModelPrice.from_list(1.0, 5.0),
    "claude-3-5-haiku": ModelPrice.from_list(0.80, 4.0),
    # Anthropic's table rounds Haiku 3's cache prices rather than applying the factors.
    "claude-3-haiku": ModelPrice(input=0.25, output=1.25, cache_write=0.30, cache_read=0.03),
}

# Alias spellings that are not a base id plus a date or "-latest".
_ALIASES = {"claude-opus-4-0": "claude-opus-4", "claude-sonnet-4-0": "claude-sonnet-4"}

# What may follow a base id: a date (-20251001, Vertex's @20251001) or -latest.
_SUFFIX = re.compile(r"(?:[-@]\d{8}|-latest)?")

_OVERRIDE_KEYS = ("input", "output", "cache_write", "cache_read")


class PriceTable:
    """
    The built-in list prices with a config's overrides on top.

    Args:
        overrides: ``{model: {"input": …, "output": …, "cache_write": …, "cache_read": …}}``
            in USD per million tokens at list price. For a model already in the table any
            subset may be given; a new model needs ``input`` and ``output`` (cache prices
            default to 1.25x and 0.1x input).
        source: Named in error messages (the config file's path).

    Raises:
        ConfigError: An override is not a table of non-negative numbers, names an unknown
            key, or adds a model without ``input`` and ``output``.

    .. versionadded:: 0.1
    """

    def __init__(
        self, overrides: Mapping[str, Mapping[str, Any]] | None = None, *, source: str = "config"
    ) -> None:
        self._prices = dict(LIST_PRICES)
        self._resolved: dict[str, ModelPrice | None] = {}
        for model, fields in (overrides or {}).items():
            self._prices[model] = _override(model, fields, self._lookup(model), source)
        self._fallback = max(self._prices.values(), key=lambda p: (p.output, p.input))
        self._reported: set[str] = set()

    def _resolve(self, model: str) -> ModelPrice | None:
        # Called for every result row: remember each model id's answer.
        if model in self._resolved:
            return self._resolved[model]
        found = self._resolved[model] = self._lookup(model)
        return found

    def _lookup(self, model: str) -> ModelPrice | None:
        model = _ALIASES.get(model, model)
        best: str | None = None
        for name in self._prices:
            if model.startswith(name) and _SUFFIX.fullmatch(model[len(name) :]):
                if best is None or len(name) > len(best):
                    best = name
        return None if best is None else self._prices[best]

    def price(self, model: str) -> ModelPrice:
        """
        The list price for ``model``; a dated id or ``-latest`` alias resolves to its base.

        An unknown model gets the most expensive known price with ``known=False``.
        """
        found = self._resolve(model)
        if found is not None:
            return found
        fallback = self._fallback
        return ModelPrice(
            fallback.input, fallback.output, fallback.cache_write, fallback.cache_read, False
        )

    def report_unknown(self, model: str) -> bool:
        """True the first time an unknown ``model`` is asked about, so the caller warns once."""
        if self._resolve(model) is not None or model in self._reported:
            return False
        self._reported.add(model)
        return True

    def batch_cost(self, model: str, usage: Mapping[str, Any]) -> float:
        """
        USD for one result at batch price, from the API's ``usage`` block.

        Reads ``input_tokens``, ``output_tokens``, ``cache_creation_input_tokens`` and
        ``cache_read_input_tokens`` (missing or null counts as 0); 1-hour cache writes
        named in ``cache_creation.ephemeral_1h_input_tokens`` are priced at 2x input.

        Raises:
            ValueError: A count is negative or not a number.
        """
        price = self.price(model)
        input_tokens = _count(usage, "input_tokens")
        output_tokens = _count(usage, "output_tokens")
        cache_write = _count(usage, "cache_creation_input_tokens")
        cache_read = _count(usage, "cache_read_input_tokens")
        breakdown = usage.get("cache_creation")
        if breakdown is not None and not isinstance(breakdown, Mapping):
            raise ValueError(f"usage.cache_creation must be an object, got {breakdown!r}")
        write_1h = _count(breakdown, "ephemeral_1h_input_tokens") if breakdown else 0
        write_1h = min(write_1h, cache_write)
        list_usd = (
            input_tokens * price.input
            + output_tokens * price.output
            + (cache_write - write_1h) * price.cache_write
            + write_1h * price.input * CACHE_WRITE_1H_FACTOR
            + cache_read * price.cache_read
        ) / _MTOK
        return list_usd * BATCH_DISCOUNT

    def cost_function(
        self, on_unknown: Callable[[str], None]
    ) -> Callable[[str, Mapping[str, Any]], float]:
        """
        :meth:`batch_cost` for the collector's hot path, called once per result row.

        A results file repeats a few hundred distinct usages a hundred thousand times,
        so each distinct (model, usage) is priced once and remembered (at most
        ``_MEMO_SIZE`` at a time). ``on_unknown(model)`` runs the first time a model
        without a price is seen, for the caller's warning.
        """
        costs: dict[tuple[Any, ...], float] = {}

        def cost(model: str, usage: Mapping[str, Any]) -> float:
            get = usage.get
            breakdown = get("cache_creation")
            if breakdown is not None and type(breakdown) is not dict:
                return self.batch_cost(model, usage)  # odd shape: let batch_cost judge it
            key = (
                model, get("input_tokens"), get("output_tokens"),
                get("cache_creation_input_tokens"), get("cache_read_input_tokens"),
                breakdown and breakdown.get("ephemeral_1h_input_tokens"),
            )  # fmt: skip
            found = costs.get(key)
            if found is None:
                if self.report_unknown(model):
                    on_unknown(model)
                found = self.batch_cost(model, usage)
                if len(costs) >= _MEMO_SIZE:
                    costs.clear()
                costs[key] = found
            return found

        return cost

    def projected_cost(
        self, model: str, input_tokens: int, max_tokens: int
    ) -> tuple[float, float]:
        """
        Bounds in USD at batch price for a request not sent yet.

        ``low`` pays for the input alone (an answer of zero tokens); ``high`` adds a full
        ``max_tokens`` of output. Neither counts caching. When ``input_tokens`` comes from
        :func:`estimate_tokens` both inherit its error.
        """
        if input_tokens < 0 or max_tokens < 0:
            raise ValueError(
                f"token counts must be non-negative, got input_tokens={input_tokens}, "
                f"max_tokens={max_tokens}"
            )
        price = self.price(model)
        low = input_tokens * price.input / _MTOK * BATCH_DISCOUNT
        high = low + max_tokens * price.output / _MTOK * BATCH_DISCOUNT
        return low, high


def _override(
    model: str, fields: Any, base: ModelPrice | None, source: str
) -> ModelPrice:
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
        values[key] = float(value)
    if base is None:
        missing = [k for k in ("input", "output") if k not in values]
        if missing:
            raise ConfigError(
                f"{where}: {model!r} is not a built-in model, so both input and output "
                f"prices are needed (missing: {', '.join(missing)})"
            )
        base = ModelPrice.from_list(values["input"], values["output"])
    input_price = values.get("input", base.input)
    return ModelPrice(
        input=input_price,
        output=values.get("output", base.output),
        cache_write=values.get(
            "cache_write",
            input_price * CACHE_WRITE_5M_FACTOR if "input" in values else base.cache_write,
        ),
        cache_read=values.get(
            "cache_read",
            input_price * CACHE_READ_FACTOR if "input" in values else base.cache_read,
        ),
    )


def _count(usage: Mapping[str, Any], key: str) -> int:
    value = usage.get(key)
    if type(value) is int and value >= 0:  # the common case, checked cheaply per row
        return value
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"usage.{key} must be a non-negative token count, got {value!r}")
    return int(value)


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
    :func:`estimate_tokens` over the text of a Messages request (``system`` and messages).

    Images, documents and tool definitions are not counted, so this is a lower estimate
    for requests that carry them.
    """
    total = _text_tokens(params.get("system"))
    for message in params.get("messages") or ():
        if isinstance(message, Mapping):
            total += _text_tokens(message.get("content"))
    return total


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


_DEFAULT = PriceTable()


def batch_cost(model: str, usage: Mapping[str, Any]) -> float:
    """:meth:`PriceTable.batch_cost` with the built-in list prices."""
    return _DEFAULT.batch_cost(model, usage)


def projected_cost(model: str, input_tokens: int, max_tokens: int) -> tuple[float, float]:
    """:meth:`PriceTable.projected_cost` with the built-in list prices."""
    return _DEFAULT.projected_cost(model, input_tokens, max_tokens)
