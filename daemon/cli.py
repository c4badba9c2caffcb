"""
The ``batchd`` command line.

Errors an operator can fix (a config typo, a missing file, an unknown sink
type) print one line naming the thing at fault and exit 2 — never a
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from batchd.plugins.errors import BatchdError, ConfigError
from batchd.plugins.manager import get_plugins, load_plugins, pm

if TYPE_CHECKING:
    from batchd.daemon.config import Config

# Each command imports what it needs inside its function: `batchd --help` and
# `batchd status` must not pay for the engine, the emulator's server or logging.

__all__ = ("main",)

EXIT_CONFIG = 2
EXIT_PAUSED = 3
# A retry re-reads a key from the source: useless for a row that had no usable key or
# record, or for the second occurrence of a key whose first one was answered.
_NOT_RETRIABLE = frozenset({"bad_record", "duplicate_key"})
_NOT_RETRIABLE_WHY = (
    "the source row itself is at fault (no usable key or record, or a key read twice); "
    "correct it and feed it again as a new record, e.g. in a new input file"
)


def _load(args: argparse.Namespace) -> Config:
    from batchd.daemon.config import load_config

    return load_config(args.config, state_dir=getattr(args, "state_dir", None))


def cmd_run(args: argparse.Namespace) -> int:
    import anyio

    from batchd.daemon.commands.validate import check_config
    from batchd.daemon.ops._logging import configure_logging

    # The preflight is `batchd validate` itself, so the two cannot disagree on a config.
    report = check_config(args.config, state_dir=args.state_dir, for_run=True)
    if not report.ok or report.config is None:
        _print_problems(report)
        return EXIT_CONFIG
    config = report.config
    from batchd.daemon.commands.cluster_import import imported_refusal

    refusal = imported_refusal(config.state_dir)
    if refusal is not None:  # its batches are the cluster's now: never sent or collected twice
        print(f"batchd: {refusal}", file=sys.stderr)
        return EXIT_CONFIG
    # Logging first, before anything else is imported: a library that calls
    # logging.basicConfig would add a handler that bypasses secret redaction.
    configure_logging(args.log_level or config.log_level, json=_json_flag(args.log_format))
    from batchd.daemon.models.preflight import preflight

    preflight(config)  # a request the model would reject: exit 2 before a row is read
    from batchd.daemon.gc_tuning import tune_gc
    from batchd.daemon.pipeline import PipelinePaused
    from batchd.daemon.supervisor import run_daemon

    tune_gc()
    try:
        return anyio.run(lambda: run_daemon(config, until_drained=args.until_drained))
    except PipelinePaused as exc:
        print(f"batchd: {exc}", file=sys.stderr)
        return EXIT_PAUSED


def _print_problems(report: Any) -> None:
    count = len(report.problems)
    for problem in report.problems:
        print(f"batchd: config error: {problem.line()}", file=sys.stderr)
    if count > 1:
        print(f"batchd: {count} config errors; nothing was started", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    import logging

    from batchd.daemon.commands.validate import check_config

    # The report names every failure once; a client library's own log line about it
    # (aiokafka's "Unable connect to ...") would otherwise reach stderr unlabelled.
    logging.getLogger().addHandler(logging.NullHandler())
    report = check_config(args.config, state_dir=args.state_dir, connect=args.connect)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2) + b"\n")
        return 0 if report.ok else EXIT_CONFIG
    for warning in report.warnings:
        print(f"warning: {warning.line()}")
    if report.ok:
        for line in report.checked:
            print(f"  checked {line}")
        print(f"OK: {args.config}")
        return 0
    for problem in report.problems:
        print(f"error: {problem.line()}")
    count = len(report.problems)
    print(f"{count} problem{'s' if count > 1 else ''} in {args.config}")
    return EXIT_CONFIG


def _json_flag(value: str | None) -> bool | None:
    return None if value in (None, "auto") else value == "json"


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from batchd.daemon.ops.status import collect_status, render_status, status_renderable

    config = _load(args)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(collect_status(config), option=orjson.OPT_INDENT_2))
        sys.stdout.write("\n")
        return 0
    console = Console()
    if not args.watch:
        render_status(collect_status(config), console)
        return 0
    import time

    from rich.live import Live

    # The renderable itself goes to Live: rendering into a second (recording) console
    # and showing its export_text() showed nothing, since capture() leaves no record.
    with Live(console=console, auto_refresh=False, redirect_stdout=False) as live:
        while True:
            live.update(status_renderable(collect_status(config)), refresh=True)
            time.sleep(args.interval)


def cmd_emulator(args: argparse.Namespace) -> int:
    from batchd.daemon.emulator.cli import run
    from batchd.daemon.gc_tuning import tune_gc

    tune_gc()
    return run(args)


def cmd_plugins(args: argparse.Namespace) -> int:
    plugins = get_plugins()
    if not args.all:
        plugins = [p for p in plugins if p["package"] != "batchd (built-in)"] or plugins
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(plugins, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    for plugin in plugins:
        print(f"{plugin['name']}  ({plugin['package']})")
        if plugin["sources"]:
            print(f"  sources: {', '.join(plugin['sources'])}")
        if plugin["sinks"]:
            print(f"  sinks:   {', '.join(plugin['sinks'])}")
        print(f"  hooks:   {', '.join(plugin['hooks'])}")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    import anyio
    from rich.console import Console
    from rich.table import Table

    from batchd.daemon.commands.estimate import estimate_pipeline
    from batchd.daemon.models.preflight import preflight
    from batchd.daemon.ops._logging import configure_logging

    config = _load(args)
    configure_logging("warning", json=False, stream=sys.stderr)
    preflight(config)  # the same checks as `run`: a request the model rejects is exit 2
    pipelines = [config.pipeline(args.pipeline)] if args.pipeline else list(config.pipelines)
    results = [anyio.run(estimate_pipeline, config, p) for p in pipelines]
    if args.json:
        sys.stdout.buffer.write(orjson.dumps([r.as_dict() for r in results],
                                             option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    console = Console()
    notes: list[str] = []
    for r in results:
        table = Table(title=f"estimate for {r.pipeline!r} (nothing was submitted)")
        table.add_column("model", no_wrap=True)
        for name in ("rows", "input tokens", "cached", "max output"):
            table.add_column(name, justify="right")
        table.add_column("cost at batch prices", no_wrap=True)
        for m in r.models or []:
            cost = ("unknown" if m.cost_low_usd is None or m.cost_high_usd is None
                    else f"${m.cost_low_usd:,.4f} – ${m.cost_high_usd:,.4f}")
            table.add_row(m.model, f"{m.rows:,}", f"{m.input_tokens:,}",
                          f"{m.cached_tokens:,}", f"{m.max_output_tokens:,}", cost)
            notes.append(f"{r.pipeline} / {m.model}: {m.note}")
        if not r.models:
            table.add_row("-", "0", "0", "0", "0", "$0")
        if r.unusable_rows:
            notes.append(f"{r.pipeline}: {r.unusable_rows:,} unusable rows (not counted)")
        console.print(table)
    for note in notes:
        console.print(note, highlight=False)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from batchd.daemon.commands.key_history_text import history_lines
    from batchd.daemon.commands.show import key_history

    config = _load(args)
    if args.pipeline:
        pipelines = [config.pipeline(args.pipeline)]
    else:
        pipelines = list(config.pipelines)
    found = [key_history(config, p, args.key) for p in pipelines]
    known = [h for h in found if h["read"] or h["landed"]] or found[:1]
    if args.json:
        payload: Any = known[0] if len(known) == 1 else known
        sys.stdout.buffer.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        for history in known:
            print("\n".join(history_lines(history)))
    return 0 if any(h["read"] or h["landed"] for h in known) else 1


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from batchd.daemon.commands.dead_letters import iter_dead_letters, request_retry

    config = _load(args)
    pipeline = config.pipeline(args.pipeline)
    if args.action == "list":
        count = 0
        for row in iter_dead_letters(config, pipeline):
            count += 1
            if args.json:
                sys.stdout.buffer.write(orjson.dumps(row) + b"\n")
            else:
                message = str(row.get("error_message") or "").replace("\n", " ")[:100]
                print(f"{row.get('key')}\t{row.get('error_type')}\t"
                      f"attempts={row.get('attempts')}\t{message}")
        if not args.json:
            print(f"{count} dead letters", file=sys.stderr)
        return 0
    if not (args.all or args.key):
        raise ConfigError("dead-letters retry needs --key KEY (repeatable) or --all")
    dead: dict[str, str] = {}
    for row in iter_dead_letters(config, pipeline):
        key, kind = str(row["key"]), str(row.get("error_type"))
        if key not in dead or dead[key] in _NOT_RETRIABLE:  # a retriable outcome wins
            dead[key] = kind
    unfit = {key: kind for key, kind in dead.items() if kind in _NOT_RETRIABLE}
    if args.all:
        keys = [key for key in dead if key not in unfit]
        if unfit:
            print(f"skipped {len(unfit)} dead letters that a retry cannot fix "
                  f"({', '.join(sorted(set(unfit.values())))}): {_NOT_RETRIABLE_WHY}",
                  file=sys.stderr)
    else:
        keys = list(args.key)
        for key in keys:
            if key not in dead:
                raise ConfigError(f"{key!r} is not a dead letter of pipeline {pipeline.name!r} "
                                  "(see `batchd dead-letters list`)")
            if key in unfit:
                raise ConfigError(f"{key!r} was dead-lettered as {unfit[key]}: "
                                  f"{_NOT_RETRIABLE_WHY}")
    if not keys:
        print("no dead letters to retry", file=sys.stderr)
        return 0
    if config.cluster.shared:
        import anyio

        from batchd.daemon.commands.dead_letters import request_retry_in_cluster

        number = anyio.run(request_retry_in_cluster, config, pipeline, keys)
        print(f"requested a retry of {len(set(keys))} keys in the cluster (request {number}); "
              "the worker reading the source resends them between chunks — run `batchd run` "
              "if no worker is running")
        return 0
    path = request_retry(config, pipeline, keys)
    print(f"requested a retry of {len(set(keys))} keys ({path}); the daemon picks it up "
          "between chunks — run `batchd run` if it is not running")
    return 0


class _VersionAction(argparse.Action):
    """``--version``: computed only when asked (it loads plugins and the SDK)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        from batchd.daemon.commands.version_info import version_text

        print(version_text())
        parser.exit()


