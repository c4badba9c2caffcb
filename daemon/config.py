"""
The TOML configuration, validated up front.

Every mistake is reported with the file, the table and the key, because the
person reading the message is an operator at a terminal, not a developer
with a debugger. Secrets are never read from the file: only from the
environment or systemd credentials.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from batchd.daemon.cluster import defaults as cluster_defaults
from batchd.daemon.cluster.schema import DEFAULT_SCHEMA, Sql
from batchd.daemon.durations import parse_duration, parse_size
from batchd.daemon.intake.request_options import (
    API_VERSIONS,
    SDK_API_VERSION,
    RequestOptions,
    check_extra,
    check_sampling_version,
    parse_request_options,
)
from batchd.daemon.intake.template import Template
from batchd.plugins.errors import ConfigError
from batchd.plugins.options import Options

__all__ = (
    "LOG_LEVELS",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_REQUESTS",
    "TIER_QUEUE_LIMITS",
    "ApiConfig",
    "BatchingConfig",
    "ClusterConfig",
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
_WORKSPACE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
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
    # Pause the pipeline once more than this share of the latest answers are dead
    # letters (None: never); judged over at least ``dead_letter_min_sample`` rows.
    max_dead_letter_ratio: float | None = None
    dead_letter_min_sample: int = 100
    # Seconds a claimed key is remembered by the duplicate-key ledger; None: the source's
    # default (forever for files), 0: forever.
    ledger_retention: float | None = None


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """
    ``[cluster]``: where the state lives, and the lease timings of cluster mode.

    ``store = "local"`` (the default) is today's state directory; ``"postgres"``
    is the shared store of docs/cluster.md, which ``batchd cluster`` commands use
    and ``batchd run`` runs on as one worker (docs/cluster.md says what is built).
    """

    store: str = "local"
    # A secret (``env:NAME`` read at load): kept out of repr, so no log line shows it.
    dsn: str | None = field(default=None, repr=False)
    schema: str = DEFAULT_SCHEMA
    workspace: str = cluster_defaults.DEFAULT_WORKSPACE
    lease_ttl: float = cluster_defaults.DEFAULT_LEASE_TTL
    takeover_grace: float = cluster_defaults.DEFAULT_TAKEOVER_GRACE
    lease_margin: float = cluster_defaults.DEFAULT_LEASE_MARGIN

    @property
    def shared(self) -> bool:
        """Whether the state is in the cluster's PostgreSQL store."""
        return self.store == "postgres"


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    state_dir: Path
    api: ApiConfig
    pipelines: tuple[PipelineConfig, ...]
    metrics_port: int | None = None
    log_level: str = "info"
    prices: dict[str, dict[str, float]] = field(default_factory=dict)
    metrics_address: str = "127.0.0.1"
    # Models the bundled catalog lacks, or corrections to it (``[models."id"] like = …``).
    models: dict[str, Any] = field(default_factory=dict)
    cluster: ClusterConfig = ClusterConfig()

    def pipeline(self, name: str) -> PipelineConfig:
        for pipeline in self.pipelines:
            if pipeline.name == name:
                return pipeline
        known = ", ".join(p.name for p in self.pipelines)
        raise ConfigError(f"{self.path}: no pipeline named {name!r} (pipelines: {known})")


class _Table(Options):
    """One TOML table of the engine's own config: :class:`Options` plus nested tables."""

    noun = "key"

    def __init__(
        self, data: Any, where: str, path: Path, section: str = "", owner: str = "",
        problems: list[ConfigError] | None = None,
    ) -> None:
        super().__init__(data, file=path, table=where, problems=problems)
        self.config_path = path
        # The TOML name of this table ("pipeline.batching") and whose it is (" of 'tickets'"),
        # so nested tables are named the way the file writes them.
        self.section = section
        self.owner = owner

    def table(self, key: str, *, required: bool = False) -> _Table:
        self.used.add(key)
        if key not in self.data and required:
            raise self.error(key, "is required")
        section = f"{self.section}.{key}" if self.section else key
        return _Table(
            self.data.get(key, {}), f"[{section}]{self.owner}", self.config_path, section,
            self.owner, self.problems,
        )

    def check(self, fn: Callable[[], T], default: Any = None) -> Any:
        """
        ``fn()``; when collecting, a ConfigError is recorded and ``default`` returned.

        Each table (or independent key) is checked on its own, so ``batchd validate``
        reports every table's mistake at once instead of only the first in the file.
        """
        if self.problems is None:
            return fn()
        try:
            return fn()
        except ConfigError as exc:
            self.problems.append(exc)
            self.failed = True
            return default

    failed = False


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


