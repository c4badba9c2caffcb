"""
``batchd validate``: every check ``batchd run`` makes before it reads a row.

``run`` calls :func:`check_config` itself before starting anything (the
"preflight"), so the two cannot disagree: a config ``validate`` passes is one
``run`` starts with, and a mistake ``run`` would stop on is one ``validate``
reports. Unlike a run, which must stop at the first mistake, the checks
collect every problem they can find: each table of the file, every plugin's
options (the factories validate without opening anything), the templates
against the fields the source's records carry, prices, the state directory
and the file sinks' paths, and the metrics address. ``--connect`` adds what
needs the network: the databases and brokers accept the credentials, and the
API accepts the key.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import socket
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio

from batchd.daemon.config import Config, PipelineConfig, PluginSpec, load_config
from batchd.plugins.contract import Sink, SinkOutput, Source
from batchd.plugins.errors import BatchdError, ConfigError

__all__ = ("Problem", "Report", "check_config", "template_field_errors")

_CONNECT_TIMEOUT = 15.0


@dataclass(frozen=True, slots=True)
class Problem:
    """One mistake (or, as a warning, a likely one), located as precisely as known."""

    message: str
    file: str | None = None
    table: str | None = None
    key: str | None = None
    hint: str | None = None

    def __post_init__(self) -> None:
        # The message alone must carry everything: it is the one line run and validate print.
        if self.hint and self.hint not in self.message:
            object.__setattr__(self, "message", f"{self.message}; {self.hint}")

    def line(self) -> str:
        return self.message


@dataclass(slots=True)
class Report:
    """What :func:`check_config` found; ``config`` is None when the file is unusable."""

    path: str
    config: Config | None = None
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "config": self.path,
            "ok": self.ok,
            "problems": [asdict(p) for p in self.problems],
            "warnings": [asdict(w) for w in self.warnings],
            "checked": self.checked,
        }


_UNKNOWN_OPTION = re.compile(r"unknown option\(?s?\)? '([^']+)'.*?valid: ([\w, ]+)")
_UNKNOWN_TYPE = re.compile(r"unknown (?:source|sink) type '([^']+)' \(known: ([\w, ]+)\)")


def _problem(error: ConfigError | BatchdError, spec: PluginSpec | None = None) -> Problem:
    """A Problem from an error, locating it from the error's fields or the plugin table."""
    message = str(error)
    file = getattr(error, "file", None)
    table = getattr(error, "table", None)
    key = getattr(error, "key", None)
    hint = getattr(error, "hint", None)
    if spec is not None:
        file, _, table = spec.where.partition(": ")
        if not message.startswith(spec.where):
            message = f"{spec.where}: {message}"
        if match := _UNKNOWN_TYPE.search(message):
            key = "type"
            close = difflib.get_close_matches(match.group(1), match.group(2).split(", "), n=1)
            hint = f"did you mean {close[0]!r}?" if close else None
        elif match := _UNKNOWN_OPTION.search(message):
            key = match.group(1)
            close = difflib.get_close_matches(key, match.group(2).split(", "), n=1)
            hint = f"did you mean {close[0]!r}?" if close else None
        elif match := re.search(r"option '([^']+)'", message):
            key = match.group(1)
    elif hint is None and (match := re.search(r"\(did you mean '([^']+)'\?\)", message)):
        hint = f"did you mean {match.group(1)!r}?"
    if hint and hint not in message:
        message = f"{message} ({hint})"
    return Problem(message=message, file=file, table=table, key=key, hint=hint)