def cmd_completion(args: argparse.Namespace) -> int:
    from batchd.daemon.commands.completion import completion_script

    sys.stdout.write(completion_script(build_parser(), args.shell))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from batchd.daemon.commands.resume import request_resume

    config = _load(args)
    if config.cluster.shared:
        return _resume_in_cluster(config, args.pipeline)
    _, reason, kind = request_resume(config, args.pipeline)
    if reason is None:
        print(f"pipeline {args.pipeline!r} is not paused; nothing to resume", file=sys.stderr)
    else:
        print(f"resume of {args.pipeline!r} requested (paused: {kind or 'unknown'}: {reason}); "
              "a running daemon resumes it within a second, a stopped one when it starts")
    return 0


def _resume_in_cluster(config: Config, pipeline: str) -> int:
    import anyio

    from batchd.daemon.commands.resume import resume_in_cluster

    found = anyio.run(resume_in_cluster, config, pipeline)
    if found.reason is None:
        print(f"pipeline {pipeline!r} is not paused in the cluster; nothing to resume",
              file=sys.stderr)
    elif found.kind == "budget":
        print(f"pipeline {pipeline!r} is paused by its budget ({found.reason}); a budget pause "
              "lifts only with a higher budget_usd: edit the workers' configs and reload them "
              "(systemctl reload batchd)", file=sys.stderr)
        return 1
    elif found.resumed:
        print(f"resumed {pipeline!r} in the cluster (paused: {found.kind or 'unknown'}: "
              f"{found.reason}); every running worker goes on within one poll")
    else:
        print(f"pipeline {pipeline!r} was resumed meanwhile; nothing to do", file=sys.stderr)
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    from batchd.daemon.commands.repair import repair_ledger

    for line in repair_ledger(_load(args)):
        print(line)
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from batchd.daemon.commands.reconcile import adopt_batch, ignore_batch, list_unknown

    config = _load(args)
    if args.adopt and not args.chunk:
        raise ConfigError("reconcile --adopt BATCH needs --chunk CHUNK (the alarm names it)")
    if args.adopt:
        print(adopt_batch(config, args.adopt, args.chunk))
    elif args.ignore:
        print(ignore_batch(config, args.ignore))
    else:
        lines = list_unknown(config)
        print("\n".join(lines) if lines else "no batches on the API that this state does not know")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    import anyio

    try:
        import asyncpg  # noqa: F401  (the store's driver; only the postgres extra installs it)
    except ImportError:
        raise ConfigError("batchd cluster uses a PostgreSQL store: pip install "
                          "'batchd[postgres]'") from None
    config = _load(args)
    if args.cluster_command == "import":
        from batchd.daemon.commands.cluster_import import import_state_dir

        print("\n".join(anyio.run(import_state_dir, config)))
        return 0
    if args.cluster_command == "init":
        from batchd.daemon.commands.cluster_init import init_cluster

        print(anyio.run(lambda: init_cluster(config, accept_config=args.accept_config)))
        return 0
    from batchd.daemon.commands.cluster_status import cluster_status, status_lines

    status = anyio.run(cluster_status, config).overview
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(status, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print("\n".join(status_lines(status)))
    return 0


def _cluster_parser(sub: Any) -> None:
    cluster = sub.add_parser("cluster", help="cluster mode's PostgreSQL store: create its "
                             "schema, list its workers (see docs/cluster.md)")
    commands = cluster.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    init = commands.add_parser("init", help="create or upgrade the [cluster] schema "
                               "(idempotent; refuses a newer one)")
    init.add_argument("config")
    init.add_argument("--accept-config", action="store_true",
                      help="record this config's pipelines as the one every worker must share "
                      "(after a deliberate change; refused while any worker is alive)")
    init.set_defaults(func=cmd_cluster)
    move = commands.add_parser("import", help="move a single daemon's live state (its "
                               "state_dir) into the cluster, for cluster workers to carry on")
    move.add_argument("config", help="the daemon's config, with a [cluster] table")
    move.add_argument("--state-dir", help="the state dir to move (default: the config's)")
    move.set_defaults(func=cmd_cluster)
    status = commands.add_parser("status", help="every worker, its heartbeat and what it owns; "
                                 "the limit counters")
    status.add_argument("config")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_cluster)


