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
from typing import Any

import anyio
import orjson

from daemon._logging import configure_logging
from daemon.config import Config, load_config
from plugins.errors import BatchdError, ConfigError
from plugins.manager import get_plugins, load_plugins, pm

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
    return load_config(args.config, state_dir=getattr(args, "state_dir", None))


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    # Logging first: the SDK, imported below, calls logging.basicConfig when ANTHROPIC_LOG
    # is set, which would add a handler that bypasses secret redaction.
    configure_logging(args.log_level or config.log_level, json=_json_flag(args.log_format))
    from daemon.preflight import preflight

    preflight(config)  # a request the model would reject: exit 2 before a row is read
    from daemon.gc_tuning import tune_gc
    from daemon.pipeline import PipelinePaused
    from daemon.supervisor import run_daemon

    tune_gc()
    try:
        return anyio.run(lambda: run_daemon(config, until_drained=args.until_drained))
    except PipelinePaused as exc:
        print(f"batchd: {exc}", file=sys.stderr)
        return EXIT_PAUSED


def _json_flag(value: str | None) -> bool | None:
    return None if value in (None, "auto") else value == "json"


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from daemon.status import collect_status, render_status

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

    with Live(console=console, auto_refresh=False) as live:
        while True:
            from rich.console import Group

            inner = Console(record=True, width=console.width)
            with inner.capture():
                render_status(collect_status(config), inner)
            live.update(Group(inner.export_text()), refresh=True)
            time.sleep(args.interval)


def cmd_emulator(args: argparse.Namespace) -> int:
    from daemon.emulator.cli import run
    from daemon.gc_tuning import tune_gc

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
    from rich.console import Console
    from rich.table import Table

    from daemon.estimate import estimate_pipeline
    from daemon.preflight import preflight

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


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from daemon.dead_letters import iter_dead_letters, request_retry

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
    path = request_retry(config, pipeline, keys)
    print(f"requested a retry of {len(set(keys))} keys ({path}); the daemon picks it up "
          "between chunks — run `batchd run` if it is not running")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from daemon.resume import request_resume

    config = _load(args)
    _, reason, kind = request_resume(config, args.pipeline)
    if reason is None:
        print(f"pipeline {args.pipeline!r} is not paused; nothing to resume", file=sys.stderr)
    else:
        print(f"resume of {args.pipeline!r} requested (paused: {kind or 'unknown'}: {reason}); "
              "a running daemon resumes it within a second, a stopped one when it starts")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from daemon.emulator.cli import add_arguments as emulator_arguments

    parser = argparse.ArgumentParser(
        prog="batchd",
        description="Move large backlogs through Anthropic's Message Batches API, "
        "losing and duplicating nothing.",
    )
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
    status.set_defaults(func=cmd_status)

    estimate = sub.add_parser("estimate", help="read the source and estimate tokens and cost")
    estimate.add_argument("config")
    estimate.add_argument("--pipeline", help="only this pipeline")
    estimate.add_argument("--json", action="store_true")
    estimate.set_defaults(func=cmd_estimate)

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

    emulator = sub.add_parser("emulator", help="serve a local Message Batches API emulator")
    emulator_arguments(emulator)
    emulator.set_defaults(func=cmd_emulator)

    plugins = sub.add_parser("plugins", help="list plugins, their sources, sinks and hooks")
    plugins.add_argument("--all", action="store_true", help="include built-ins")
    plugins.add_argument("--json", action="store_true")
    plugins.set_defaults(func=cmd_plugins)

    load_plugins()
    pm.hook.register_commands(cli=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], Any] = args.func
    try:
        return int(func(args) or 0)
    except ConfigError as exc:
        print(f"batchd: config error: {exc}", file=sys.stderr)
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