def _defaults(cls: type) -> dict[str, Any]:
    """A config dataclass's field defaults: declared once there, read by the parsing here."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


_API = _defaults(ApiConfig)
_BATCHING = _defaults(BatchingConfig)
_OUTPUT = _defaults(OutputConfig)
_PIPELINE = _defaults(PipelineConfig)


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
        options=parse_request_options(table, table.config_path.resolve().parent),
        extra=extra,
    )
    table.finish()
    return result


def _batching(table: _Table) -> BatchingConfig:
    max_requests = table.get("max_requests", int, _BATCHING["max_requests"])
    _positive(table, "max_requests", max_requests, MAX_BATCH_REQUESTS)
    max_bytes = table.convert("max_bytes", lambda v: parse_size(v, what="size"),
                              _BATCHING["max_bytes"])
    _positive(table, "max_bytes", max_bytes, MAX_BATCH_BYTES)
    linger = table.convert("linger", lambda v: parse_duration(v, what="duration"),
                           _BATCHING["linger"])
    max_in_flight = table.get("max_in_flight", int, _BATCHING["max_in_flight"])
    _positive(table, "max_in_flight", max_in_flight)
    table.finish()
    return BatchingConfig(max_requests, max_bytes, linger, max_in_flight)


def _output(table: _Table) -> OutputConfig:
    allowed = table.get("allowed", list)
    if allowed is not None and not all(isinstance(a, str) for a in allowed):
        raise table.error("allowed", "must be a list of strings")
    out = OutputConfig(
        allowed=tuple(allowed) if allowed is not None else None,
        strip=table.get("strip", bool, _OUTPUT["strip"]),
        lowercase=table.get("lowercase", bool, _OUTPUT["lowercase"]),
    )
    table.finish()
    return out


def _retention(value: Any) -> float:
    if value in ("off", "forever"):
        return 0.0
    return parse_duration(value, what="duration")


def _pipeline(
    data: Any, index: int, path: Path, problems: list[ConfigError] | None = None,
    state_dir: Path | None = None,
) -> PipelineConfig | None:
    table = _Table(data, f"[[pipeline]] #{index + 1}", path, problems=problems)
    name = table.require("name", str)
    if not _NAME.match(name):
        raise table.error("name", f"{name!r} must match [A-Za-z0-9_-]{{1,40}} (it names files)")
    table.where = f"[[pipeline]] {name!r}"
    table.section, table.owner = "pipeline", f" of {name!r}"
    check = table.check
    source = check(lambda: _plugin(table.table("source", required=True).data,
                                   f"[pipeline.source] of {name!r}", path))
    table.used.add("source")

    def sinks() -> tuple[PluginSpec, ...]:
        sinks_data = table.get("sink", list, [])
        if not sinks_data:
            raise table.error("sink", "at least one [[pipeline.sink]] is required")
        return tuple(
            _plugin(s, f"[[pipeline.sink]] #{i + 1} of {name!r}", path)
            for i, s in enumerate(sinks_data)
        )

    sink_specs = check(sinks, ())
    # By default dead letters live in the state dir, the one place the service may write
    # (the config's directory is read-only under ProtectSystem=strict).
    default_dead = {"type": "jsonl", "path": str((state_dir or path.resolve().parent / "state")
                                                 / "dead-letters" / name)}
    dead_letter = check(lambda: _plugin(
        table.get("dead_letter", dict, default_dead),
        f"[pipeline.dead_letter] of {name!r}", path,
    ))
    custom_id = check(lambda: table.get("custom_id", str))
    attempts = _PIPELINE["max_attempts"]
    max_attempts = check(lambda: _bounded_int(table, "max_attempts", attempts, 1, 20), attempts)
    budget = check(lambda: _budget(table))
    ratio = check(lambda: _ratio(table, "max_dead_letter_ratio"))
    sample = _PIPELINE["dead_letter_min_sample"]
    min_sample = check(lambda: _bounded_int(table, "dead_letter_min_sample", sample, 1, None),
                       sample)
    request = check(lambda: _request(table.table("request", required=True)))
    batching = check(lambda: _batching(table.table("batching")))
    output = check(lambda: _output(table.table("output")), OutputConfig())
    keep = _PIPELINE["keep_message"]
    keep_message = check(lambda: table.get("keep_message", bool, keep), keep)
    retention = check(lambda: table.convert("ledger_retention", _retention, None))
    template = check(lambda: _template(table, "custom_id", custom_id) if custom_id else None)
    check(lambda: _text_rules_apply(table.table("output"), request, output))
    table.finish()
    if table.failed:
        return None
    return PipelineConfig(
        name=name,
        source=source,
        request=request,
        batching=batching,
        sinks=sink_specs,
        dead_letter=dead_letter,
        custom_id=template,
        max_attempts=max_attempts,
        budget_usd=float(budget) if budget is not None else None,
        output=output,
        keep_message=keep_message,
        max_dead_letter_ratio=ratio,
        dead_letter_min_sample=min_sample,
        ledger_retention=retention,
    )


def _text_rules_apply(
    table: _Table, request: RequestConfig | None, output: OutputConfig
) -> None:
    """``allowed``/``lowercase`` judge text: with answers that are always JSON they would
    silently judge nothing, and every answer would reach the sinks unchecked."""
    if request is None:
        return
    if request.options.output_schema is not None:
        why = "output_schema makes every answer a JSON object"
    elif request.options.forced_tool:
        why = "a forced tool_choice makes every answer the tool's JSON input"
    else:
        return
    for key in ("allowed", "lowercase"):
        if key in table.data and table.data[key] not in (None, False):
            raise table.error(key, f"applies to text answers, but {why}; put the labels in "
                              "the schema as an enum instead")


def _bounded_int(table: _Table, key: str, default: int, low: int, high: int | None) -> int:
    value: int = table.get(key, int, default)
    if value < low:
        raise table.error(key, f"must be at least {low}, got {value}")
    if high is not None and value > high:
        raise table.error(key, f"must be at most {high:,}, got {value:,}")
    return value


def _budget(table: _Table) -> float | None:
    budget = table.get("budget_usd", (int, float))
    if budget is not None:
        _positive(table, "budget_usd", budget)
    return budget


def _ratio(table: _Table, key: str) -> float | None:
    value = table.get(key, (int, float))
    if value is not None and not 0 < value <= 1:
        raise table.error(key, f"must be a fraction above 0 and at most 1, got {value}")
    return None if value is None else float(value)


def _api(table: _Table) -> ApiConfig:
    def duration(key: str, default: float) -> float:
        return table.convert(key, lambda v: parse_duration(v, what="duration"), default)

    result = ApiConfig(
        base_url=table.get("base_url", str),
        poll_interval=duration("poll_interval", _API["poll_interval"]),
        poll_jitter=float(table.get("poll_jitter", (int, float), _API["poll_jitter"])),
        max_retries=table.get("max_retries", int, _API["max_retries"]),
        timeout=duration("timeout", _API["timeout"]),
        not_found_window=duration("not_found_window", _API["not_found_window"]),
        queue_limit=table.get("queue_limit", int),
        version=table.get("version", str, _API["version"]),
        tier=table.get("tier", str),
    )
    if not _VERSION.fullmatch(result.version):
        raise table.error("version", f"must be an API version date like {SDK_API_VERSION!r} "
                          f"(the installed SDK's), got {result.version!r}")
    known = sorted({*API_VERSIONS, SDK_API_VERSION})
    if result.version not in known:
        # The API answers an unknown anthropic-version with 400 on every call.
        raise table.error("version", f"unknown API version {result.version!r}; batchd knows "
                          f"{', '.join(known)} (the installed SDK sends {SDK_API_VERSION})")
    if result.base_url is not None:
        url = urlsplit(result.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise table.error("base_url", f"{result.base_url!r} is not an http:// or https:// "
                              "URL with a host (e.g. https://api.anthropic.com)")
    if result.tier is not None and result.tier not in TIER_QUEUE_LIMITS:
        raise table.error("tier", f"must be one of {', '.join(TIER_QUEUE_LIMITS)}, "
                          f"got {result.tier!r}")
    if result.queue_limit is not None:
        _positive(table, "queue_limit", result.queue_limit)
    if not 0 <= result.poll_jitter <= 1:
        raise table.error("poll_jitter", f"must be between 0 and 1, got {result.poll_jitter}")
    for key, value in (("poll_interval", result.poll_interval), ("timeout", result.timeout)):
        if value <= 0:
            raise table.error(key, f"must be longer than 0s, got {table.data[key]!r}")
    if result.max_retries < 0:
        raise table.error("max_retries", f"must not be negative, got {result.max_retries}")
    if "api_key" in table.data:
        raise table.error("api_key", "secrets are not read from the config file; "
                          "set ANTHROPIC_API_KEY or a systemd credential")
    table.finish()
    return result


def _refuse_nul(value: Any, path: Path, where: str) -> None:
    """
    No string in the config may hold a NUL: every path and URL would fail deep inside
    the OS or HTTP stack with a traceback, and no prompt needs one.
    """
    if isinstance(value, str):
        if "\x00" in value:
            raise ConfigError(f"{path}: {where or 'value'}: {value!r} contains a NUL character")
    elif isinstance(value, dict):
        for key, inner in value.items():
            _refuse_nul(inner, path, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            _refuse_nul(inner, path, f"{where}[{index + 1}]")


def load_config(
    path: str | Path,
    *,
    state_dir: str | Path | None = None,
    problems: list[ConfigError] | None = None,
) -> Config:
    """
    Read and validate ``path``; ``state_dir`` overrides the file's (systemd's StateDirectory).

    With ``problems`` given, every table's mistake is appended to it instead of the first
    one being raised, and the Config returned holds the parts that were valid (pipelines
    with a mistake are left out). A file that cannot be read or parsed still raises.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _refuse_nul(data, path, "")
    if state_dir is not None and "\x00" in str(state_dir):
        raise ConfigError(f"--state-dir {str(state_dir)!r}: contains a NUL character")
    top = _Table(data, "top level", path, problems=problems)
    base = path.resolve().parent
    in_file = top.check(lambda: top.get("state_dir", str, "state"), "state")
    state = state_dir if state_dir is not None else in_file
    state_path = Path(state).expanduser()
    if not state_path.is_absolute():
        state_path = base / state_path
    try:
        state_path.resolve()
    except (RuntimeError, OSError):  # a symlink loop: every later resolve() would trace back
        named = "--state-dir" if state_dir is not None else "state_dir"
        raise top.error(named, f"{state_path} is a symlink loop (or a chain of links too "
                        "long to follow); point it at a directory") from None

    def pipelines() -> tuple[PipelineConfig, ...]:
        pipelines_data = top.get("pipeline", list, [])
        if not pipelines_data:
            raise top.error("pipeline", "at least one [[pipeline]] table is required")
        found = [top.check(partial(_pipeline, p, i, path, problems, state_path))
                 for i, p in enumerate(pipelines_data)]
        names = [p.name for p in found if p is not None]
        for name in names:
            if names.count(name) > 1:
                raise top.error("pipeline", f"pipeline name {name!r} is used twice")
        return tuple(p for p in found if p is not None)

    config = Config(
        path=path,
        state_dir=state_path,
        api=top.check(lambda: _api(top.table("api")), ApiConfig()),
        pipelines=top.check(pipelines, ()),
        metrics_port=None,
        log_level=top.check(lambda: _log_level(top), "info"),
        prices=top.check(lambda: top.get("prices", dict, {}), {}),
        models=top.check(lambda: top.get("models", dict, {}), {}),
        cluster=top.check(lambda: _cluster(top.table("cluster")), ClusterConfig()),
    )
    for pipeline in config.pipelines:
        top.check(partial(check_sampling_version, pipeline.request.options.sampling,
                          config.api.version, f"{path}: [pipeline.request] of {pipeline.name!r}"))
    metrics = top.check(lambda: _metrics(top.table("metrics")), (None, "127.0.0.1"))
    top.finish()
    return replace(config, metrics_port=metrics[0], metrics_address=metrics[1])