def template_field_errors(
    pipeline: PipelineConfig, names: Sequence[str] | None
) -> list[ConfigError]:
    """
    Templates naming a field the source's records do not have: each would dead-letter
    every record, so ``run`` refuses to start on the first and ``validate`` lists all.
    """
    if names is None:
        return []
    templates = [("[pipeline.request] user", "user", pipeline.request.user),
                 ("[pipeline.request] model", "model", pipeline.request.model)]
    if pipeline.custom_id is not None:
        templates.append(("custom_id", "custom_id", pipeline.custom_id))
    file = pipeline.source.where.split(": ", 1)[0]
    found = ", ".join(repr(n) for n in names)
    errors = []
    for where, key, template in templates:
        for name in template.fields:
            if name not in names and name != "key":
                close = difflib.get_close_matches(name, list(names), n=1)
                error = ConfigError(
                    f"{file}: pipeline {pipeline.name!r}: {where} names {{{name}}}, which the "
                    f"{pipeline.source.type} source's records do not have (fields: {found})"
                )
                error.file, error.key = file, key
                error.table = ("[pipeline.request]" if key != "custom_id" else "[[pipeline]]") \
                    + f" of {pipeline.name!r}"
                error.hint = f"did you mean {{{close[0]}}}?" if close else None
                errors.append(error)
    return errors


def check_config(
    path: str | Path,
    *,
    state_dir: str | Path | None = None,
    connect: bool = False,
    for_run: bool = False,
) -> Report:
    """
    Every problem with the config at ``path``; nothing is written, no row is read.

    ``for_run`` is the preflight of ``batchd run``: the metrics port is then left for
    the daemon to bind (a port in use stops it with exit 2 there), where ``validate``
    tries it, and accepts it in use by a running batchd.
    """
    report = Report(str(path))
    errors: list[ConfigError] = []
    try:
        config = load_config(path, state_dir=state_dir, problems=errors)
    except ConfigError as exc:
        report.problems.append(_problem(exc))
        return report
    report.config = config
    report.problems.extend(_problem(e) for e in errors)
    report.checked.append(f"config: {len(config.pipelines)} pipeline(s)")
    anyio.run(_check_pipelines, config, report, connect, for_run)
    _check_models(config, report, params=not for_run)
    _check_state_dir(config, report)
    if not for_run:
        _check_metrics(config, report)
    if connect:
        anyio.run(_check_api, config, report)
        if config.cluster.dsn is not None:
            anyio.run(_check_cluster_db, config, report)
    return report


async def _check_cluster_db(config: Config, report: Report) -> None:
    """The cluster's database accepts the DSN, and its schema is the version this batchd uses."""
    from batchd.daemon.commands.cluster_connect import connect_cluster, describe_target, located

    where = (str(config.path), "[cluster]", "dsn")
    try:
        with anyio.fail_after(_CONNECT_TIMEOUT):
            conn, sql = await connect_cluster(config, "validate")
            try:
                from batchd.daemon.cluster.migrations import check

                version = await check(conn, sql)
                drift = None
                if config.cluster.shared:  # as a worker would be refused at start
                    from batchd.daemon.cluster.pipeline_config import compare
                    from batchd.daemon.store.cluster_worker import pipeline_fields

                    drift = await compare(conn, sql, pipeline_fields(config),
                                          where=str(config.path))
            finally:
                from batchd.connectors._pg import close_quietly

                await close_quietly(conn)
    except TimeoutError:
        report.problems.append(Problem(
            f"{config.path}: [cluster]: dsn: {describe_target(config)}: no answer within "
            f"{_CONNECT_TIMEOUT:.0f}s", *where))
    except ConfigError as exc:  # a refused DSN, or the schema's version (SchemaVersionError)
        from batchd.daemon.cluster.errors import SchemaVersionError

        key = "schema" if isinstance(exc, SchemaVersionError) else "dsn"
        report.problems.append(_problem(located(config, exc, key)))
    except BatchdError as exc:  # the server did not answer
        report.problems.append(Problem(str(exc), *where))
    else:
        report.checked.append(f"[cluster] {describe_target(config)}: schema {sql.schema!r} "
                              f"at version {version}")
        if drift is not None:
            report.problems.append(_problem(drift))


