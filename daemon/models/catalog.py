"""
The model catalog: one data file describing every model the API knows, typed.

The emulator answers from it and the engine checks, routes and prices from it, so
what the tests see and what batchd decides come from the same facts. The data is
``catalog.toml`` beside this module; ``extra`` files (``batchd emulator
--models FILE``, a config's ``[models]``) add or override models without a
release, because a new model appears on the API long before a new batchd does.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = (
    "EFFORTS",
    "THINKING_TYPES",
    "Catalog",
    "CatalogError",
    "Lookup",
    "ModelInfo",
    "Prices",
    "default_catalog",
    "effort_at_most",
    "load_catalog",
    "with_models",
)

#: Effort levels, lowest first (the API's order; "xhigh" exists only on newer models).
EFFORTS = ("low", "medium", "high", "xhigh", "max")
#: Every ``thinking.type`` the SDK knows.
THINKING_TYPES = ("enabled", "adaptive", "disabled", "between_tools")
_PRICE_KEYS = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
_DATA = Path(__file__).with_name("catalog.toml")
_FIELDS = frozenset(
    {
        "like", "status", "released", "retires", "max_output", "max_output_beta",
        "context_window", "thinking_default", "thinking_types", "disabled_max_effort",
        "efforts", "effort_default", "structured_output", "prefill", "forced_tool_choice",
        "min_cache_tokens", "sampling", "inference_geo_us", "price", "long_prompt_tokens",
        "price_long",
    }
)
_REQUIRED = (
    "status", "max_output", "context_window", "thinking_default", "thinking_types", "efforts",
    "structured_output", "prefill", "forced_tool_choice", "min_cache_tokens", "sampling",
    "inference_geo_us",
)


class CatalogError(ValueError):
    """A catalog file that cannot be used; the message names the file, model and field."""


def effort_at_most(effort: str, ceiling: str) -> bool:
    """Whether ``effort`` is ``ceiling`` or lower."""
    return EFFORTS.index(effort) <= EFFORTS.index(ceiling)


@dataclass(frozen=True, slots=True)
class Prices:
    """List prices in USD per million tokens (before the batch discount)."""

    input: float
    output: float
    cache_write_5m: float
    cache_write_1h: float
    cache_read: float


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What one model accepts, returns and costs."""

    id: str
    status: str
    max_output: int
    context_window: int
    thinking_default: str
    thinking_types: frozenset[str]
    efforts: tuple[str, ...]
    structured_output: bool
    prefill: bool
    forced_tool_choice: bool
    min_cache_tokens: int
    sampling: str
    inference_geo_us: bool
    released: dt.date | None = None
    retires: dt.date | None = None
    max_output_beta: int | None = None
    disabled_max_effort: str | None = None
    effort_default: str | None = None
    price: Prices | None = None
    long_prompt_tokens: int | None = None
    price_long: Prices | None = None
    aliases: tuple[str, ...] = field(default=())

    def retired_on(self, today: dt.date) -> bool:
        """Whether the model no longer answers on ``today``."""
        return self.retires is not None and today >= self.retires

    def thinks_by_default(self) -> bool:
        return self.thinking_default != "disabled"

    def prices_for(self, prompt_tokens: int) -> Prices | None:
        """The price tier for a request whose whole prompt is ``prompt_tokens`` long."""
        if (
            self.long_prompt_tokens is not None
            and self.price_long is not None
            and prompt_tokens > self.long_prompt_tokens
        ):
            return self.price_long
        return self.price


@dataclass(frozen=True, slots=True)
class Lookup:
    """
    What a model id resolves to.

    Exactly one of ``model`` (a model the catalog knows, perhaps through an alias)
    and ``retired`` (the day a retired id stopped answering) is set, or neither for
    an id the catalog has never heard of.
    """

    requested: str
    model: ModelInfo | None = None
    retired: dt.date | None = None

    @property
    def known(self) -> bool:
        return self.model is not None or self.retired is not None


class Catalog:
    """Models by id, their aliases, and ids retired before the current list."""

    def __init__(
        self,
        models: Mapping[str, ModelInfo],
        aliases: Mapping[str, str],
        retired: Mapping[str, dt.date],
        beta_output_300k: str | None,
    ) -> None:
        self.models = dict(models)
        self.aliases = dict(aliases)
        self.retired = dict(retired)
        self.beta_output_300k = beta_output_300k

    def __iter__(self) -> Iterator[ModelInfo]:
        return iter(self.models.values())

    def ids(self) -> list[str]:
        """Every id a request may name (models and aliases), retired ones excluded."""
        return sorted([*self.models, *self.aliases])

    def lookup(self, model_id: str) -> Lookup:
        """Resolve ``model_id`` through aliases; retirement by date is the caller's to judge."""
        target = self.aliases.get(model_id, model_id)
        info = self.models.get(target)
        if info is not None:
            return Lookup(model_id, model=info, retired=info.retires)
        retired = self.retired.get(model_id)
        return Lookup(model_id, retired=retired)

    def get(self, model_id: str) -> ModelInfo | None:
        return self.lookup(model_id).model

    def merged(self, other: Catalog) -> Catalog:
        """This catalog with ``other``'s models, aliases and retirements on top."""
        return Catalog(
            {**self.models, **other.models},
            {**self.aliases, **other.aliases},
            {**self.retired, **other.retired},
            other.beta_output_300k or self.beta_output_300k,
        )