#: ``log_level``'s values and their logging levels (here, not in ops/_logging.py, so that
#: reading a config, as ``batchd status`` does, does not import structlog).
LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def _log_level(top: _Table) -> str:
    level: str = top.get("log_level", str, "info")
    if level.lower() not in LOG_LEVELS:
        hint = difflib.get_close_matches(level.lower(), list(LOG_LEVELS), n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise top.error("log_level",
                        f"{level!r} is not one of {', '.join(LOG_LEVELS)}{suggestion}")
    return level.lower()


def _metrics(table: _Table) -> tuple[int | None, str]:
    """``[metrics] port`` (1-65535) and ``address`` (an IP address to bind, or localhost)."""
    port = table.get("port", int)
    if port is not None and not 1 <= port <= 65535:
        raise table.error("port", f"must be a TCP port between 1 and 65535, got {port}")
    address: str = table.get("address", str, "127.0.0.1")
    if address != "localhost":
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise table.error(
                "address", f"{address!r} is not an IP address to bind (e.g. 127.0.0.1, ::1, "
                "0.0.0.0)"
            ) from None
    table.finish()
    return port, address


def _cluster(table: _Table) -> ClusterConfig:
    """
    ``[cluster]``: the store, its DSN (a secret) and schema, and the lease timings.

    The DSN is read (``env:NAME`` from the environment) whenever it is given, so a
    ``batchd cluster`` command can use it before the workers switch stores.
    """
    store = table.choice("store", ("local", "postgres"), "local")
    dsn = table.secret("dsn", None)
    if store == "postgres" and dsn is None:
        raise table.error("dsn", 'is required when store = "postgres" (a PostgreSQL DSN, '
                          'best as "env:NAME" so the password stays out of the file)')
    schema = table.text("schema", DEFAULT_SCHEMA)
    try:
        Sql(schema)
    except ConfigError:
        raise table.error("schema", f"{schema!r} is not a plain lowercase identifier "
                          "(a-z, 0-9 and _, not starting with a digit; at most 63)") from None
    workspace = table.text("workspace", cluster_defaults.DEFAULT_WORKSPACE)
    if not _WORKSPACE.fullmatch(workspace):
        raise table.error("workspace", f"{workspace!r} must match [A-Za-z0-9_.-]{{1,64}} "
                          "(it names the workspace's create slot and queue limit)")
    ttl = _bounded_duration(table, "lease_ttl", cluster_defaults.DEFAULT_LEASE_TTL,
                            cluster_defaults.LEASE_TTL_BOUNDS)
    grace = _bounded_duration(table, "takeover_grace", cluster_defaults.DEFAULT_TAKEOVER_GRACE,
                              cluster_defaults.TAKEOVER_GRACE_BOUNDS)
    margin = table.duration("lease_margin", cluster_defaults.default_margin(ttl), min=0)
    table.finish()  # first: a misspelt lease_ttl explains a margin refused against the default
    share = cluster_defaults.MARGIN_SHARE_OF_TTL
    if margin >= ttl * share:
        raise table.error("lease_margin", f"must be less than {share:g} of lease_ttl "
                          f"({ttl * share:g}s; heartbeats go out every lease_ttl/3 and the "
                          "deadline must not lapse between them), "
                          f"got {table.data['lease_margin']!r}")
    return ClusterConfig(store=store, dsn=dsn, schema=schema, workspace=workspace,
                         lease_ttl=ttl, takeover_grace=grace, lease_margin=margin)


def _bounded_duration(
    table: _Table, key: str, default: float, bounds: tuple[float, float]
) -> float:
    low, high = bounds
    value: float = table.duration(key, default)
    if not low <= value <= high:
        raise table.error(key, f"must be between {low:g}s and {high:g}s, "
                          f"got {table.data[key]!r}")
    return value