async def _check_pipelines(config: Config, report: Report, connect: bool,
                           for_run: bool) -> None:
    from batchd.connectors._file_source import FileSource
    from batchd.daemon.factories import build_sink, build_source
    from batchd.daemon.ops.status import read_state
    from batchd.daemon.results.output_paths import check_outputs
    from batchd.daemon.wal.manifest_state import ManifestState

    try:
        state = read_state(config)
    except BatchdError as exc:
        # Not a config mistake: for `run`, recovery decides what a damaged manifest means.
        state = ManifestState()
        if not for_run:
            report.problems.append(Problem(
                f"{config.state_dir}: the manifest cannot be read: {exc}",
                file=str(config.state_dir)))
    every_sink: list[tuple[str, Sink]] = []
    for pipeline in config.pipelines:
        source: Source | None = None
        try:
            source = build_source(config, pipeline.name, pipeline.source)
        except BatchdError as exc:
            report.problems.append(_problem(exc, pipeline.source))
        sinks: list[tuple[Sink, PluginSpec]] = []
        for spec in (*pipeline.sinks, pipeline.dead_letter):
            try:
                sink = build_sink(config, pipeline.name, spec)
                sinks.append((sink, spec))
            except BatchdError as exc:
                report.problems.append(_problem(exc, spec))
            else:
                for output in sink.outputs():
                    _check_sink_path(config, output, spec, report)
        if source is not None:
            ps = state.pipelines.get(pipeline.name)
            # Only a file source is started (it reads its header, where a restart would
            # resume): starting a consumer-group source would rebalance a running daemon.
            await _check_source(pipeline, source, ps.last_sealed_position if ps else None,
                                report, connect=connect,
                                start=isinstance(source, FileSource))
        if connect:
            for sink, spec in sinks:
                await _probe(sink, spec, report)
        report.checked.append(
            f"pipeline {pipeline.name!r}: {pipeline.source.type} source, "
            f"{len(pipeline.sinks)} sink(s), dead letters to {pipeline.dead_letter.type}"
        )
        every_sink.extend((spec.where, sink) for sink, spec in sinks)
    try:  # the collisions `run` refuses: batchd's own files (through symlinks too), one path twice
        check_outputs(config.state_dir, every_sink)
    except ConfigError as exc:
        report.problems.append(_problem(exc))


async def _check_source(
    pipeline: PipelineConfig, source: Source, resume: dict[str, Any] | None, report: Report,
    *, connect: bool, start: bool,
) -> None:
    """Probe the source's server; start a local one where ``run`` would, then close it."""
    spec = pipeline.source
    if not (connect or start):
        return
    try:
        with anyio.fail_after(_CONNECT_TIMEOUT):
            if connect:
                await source.probe()
            if start:
                await source.start(resume)
        if start:
            for error in template_field_errors(pipeline, source.field_names()):
                report.problems.append(_problem(error))
    except TimeoutError:
        report.problems.append(Problem(f"{spec.where}: no answer within "
                                       f"{_CONNECT_TIMEOUT:.0f}s", *_where(spec)))
    except BatchdError as exc:
        report.problems.append(_problem(exc, spec))
    finally:
        try:
            await source.aclose()
        except Exception:
            pass


async def _probe(sink: Sink, spec: PluginSpec, report: Report) -> None:
    try:
        with anyio.fail_after(_CONNECT_TIMEOUT):
            await sink.probe()
    except TimeoutError:
        report.problems.append(Problem(f"{spec.where}: no answer within "
                                       f"{_CONNECT_TIMEOUT:.0f}s", *_where(spec)))
    except BatchdError as exc:
        report.problems.append(_problem(exc, spec))


def _where(spec: PluginSpec) -> tuple[str, str]:
    file, _, table = spec.where.partition(": ")
    return file, table


