"""
The pipeline config every worker of a pipeline must share, recorded in the cluster.

Workers of one pipeline each read their own config file. Some of it must agree, or
one pipeline is run by two different configs: chunks sealed by one worker's reader
are sent, collected and judged by others, so a worker with another model, prompt,
``custom_id`` template or source would send something else for the same keys, map
answers back wrongly, or read another input under the same positions. The rest is
each machine's own and may differ.

Must agree (:func:`shared_fields`): everything that changes what is sent, which
record a custom_id names, or what outcome an answer gets:

* ``api.version`` (the request rules), ``request.*`` (model, max_tokens, user,
  system, options, extra), ``custom_id``;
* ``source.*`` (its type and options: identity, key column, positions);
* ``batching.max_requests`` and ``batching.max_bytes`` (the chunks' shape);
* ``max_attempts``, ``output.*``, ``keep_message``, ``ledger_retention``.

May differ per worker: ``state_dir``, ``log_level``, ``[metrics]``, the sinks and
the dead-letter sink (each worker writes its own outputs, or they upsert), the
``[api]`` timings, tier and queue limit, ``batching.linger`` and
``max_in_flight`` (how much one worker drives), the dead-letter pause ratio, the
``[cluster]`` lease timings, ``[models]`` and ``prices``, and ``budget_usd``: the
budget is a shared counter whose cap the last worker to open sets (raising it on one
worker and restarting that one is how a budget pause is lifted, docs/cluster.md).

The first worker to open a pipeline records its fields and their hash
(``pipeline_config`` table); every later worker's must hash the same, or it is
refused at start (exit 2) with one line naming the pipeline and each differing field
with both values. A deliberate change for every worker: stop them all, then
``batchd cluster init CONFIG --accept-config`` records the new config (refused while
any other worker is alive).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import TYPE_CHECKING, Any

import orjson

from batchd.daemon.cluster.db import from_json, to_json, transaction
from batchd.daemon.cluster.schema import Sql
from batchd.plugins.errors import ConfigError

if TYPE_CHECKING:  # the config imports this package: types only
    from batchd.daemon.config import Config, PipelineConfig

__all__ = (
    "ConfigDrift",
    "accept",
    "check_or_record",
    "compare",
    "config_hash",
    "differences",
    "drift_error",
    "shared_fields",
)

# Option names whose literal values are secrets: shown masked (an ``env:NAME`` is a name).
_SECRET = re.compile(r"(password|passwd|secret|token|dsn|credential|api_key|sasl)", re.I)
_SHOWN = 60


class ConfigDrift(ConfigError):
    """A worker's pipeline config differs from the one the cluster recorded."""


def _plain(value: Any) -> Any:
    """JSON-ready, canonical: dataclasses as dicts, tuples as lists, templates as text."""
    if hasattr(value, "source") and hasattr(value, "render"):  # a Template
        return value.source
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def shared_fields(config: Config, pipeline: PipelineConfig) -> dict[str, Any]:
    """The fields of *pipeline* every worker must share, flat (``request.model`` → value)."""
    request = pipeline.request
    out: dict[str, Any] = {
        "api.version": config.api.version,
        "request.model": request.model.source,
        "request.max_tokens": request.max_tokens,
        "request.user": request.user.source,
        "request.system": request.system,
        "custom_id": None if pipeline.custom_id is None else pipeline.custom_id.source,
        "source.type": pipeline.source.type,
    }
    for name, value in sorted(_plain(asdict(request.options)).items()):
        out[f"request.{name}"] = value
    for name, value in sorted(_plain(request.extra).items()):
        out[f"request.extra.{name}"] = value
    for name, value in sorted(_plain(pipeline.source.options).items()):
        out[f"source.{name}"] = value
    out["batching.max_requests"] = pipeline.batching.max_requests
    out["batching.max_bytes"] = pipeline.batching.max_bytes
    out["max_attempts"] = pipeline.max_attempts
    for name, value in _plain(asdict(pipeline.output)).items():
        out[f"output.{name}"] = value
    out["keep_message"] = pipeline.keep_message
    out["ledger_retention"] = pipeline.ledger_retention
    return out


def config_hash(fields: Mapping[str, Any]) -> str:
    """sha256 of the fields' canonical JSON (sorted keys)."""
    return hashlib.sha256(orjson.dumps(dict(fields), option=orjson.OPT_SORT_KEYS)).hexdigest()


def _show(name: str, value: Any) -> str:
    """A value for a message: a secret-named option's literal masked, long ones cut."""
    if value is None:
        return "(unset)"
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    if _SECRET.search(name.rpartition(".")[2]) and not text.startswith("env:"):
        return f"<hidden, sha256 {hashlib.sha256(text.encode()).hexdigest()[:8]}>"
    text = repr(text) if isinstance(value, str) else text
    return text if len(text) <= _SHOWN else text[: _SHOWN - 1] + "…"