def build_parser() -> argparse.ArgumentParser:
    from batchd.daemon.emulator.cli import add_arguments as emulator_arguments

    parser = argparse.ArgumentParser(
        prog="batchd",
        description="Move large backlogs through Anthropic's Message Batches API, "
        "losing and duplicating nothing.",
    )
    parser.add_argument("--version", action=_VersionAction,
                        help="versions of batchd, Python, the SDK and API, and plugins")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="run the pipelines of CONFIG (foreground daemon)")
    run.add_argument("config", help="path to the pipeline TOML file")
    run.add_argument("--until-drained", action="store_true",
                     help="exit 0 once every source row has exactly one terminal outcome")
    run.add_argument("--state-dir", help="override the config's state_dir")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="progress, batches, counts and cost from the manifest")
    status.add_argument("config")
    status.add_argument("--state-dir")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--watch", action="store_true", help="refresh until interrupted")
    status.add_argument("--interval", type=float, default=2.0)
    # status reads the manifest and draws a table: structlog (and asyncio under it) only
    # if something logs (daemon/ops/lazy_log.py).
    status.set_defaults(func=cmd_status, logs=False)

    validate = sub.add_parser(
        "validate", help="check CONFIG as `run` would before reading a row; lists every problem")
    validate.add_argument("config")
    validate.add_argument("--state-dir", help="override the config's state_dir")
    validate.add_argument("--connect", action="store_true",
                          help="also check that databases, brokers and the API accept the "
                          "credentials")
    validate.add_argument("--json", action="store_true", help="machine-readable output")
    validate.set_defaults(func=cmd_validate)

    estimate = sub.add_parser("estimate", help="read the source and estimate tokens and cost")
    estimate.add_argument("config")
    estimate.add_argument("--pipeline", help="only this pipeline")
    estimate.add_argument("--json", action="store_true")
    estimate.set_defaults(func=cmd_estimate)

    show = sub.add_parser("show", help="one key's history: position, attempts, batches, outcome")
    show.add_argument("config")
    show.add_argument("key")
    show.add_argument("--pipeline", help="only this pipeline (default: every one)")
    show.add_argument("--state-dir")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)

    dead = sub.add_parser("dead-letters", help="list dead letters, or resubmit them")
    dead.add_argument("action", choices=["list", "retry"])
    dead.add_argument("config")
    dead.add_argument("pipeline")
    dead.add_argument("--key", action="append", help="a key to retry (repeatable)")
    dead.add_argument("--all", action="store_true", help="retry every dead letter")
    dead.add_argument("--json", action="store_true", help="list as JSON lines")
    dead.add_argument("--state-dir")
    dead.set_defaults(func=cmd_dead_letters)

    resume = sub.add_parser("resume", help="lift a pipeline's pause once its cause is fixed")
    resume.add_argument("config")
    resume.add_argument("pipeline")
    resume.add_argument("--state-dir")
    resume.set_defaults(func=cmd_resume)

    repair = sub.add_parser("repair", help="rebuild a lost or damaged key ledger (keys.sqlite) "
                            "from the manifest, the spool and the source; cut a manifest "
                            "damaged mid-file to its last good record (daemon stopped)")
    repair.add_argument("config")
    repair.add_argument("--state-dir")
    repair.set_defaults(func=cmd_repair)

    reconcile = sub.add_parser("reconcile", help="list batches on the API that the state does "
                               "not know, or decide about one (daemon stopped)")
    reconcile.add_argument("config")
    reconcile.add_argument("--state-dir")
    decision = reconcile.add_mutually_exclusive_group()
    decision.add_argument("--adopt", metavar="BATCH", help="the batch is --chunk's: collect it")
    decision.add_argument("--ignore", metavar="BATCH",
                          help="the batch is not this state's (its shared rows are paid again)")
    reconcile.add_argument("--chunk", help="the chunk that adopts the batch")
    reconcile.set_defaults(func=cmd_reconcile)

    _cluster_parser(sub)

    emulator = sub.add_parser("emulator", help="serve a local Message Batches API emulator")
    emulator_arguments(emulator)
    emulator.set_defaults(func=cmd_emulator)

    plugins = sub.add_parser("plugins", help="list plugins, their sources, sinks and hooks")
    plugins.add_argument("--all", action="store_true", help="include built-ins")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=cmd_plugins)

    completion = sub.add_parser("completion", help="print a bash or zsh completion script")
    completion.add_argument("shell", choices=["bash", "zsh"])
    completion.set_defaults(func=cmd_completion)

    load_plugins()
    _plugin_commands(sub)
    return parser