def _date(where: str, value: Any) -> dt.date:
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    raise CatalogError(f"{where}: expected a date YYYY-MM-DD, got {value!r}")


def _prices(where: str, value: Any) -> Prices:
    if not isinstance(value, Mapping):
        raise CatalogError(f"{where}: expected a table of {', '.join(_PRICE_KEYS)}")
    unknown = sorted(set(value) - set(_PRICE_KEYS))
    if unknown:
        known = ", ".join(_PRICE_KEYS)
        raise CatalogError(f"{where}: unknown price {unknown[0]!r} (known: {known})")
    numbers: dict[str, float] = {}
    for key in _PRICE_KEYS:
        number = value.get(key)
        if isinstance(number, bool) or not isinstance(number, int | float) or number < 0:
            raise CatalogError(f"{where}.{key}: expected a number >= 0, got {number!r}")
        numbers[key] = float(number)
    return Prices(**numbers)


def _flatten(
    model_id: str, tables: Mapping[str, Any], where: str, seen: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A model's fields with ``like`` chains resolved (the nearest table wins)."""
    table = tables[model_id]
    if not isinstance(table, Mapping):
        raise CatalogError(f"{where}: models.{model_id!r}: expected a table")
    unknown = sorted(set(table) - _FIELDS)
    if unknown:
        raise CatalogError(f"{where}: models.{model_id!r}: unknown field {unknown[0]!r}")
    base: dict[str, Any] = {}
    parent = table.get("like")
    if parent is not None:
        if parent in seen or parent == model_id:
            raise CatalogError(f"{where}: models.{model_id!r}: `like` loops through {parent!r}")
        if parent not in tables:
            raise CatalogError(f"{where}: models.{model_id!r}: like = {parent!r} is not a model")
        base = _flatten(parent, tables, where, (*seen, model_id))
        # A sibling inherits capabilities, not a retirement date.
        base.pop("retires", None)
    base.update({k: v for k, v in table.items() if k != "like"})
    return base


def _model(model_id: str, data: Mapping[str, Any], where: str) -> ModelInfo:
    here = f"{where}: models.{model_id!r}"
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise CatalogError(f"{here}: missing {missing[0]!r}")

    def integer(key: str) -> int | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CatalogError(f"{here}.{key}: expected a whole number >= 1, got {value!r}")
        return value

    def flag(key: str) -> bool:
        value = data[key]
        if not isinstance(value, bool):
            raise CatalogError(f"{here}.{key}: expected true or false, got {value!r}")
        return value

    def choice(key: str, allowed: tuple[str, ...]) -> str | None:
        value = data.get(key)
        if value is not None and value not in allowed:
            raise CatalogError(f"{here}.{key}: {value!r} is not one of {', '.join(allowed)}")
        return value

    thinking = data["thinking_types"]
    efforts = data["efforts"]
    if not isinstance(thinking, list) or any(t not in THINKING_TYPES for t in thinking):
        known = ", ".join(THINKING_TYPES)
        raise CatalogError(f"{here}.thinking_types: expected a list of {known}")
    if not isinstance(efforts, list) or any(e not in EFFORTS for e in efforts):
        raise CatalogError(f"{here}.efforts: expected a list of {', '.join(EFFORTS)}")
    status = choice("status", ("active", "legacy", "deprecated"))
    default = choice("thinking_default", ("disabled", "adaptive"))
    sampling = choice("sampling", ("default_only", "thinking_limited"))
    assert status is not None and default is not None and sampling is not None
    max_output, context = integer("max_output"), integer("context_window")
    min_cache = integer("min_cache_tokens")
    assert max_output is not None and context is not None and min_cache is not None
    price = data.get("price")
    price_long = data.get("price_long")
    return ModelInfo(
        id=model_id,
        status=status,
        max_output=max_output,
        context_window=context,
        thinking_default=default,
        thinking_types=frozenset(thinking),
        efforts=tuple(efforts),
        structured_output=flag("structured_output"),
        prefill=flag("prefill"),
        forced_tool_choice=flag("forced_tool_choice"),
        min_cache_tokens=min_cache,
        sampling=sampling,
        inference_geo_us=flag("inference_geo_us"),
        released=_date(f"{here}.released", data["released"]) if "released" in data else None,
        retires=_date(f"{here}.retires", data["retires"]) if "retires" in data else None,
        max_output_beta=integer("max_output_beta"),
        disabled_max_effort=choice("disabled_max_effort", EFFORTS),
        effort_default=choice("effort_default", EFFORTS),
        price=_prices(f"{here}.price", price) if price is not None else None,
        long_prompt_tokens=integer("long_prompt_tokens"),
        price_long=_prices(f"{here}.price_long", price_long) if price_long is not None else None,
    )


def parse_catalog(data: Mapping[str, Any], where: str) -> Catalog:
    """A catalog from parsed TOML/JSON data; ``where`` names it in errors."""
    unknown = sorted(set(data) - {"models", "aliases", "retired", "beta"})
    if unknown:
        raise CatalogError(
            f"{where}: unknown table {unknown[0]!r} (known: models, aliases, retired, beta)"
        )
    tables = data.get("models", {})
    aliases = data.get("aliases", {})
    retired_raw = data.get("retired", {})
    beta = data.get("beta", {})
    parts = {"models": tables, "aliases": aliases, "retired": retired_raw, "beta": beta}
    for name, value in parts.items():
        if not isinstance(value, Mapping):
            raise CatalogError(f"{where}: {name} must be a table")
    models: dict[str, ModelInfo] = {}
    for model_id in tables:
        models[model_id] = _model(model_id, _flatten(model_id, tables, where), where)
    for alias, target in aliases.items():
        if not isinstance(target, str):
            raise CatalogError(f"{where}: aliases.{alias!r}: expected a model id")
    by_target: dict[str, list[str]] = {}
    for alias, target in aliases.items():
        by_target.setdefault(target, []).append(alias)
    for model_id, names in by_target.items():
        if model_id in models:
            models[model_id] = dataclasses.replace(models[model_id], aliases=tuple(sorted(names)))
    retired = {
        model_id: _date(f"{where}: retired.{model_id!r}", day)
        for model_id, day in retired_raw.items()
    }
    output_300k = beta.get("output_300k")
    return Catalog(models, aliases, retired, output_300k if isinstance(output_300k, str) else None)


def load_catalog(*extra: str | Path) -> Catalog:
    """
    The bundled catalog with each ``extra`` file (TOML, or JSON by suffix) laid on top.

    Raises:
        CatalogError: naming the file, model and field at fault.
    """
    catalog = parse_catalog(_read(_DATA), str(_DATA))
    for path in extra:
        catalog = catalog.merged(_parse_extra(Path(path), catalog))
    return catalog


def _corrections(
    tables: Mapping[str, Any], bundled: Mapping[str, Any], aliases: Mapping[str, str]
) -> dict[str, Any]:
    """
    ``tables`` with each table for a bundled model (or its alias) and no ``like`` laid over
    that model's own table: a correction names only what it corrects.
    """
    out: dict[str, Any] = {}
    for model_id, table in tables.items():
        target = aliases.get(model_id, model_id)
        if target in bundled and isinstance(table, Mapping) and "like" not in table:
            out[target] = {**bundled[target], **table}
        else:
            out[model_id] = table
    return out


def _parse_extra(path: Path, base: Catalog) -> Catalog:
    """An extra file may say ``like = "<bundled id>"`` and name only what differs."""
    data = _read(path)
    tables = dict(data.get("models", {})) if isinstance(data.get("models", {}), Mapping) else {}
    bundled_data = _read(_DATA)
    bundled = bundled_data.get("models", {})
    tables = _corrections(tables, bundled, bundled_data.get("aliases", {}))
    # Make bundled models visible to `like` chains in the extra file.
    merged_tables = {**bundled, **tables}
    data = {**data, "models": merged_tables}
    full = parse_catalog(data, str(path))
    keep = {model_id: full.models[model_id] for model_id in tables}
    return Catalog(keep, full.aliases, full.retired, full.beta_output_300k)


def with_models(models: Mapping[str, Any], where: str) -> Catalog:
    """
    The bundled catalog with ``models`` (a config's ``[models."<id>"]`` tables) on top.

    A table may say ``like = "<bundled id>"`` and name only what differs, as an extra
    file may. Raises :class:`CatalogError` naming ``where`` and the model.
    """
    if not models:
        return default_catalog()
    data = _read(_DATA)
    bundled, aliases = data.get("models", {}), data.get("aliases", {})
    # `like` may name an alias ("claude-haiku-4-5") as well as the model it stands for.
    models = {
        model_id: {**table, "like": aliases.get(table["like"], table["like"])}
        if isinstance(table, Mapping) and isinstance(table.get("like"), str) else table
        for model_id, table in models.items()
    }
    models = _corrections(models, bundled, aliases)
    full = parse_catalog({"models": {**bundled, **models}}, where)
    keep = {model_id: full.models[model_id] for model_id in models}
    return default_catalog().merged(Catalog(keep, {}, {}, None))


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read model catalog: {exc.strerror}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        kind = path.suffix.lstrip(".") or "TOML"
        raise CatalogError(f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: expected a table at the top level")
    return data


_DEFAULT: Catalog | None = None


def default_catalog() -> Catalog:
    """The bundled catalog, read once per process."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_catalog()
    return _DEFAULT