def _writable_dir(path: Path) -> tuple[bool, Path]:
    """Whether ``path`` (a directory, existing or to be made) can be written; and where."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return False, probe
    return os.access(probe, os.W_OK | os.X_OK), probe


def _check_sink_path(config: Config, output: SinkOutput, spec: PluginSpec,
                     report: Report) -> None:
    """A local output the sink declares (``Sink.outputs``) must be writable where it is."""
    target = output.path
    if output.directory and target.exists() and not target.is_dir():
        return  # the output-path check names it: "is not a directory (it is a file)"
    directory = target if output.directory else target.parent
    ok, where = _writable_dir(directory)
    file, table = _where(spec)
    if not output.directory and target.is_dir():
        report.problems.append(Problem(
            f"{spec.where}: path: {target} is a directory; name the database file",
            file, table, "path",
        ))
    elif not ok:
        report.problems.append(Problem(
            f"{spec.where}: path: {target} cannot be written ({where} is not a writable "
            "directory for this user)", file, table, "path",
        ))
    elif str(config.path.resolve()).startswith("/etc/") and not _inside(target, config.state_dir):
        report.warnings.append(Problem(
            f"{spec.where}: path: {target} is outside the state directory "
            f"{config.state_dir}; under the systemd unit (ProtectSystem=strict) only the "
            "state directory is writable", file, table, "path",
            "write inside the state directory, or add ReadWritePaths= in a drop-in",
        ))


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def _check_state_dir(config: Config, report: Report) -> None:
    ok, where = _writable_dir(config.state_dir)
    if not ok:
        report.problems.append(Problem(
            f"{config.path}: top level: state_dir: {config.state_dir} cannot be written "
            f"({where} is not a writable directory for this user)",
            str(config.path), "top level", "state_dir",
            "run as the service's user, or pass --state-dir",
        ))


def _check_models(config: Config, report: Report, *, params: bool) -> None:
    """
    The model catalog's rules and prices, as ``run``'s pre-flight applies them.

    ``params`` (validate): also the request params as the API judges them; ``run`` checks
    those in its pre-flight once logging is set up (they need the SDK's types).
    """
    from batchd.daemon.models.preflight import preflight_problems

    try:
        problems, warnings = preflight_problems(config, params=params)
    except ConfigError as exc:  # a bad [prices] or [models] table
        report.problems.append(_problem(exc))
        return
    report.problems.extend(_problem(exc) for exc in problems)
    for pipeline, message in warnings:
        table = f"[pipeline.request] of {pipeline!r}"
        report.warnings.append(Problem(
            f"{config.path}: {table}: model: {message}", str(config.path), table, "model", None,
        ))


def _check_metrics(config: Config, report: Report) -> None:
    """The metrics address and port can be bound (or are a running batchd's own)."""
    if config.metrics_port is None:
        return
    host, port = config.metrics_address, config.metrics_port
    where = (str(config.path), "[metrics]", "port")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE and _is_batchd(host, port):
            report.checked.append(f"[metrics] {host}:{port} is served by a running batchd")
            return
        key = "port" if exc.errno == errno.EADDRINUSE else "address"
        report.problems.append(Problem(
            f"{config.path}: [metrics]: {key}: cannot listen on {host}:{port}: "
            f"{exc.strerror or exc}", where[0], where[1], key,
            "choose a free port" if key == "port" else None,
        ))
        return
    report.checked.append(f"[metrics] {host}:{port} is free")


def _is_batchd(host: str, port: int) -> bool:
    """Whether what listens on ``host:port`` is a batchd (its /healthz says so)."""
    address = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/healthz", timeout=2) as answer:
            return b"batchd" in answer.read(4096)
    except Exception:
        return False


async def _check_api(config: Config, report: Report) -> None:
    """The API (or the emulator at ANTHROPIC_BASE_URL) accepts the key: one list call."""
    from dataclasses import replace

    from batchd.daemon.batches.api import BatchesApi, resolve_api_key
    from batchd.daemon.batches.api_errors import (
        ApiError,
        AuthenticationError,
        PermissionDeniedError,
    )

    key = resolve_api_key()
    if key is None:
        report.problems.append(Problem(
            "no API key: set ANTHROPIC_API_KEY or the systemd credential anthropic-api-key",
            key="ANTHROPIC_API_KEY"))
        return
    api = BatchesApi(replace(config.api, max_retries=1, timeout=_CONNECT_TIMEOUT), key)
    try:
        await api.check()
    except AuthenticationError:
        report.problems.append(Problem("the API refused the API key (401)",
                                       key="ANTHROPIC_API_KEY"))
    except PermissionDeniedError as exc:
        report.problems.append(Problem(f"the API key may not use the Batches API: {exc}",
                                       key="ANTHROPIC_API_KEY"))
    except ApiError as exc:
        report.problems.append(Problem(f"cannot reach the API at {api.base_url}: {exc}",
                                       key="base_url", table="[api]"))
    else:
        report.checked.append(f"the API at {api.base_url} accepts the key")
    finally:
        await api.aclose()
