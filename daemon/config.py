"""
The TOML configuration, validated up front.

Every mistake is reported with the file, the table and the key, because the
person reading the message is an operator at a terminal, not a developer
with a debugger. Secrets are never read from the file: only from the
environment or systemd credentials.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from daemon.durations import parse_duration, parse_size
from daemon.request_options import (
    SDK_API_VERSION,
    RequestOptions,
    check_extra,
    check_sampling_version,
    parse_request_options,
)
from daemon.template import Template
from plugins.errors import ConfigError

__all__ = (
    "MAX_BATCH_BYTES",
    "MAX_BATCH_REQUESTS",
    "TIER_QUEUE_LIMITS",
    "ApiConfig",
    "BatchingConfig",
    "Config",
    "OutputConfig",
    "PipelineConfig",
    "PluginSpec",
    "RequestConfig",
    "load_config",
)

MAX_BATCH_REQUESTS = 100_000
MAX_BATCH_BYTES = 256 * 1000 * 1000
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# The processing queue each documented tier grants (requests not yet processed, all batches).
TIER_QUEUE_LIMITS = {"start": 200_000, "build": 300_000, "scale": 500_000}
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ApiConfig:
    base_url: str | None = None
    # 45 s ± a third: every 30–60 s, calm enough for month-long runs.
    poll_interval: float = 45.0
    poll_jitter: float = 1 / 3
    max_retries: int = 4
    timeout: float = 600.0
    not_found_window: float = 120.0
    queue_limit: int | None = None
    # The anthropic-version header sent; its rules decide what a request may carry.
    version: str = SDK_API_VERSION
    tier: str | None = None


@dataclass(frozen=True, slots=True)
class RequestConfig:
    model: Template
    max_tokens: int
    user: Template
    system: str | None = None
    options: RequestOptions = field(default_factory=RequestOptions)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BatchingConfig:
    max_requests: int = 10_000
    max_bytes: int = 200 * 1000 * 1000
    linger: float = 60.0
    max_in_flight: int = 4


@dataclass(frozen=True, slots=True)
class OutputConfig:
    allowed: tuple[str, ...] | None = None
    strip: bool = True
    lowercase: bool = False


@dataclass(frozen=True, slots=True)
class PluginSpec:
    type: str
    options: dict[str, Any]
    where: str


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    name: str
    source: PluginSpec
    request: RequestConfig
    batching: BatchingConfig
    sinks: tuple[PluginSpec, ...]
    dead_letter: PluginSpec
    custom_id: Template | None = None
    max_attempts: int = 3
    budget_usd: float | None = None
    output: OutputConfig = OutputConfig()
    keep_message: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    state_dir: Path
    api: ApiConfig
    pipelines: tuple[PipelineConfig, ...]
    metrics_port: int | None = None
    log_level: str = "info"
    prices: dict[str, dict[str, float]] = field(default_factory=dict)
    # Models the bundled catalog lacks, or corrections to it (``[models."id"] like = …``).
    models: dict[str, Any] = field(default_factory=dict)

    def pipeline(self, name: str) -> PipelineConfig:
        for pipeline in self.pipelines:
            if pipeline.name == name:
                return pipeline
        known = ", ".join(p.name for p in self.pipelines)
        raise ConfigError(f"{self.path}: no pipeline named {name!r} (pipelines: {known})")


class _Table:
    """One TOML table being read: tracks which keys were used to flag typos."""

    def __init__(
        self, data: Any, where: str, path: Path, section: str = "", owner: str = ""
    ) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: {where} must be a table, got {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.where = where
        self.path = path
        # The TOML name of this table ("pipeline.batching") and whose it is (" of 'tickets'"),
        # so nested tables are named the way the file writes them.
        self.section = section
        self.owner = owner
        self.used: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {self.where}: {key}: {message}")

    def get(self, key: str, kind: type[T] | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self.error(key, f"expected a number, got {value!r}")
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.error(key, f"expected {names}, got {value!r}")
        return value

    def require(self, key: str, kind: type[T] | tuple[type, ...]) -> Any:
        if key not in self.data:
            raise self.error(key, "is required")
        return self.get(key, kind)

    def convert(self, key: str, fn: Callable[[Any], T], default: T) -> T:
        self.used.add(key)
        if key not in self.data:
            return default
        try:
            return fn(self.data[key])
        except (ValueError, TypeError) as exc:
            raise self.error(key, str(exc)) from None

    def table(self, key: str, *, required: bool = False) -> _Table:
        self.used.add(key)
        if key not in self.data and required:
            raise self.error(key, "is required")
        section = f"{self.section}.{key}" if self.section else key
        return _Table(
            self.data.get(key, {}), f"[{section}]{self.owner}", self.path, section, self.owner
        )

    def finish(self, allow_extra: bool = False) -> dict[str, Any]:
        extra = {k: v for k, v in self.data.items() if k not in self.used}
        if extra and not allow_extra:
            key = sorted(extra)[0]
            hint = difflib.get_close_matches(key, sorted(self.used), n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            valid = ", ".join(sorted(self.used))
            raise self.error(key, f"unknown key{suggestion}; valid keys: {valid}")
        return extra


def _template(table: _Table, key: str, value: str) -> Template:
    try:
        return Template(value)
    except ValueError as exc:
        raise table.error(key, str(exc)) from None


def _positive(table: _Table, key: str, value: int | float, limit: float | None = None) -> None:
    if value <= 0:
        raise table.error(key, f"must be positive, got {value}")
    if limit is not None and value > limit:
        raise table.error(key, f"must be at most {limit:,} (the API's limit), got {value:,}")


def _plugin(data: Any, where: str, path: Path) -> PluginSpec:
    table = _Table(data, where, path)
    type_name = table.require("type", str)
    options = table.finish(allow_extra=True)
    return PluginSpec(type=type_name, options=options, where=f"{path}: {where}")


def _request(table: _Table) -> RequestConfig:
    model = _template(table, "model", table.require("model", str))
    max_tokens = table.require("max_tokens", int)
    _positive(table, "max_tokens", max_tokens)
    user = _template(table, "user", table.require("user", str))
    extra = table.get("extra", dict, {})
    check_extra(table, extra)
    result = RequestConfig(
        model=model,
        max_tokens=max_tokens,
        user=user,
        system=table.get("system", str),
        options=parse_request_options(table, table.path.resolve().parent),
        extra=extra,
    )
    table.finish()
    return result


def _batching(table: _Table) -> BatchingConfig:
    max_requests = table.get("max_requests", int, 10_000)
    _positive(table, "max_requests", max_requests, MAX_BATCH_REQUESTS)
    max_bytes = table.convert("max_bytes", lambda v: parse_size(v, what="size"), 200 * 1000**2)
    _positive(table, "max_bytes", max_bytes, MAX_BATCH_BYTES)
    linger = table.convert("linger", lambda v: parse_duration(v, what="duration"), 60.0)
    max_in_flight = table.get("max_in_flight", int, 4)
    _positive(table, "max_in_flight", max_in_flight)
    table.finish()
    return BatchingConfig(max_requests, max_bytes, linger, max_in_flight)


def _output(table: _Table) -> OutputConfig:
    allowed = table.get("allowed", list)
    if allowed is not None and not all(isinstance(a, str) for a in allowed):
        raise table.error("allowed", "must be a list of strings")
    out = OutputConfig(
        allowed=tuple(allowed) if allowed is not None else None,
        strip=table.get("strip", bool, True),
        lowercase=table.get("lowercase", bool, False),
    )
    table.finish()
    return out


def _pipeline(data: Any, index: int, path: Path) -> PipelineConfig:
    table = _Table(data, f"[[pipeline]] #{index + 1}", path)
    name = table.require("name", str)
    if not _NAME.match(name):
        raise table.error("name", f"{name!r} must match [A-Za-z0-9_-]{{1,40}} (it names files)")
    table.where = f"[[pipeline]] {name!r}"
    table.section, table.owner = "pipeline", f" of {name!r}"
    source_data = table.table("source", required=True).data
    source = _plugin(source_data, f"[pipeline.source] of {name!r}", path)
    table.used.add("source")
    sinks_data = table.get("sink", list, [])
    if not sinks_data:
        raise table.error("sink", "at least one [[pipeline.sink]] is required")
    sinks = tuple(
        _plugin(s, f"[[pipeline.sink]] #{i + 1} of {name!r}", path)
        for i, s in enumerate(sinks_data)
    )
    dead_data = table.get("dead_letter", dict, {"type": "jsonl", "path": f"dead-letters/{name}"})
    dead_letter = _plugin(dead_data, f"[pipeline.dead_letter] of {name!r}", path)
    custom_id = table.get("custom_id", str)
    max_attempts = table.get("max_attempts", int, 3)
    _positive(table, "max_attempts", max_attempts, 20)
    budget = table.get("budget_usd", (int, float))
    if budget is not None:
        _positive(table, "budget_usd", budget)
    result = PipelineConfig(
        name=name,
        source=source,
        request=_request(table.table("request", required=True)),
        batching=_batching(table.table("batching")),
        sinks=sinks,
        dead_letter=dead_letter,
        custom_id=_template(table, "custom_id", custom_id) if custom_id else None,
        max_attempts=max_attempts,
        budget_usd=float(budget) if budget is not None else None,
        output=_output(table.table("output")),
        keep_message=table.get("keep_message", bool, False),
    )
    table.finish()
    return result


def _api(table: _Table) -> ApiConfig:
    def duration(key: str, default: float) -> float:
        return table.convert(key, lambda v: parse_duration(v, what="duration"), default)

    result = ApiConfig(
        base_url=table.get("base_url", str),
        poll_interval=duration("poll_interval", 45.0),
        poll_jitter=float(table.get("poll_jitter", (int, float), 1 / 3)),
        max_retries=table.get("max_retries", int, 4),
        timeout=duration("timeout", 600.0),
        not_found_window=duration("not_found_window", 120.0),
        queue_limit=table.get("queue_limit", int),
        version=table.get("version", str, SDK_API_VERSION),
        tier=table.get("tier", str),
    )
    if not _VERSION.fullmatch(result.version):
        raise table.error("version", f"must be an API version date like {SDK_API_VERSION!r} "
                          f"(the installed SDK's), got {result.version!r}")
    if result.tier is not None and result.tier not in TIER_QUEUE_LIMITS:
        raise table.error("tier", f"must be one of {', '.join(TIER_QUEUE_LIMITS)}, "
                          f"got {result.tier!r}")
    if result.queue_limit is not None:
        _positive(table, "queue_limit", result.queue_limit)
    if not 0 <= result.poll_jitter <= 1:
        raise table.error("poll_jitter", f"must be between 0 and 1, got {result.poll_jitter}")
    if "api_key" in table.data:
        raise table.error("api_key", "secrets are not read from the config file; "
                          "set ANTHROPIC_API_KEY or a systemd credential")
    table.finish()
    return result


def load_config(path: str | Path, *, state_dir: str | Path | None = None) -> Config:
    """Read and validate ``path``; ``state_dir`` overrides the file's (systemd's StateDirectory)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    top = _Table(data, "top level", path)
    base = path.resolve().parent
    in_file = top.get("state_dir", str, "state")  # read even when overridden: it is no typo
    state = state_dir if state_dir is not None else in_file
    state_path = Path(state).expanduser()
    if not state_path.is_absolute():
        state_path = base / state_path
    pipelines_data = top.get("pipeline", list, [])
    if not pipelines_data:
        raise top.error("pipeline", "at least one [[pipeline]] table is required")
    pipelines = tuple(_pipeline(p, i, path) for i, p in enumerate(pipelines_data))
    names = [p.name for p in pipelines]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{path}: pipeline name {name!r} is used twice")
    metrics = top.table("metrics")
    metrics_port = metrics.get("port", int)
    metrics.finish()
    api = _api(top.table("api"))
    for pipeline in pipelines:
        check_sampling_version(pipeline.request.options.sampling, api.version,
                               f"{path}: [pipeline.request] of {pipeline.name!r}")
    config = Config(
        path=path,
        state_dir=state_path,
        api=api,
        pipelines=pipelines,
        metrics_port=metrics_port,
        log_level=top.get("log_level", str, "info"),
        prices=top.get("prices", dict, {}),
        models=top.get("models", dict, {}),
    )
    top.finish()
    return config