def _plugin_commands(sub: Any) -> None:
    """
    Each plugin's ``register_commands`` on its own: one whose command clashes with
    another's (argparse refuses a second parser of the same name) is skipped with a
    warning, instead of taking every ``batchd`` command down with it.
    """
    for impl in pm.hook.register_commands.get_hookimpls():
        try:
            impl.function(**{name: sub for name in impl.argnames})  # as pluggy would call it
        except argparse.ArgumentError as exc:
            print(f"batchd: warning: plugin {impl.plugin_name!r} adds no command: {exc}",
                  file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()  # loads the installed plugins, for their commands
    except ConfigError as exc:  # a plugin that cannot be imported: one line, not a traceback
        print(f"batchd: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    args = parser.parse_args(argv)  # --help and bad flags exit here, before anything heavy
    func: Callable[[argparse.Namespace], Any] = args.func
    if getattr(args, "logs", True):  # before any structlog user; status logs nothing
        from batchd.daemon.ops import _structlog_plain  # noqa: F401  (structlog without rich)
    try:
        try:
            return int(func(args) or 0)
        except OSError as exc:  # a file-system error nothing named yet: still one line
            if isinstance(exc, BrokenPipeError):
                raise
            from batchd.daemon.wal.storage_errors import storage_error

            raise storage_error(exc, None, "file") from None
    except ConfigError as exc:
        # A state that needs the operator (a damaged manifest) says so instead.
        print(f"batchd: {getattr(exc, 'prefix', 'config error')}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BatchdError as exc:
        print(f"batchd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `batchd plugins | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