def differences(
    recorded: Mapping[str, Any], mine: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """(field, recorded value, this worker's value) for each field that differs, by name."""
    missing = object()
    out = []
    for name in sorted(recorded.keys() | mine.keys()):
        theirs, ours = recorded.get(name, missing), mine.get(name, missing)
        if theirs != ours:
            out.append((name, None if theirs is missing else theirs,
                        None if ours is missing else ours))
    return out


def _drift_line(name: str, diffs: Sequence[tuple[str, Any, Any]], recorded_by: str,
                recorded_at: Any) -> str:
    when = recorded_at.strftime("%Y-%m-%d %H:%M:%SZ") if hasattr(recorded_at, "strftime") else ""
    fields = "; ".join(f"{field}: cluster has {_show(field, theirs)}, this config "
                       f"{_show(field, ours)}" for field, theirs, ours in diffs)
    return (f"[[pipeline]] {name!r} differs from the config the cluster recorded for it "
            f"(by {recorded_by}{', ' + when if when else ''}): {fields}")


_SELECT = ("SELECT pipeline, config_hash, fields, recorded_by, recorded_at"
           " FROM {s}.pipeline_config WHERE pipeline = ANY($1::text[])")
_INSERT = ("INSERT INTO {s}.pipeline_config (pipeline, config_hash, fields, recorded_by)"
           " VALUES ($1, $2, $3::jsonb, $4) ON CONFLICT (pipeline) DO NOTHING")


async def _drifts(conn: Any, sql: Sql, pipelines: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per pipeline whose recorded fields differ from *pipelines*'."""
    problems = []
    for row in await conn.fetch(sql(_SELECT), sorted(pipelines)):
        mine = pipelines[row["pipeline"]]
        if row["config_hash"] == config_hash(mine):
            continue
        diffs = differences(from_json(row["fields"]), mine)
        if diffs:  # the same fields under an older hash form are not a difference
            problems.append(_drift_line(row["pipeline"], diffs, row["recorded_by"],
                                        row["recorded_at"]))
    return problems


def drift_error(problems: Sequence[str], where: str = "") -> ConfigDrift:
    """The one-line refusal naming every differing pipeline and field."""
    error = ConfigDrift(
        f"{where + ': ' if where else ''}{'; '.join(problems)}; every worker of a "
        "pipeline must share these fields: to change them for all, stop every "
        "worker, then run: batchd cluster init CONFIG --accept-config")
    error.file, error.table = where or None, "[[pipeline]]"
    return error


async def compare(
    conn: Any, sql: Sql, pipelines: Mapping[str, Mapping[str, Any]], *, where: str = "",
) -> ConfigDrift | None:
    """What a worker with *pipelines* would be refused for, read only (``validate --connect``)."""
    problems = await _drifts(conn, sql, pipelines)
    return drift_error(problems, where) if problems else None


async def check_or_record(
    conn: Any, sql: Sql, pipelines: Mapping[str, Mapping[str, Any]], *, recorded_by: str,
    where: str = "",
) -> list[str]:
    """
    Record each pipeline's shared fields if none are recorded yet, else compare them.

    Args:
        pipelines: pipeline name → :func:`shared_fields`.
        recorded_by: who records (``host:pid``), shown to a worker refused later.
        where: the config file, to start the message with.

    Returns:
        The pipelines this call recorded first.

    Raises:
        ConfigDrift: a recorded config differs; one line naming each pipeline and each
            differing field with both values (secrets masked). Nothing is written.
    """
    names = sorted(pipelines)
    if not names:
        return []

    async def body() -> list[str]:
        # Two workers starting at once: one insert wins, the other compares against it.
        recorded = []
        for name in names:
            fields = dict(pipelines[name])
            done = await conn.execute(sql(_INSERT), name, config_hash(fields), to_json(fields),
                                      recorded_by)
            if done == "INSERT 0 1":
                recorded.append(name)
        problems = await _drifts(conn, sql, pipelines)
        if problems:
            raise drift_error(problems, where)
        return recorded

    result: list[str] = await transaction(conn, body)
    return result


async def accept(
    conn: Any, sql: Sql, pipelines: Mapping[str, Mapping[str, Any]], *, recorded_by: str,
    grace: float, where: str = "",
) -> list[str]:
    """
    Record *pipelines*' shared fields over whatever was recorded (an operator's change).

    Refused while any worker is alive (not stopped, and heard from within its TTL plus
    *grace*): a running worker would go on with the old config beside new ones.

    Returns:
        The pipelines whose recorded config changed.

    Raises:
        ConfigError: live workers, named.
    """

    async def body() -> list[str]:
        # The advisory lock keeps two accepts apart; workers' own records are inserts.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                           f"batchd:{sql.schema}:pipeline_config")
        alive = await conn.fetch(sql(
            "SELECT worker_id FROM {s}.worker WHERE stopped_at IS NULL"
            " AND heartbeat_at + lease_ttl + $1 * interval '1 second' >= now()"
            " ORDER BY worker_id"), grace)
        if alive:
            ids = ", ".join(r["worker_id"] for r in alive[:5])
            more = f" and {len(alive) - 5} more" if len(alive) > 5 else ""
            error = ConfigError(
                f"{where + ': ' if where else ''}cannot accept a new pipeline config while "
                f"workers are alive ({ids}{more}); stop every worker first")
            error.file, error.table = where or None, "[cluster]"
            raise error
        known = {r["pipeline"]: r["config_hash"]
                 for r in await conn.fetch(sql(_SELECT), sorted(pipelines))}
        changed = []
        for name in sorted(pipelines):
            fields = dict(pipelines[name])
            digest = config_hash(fields)
            if known.get(name) == digest:
                continue
            await conn.execute(sql(
                "INSERT INTO {s}.pipeline_config (pipeline, config_hash, fields, recorded_by)"
                " VALUES ($1, $2, $3::jsonb, $4) ON CONFLICT (pipeline) DO UPDATE SET"
                " config_hash = EXCLUDED.config_hash, fields = EXCLUDED.fields,"
                " recorded_by = EXCLUDED.recorded_by, recorded_at = now()"),
                name, digest, to_json(fields), recorded_by)
            changed.append(name)
        return changed

    result: list[str] = await transaction(conn, body)
    return result
