"""
``batchd emulator``: serve the emulator until SIGTERM or SIGINT.

The first line on stdout is ``listening on http://HOST:PORT`` (flushed, nothing
before it), so a test or script that starts it with ``--port 0`` can read the
port it got.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import TYPE_CHECKING

from batchd.daemon.durations import parse_duration

if TYPE_CHECKING:
    from batchd.daemon.emulator.config import EmulatorConfig

# The server (aiohttp and the emulator's engine) is imported by `run` only: `batchd --help`
# and shell completion read the flags from `add_arguments` without it.

__all__ = ("add_arguments", "run")


def tcp_port(value: str) -> int:
    """An argparse type: a TCP port number (0 asks the kernel for a free one)."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, got {port}")
    return port


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The emulator's flags (durations accept 0, 500ms, 2s, 5m, 24h, 29d)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=tcp_port, default=8765, help="port (0 picks a free one)")
    parser.add_argument("--latency", default="0", help="time from create to ended (default 0)")
    parser.add_argument("--ttl", default="24h", help="time from create to expires_at")
    parser.add_argument("--retention", default="29d", help="time from create to archived")
    parser.add_argument("--rules", default=None, help="reply rules file (TOML or JSON)")
    parser.add_argument(
        "--faults",
        default="",
        help="fault settings, e.g. api_error=0.05,http429=0.05,retry_after=1,slow=200ms",
    )
    parser.add_argument(
        "--tier",
        default=None,
        help="usage tier: start, build, scale or custom:N (processing queue and RPM limit)",
    )
    parser.add_argument(
        "--queue-limit", type=int, default=None, help="requests in progress (overrides --tier)"
    )
    parser.add_argument(
        "--models",
        action="append",
        default=[],
        metavar="FILE",
        help="extra model catalog file (TOML or JSON); may be given more than once",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for faults and result order")
    parser.add_argument("--state-dir", default=None, help="where request/result files go")


def _duration_flag(args: argparse.Namespace, flag: str) -> float:
    return parse_duration(getattr(args, flag), what=f"--{flag}")


def _config(args: argparse.Namespace) -> EmulatorConfig:
    """The config from parsed flags; a ValueError names the flag at fault."""
    from batchd.daemon.emulator.config import EmulatorConfig, FaultSettings, parse_fault_spec
    from batchd.daemon.emulator.rules import load_rules
    from batchd.daemon.emulator.tiers import parse_tier
    from batchd.daemon.models.catalog import CatalogError, load_catalog

    try:
        faults = parse_fault_spec(args.faults or "")
        FaultSettings.from_mapping(faults)
    except ValueError as exc:
        raise ValueError(f"--faults: {exc}") from None
    if args.rules is not None:
        load_rules(args.rules)
    if args.tier is not None:
        try:
            parse_tier(args.tier)
        except ValueError as exc:
            raise ValueError(f"--tier: {exc}") from None
    if args.queue_limit is not None and args.queue_limit < 1:
        # As --tier custom:N: a queue of 0 would refuse every create, forever.
        raise ValueError(f"--queue-limit: must be at least 1 request, got {args.queue_limit}")
    try:
        load_catalog(*args.models)
    except CatalogError as exc:
        raise ValueError(f"--models: {exc}") from None
    return EmulatorConfig(
        host=args.host,
        port=args.port,
        latency=_duration_flag(args, "latency"),
        ttl=_duration_flag(args, "ttl"),
        retention=_duration_flag(args, "retention"),
        rules=args.rules,
        faults=faults,
        queue_limit=args.queue_limit,
        tier=args.tier,
        models=tuple(args.models),
        seed=args.seed,
        state_dir=args.state_dir,
    )


async def _serve(config: EmulatorConfig) -> None:
    import asyncio

    from batchd.daemon.emulator.runner import run_emulator

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with run_emulator(config) as emulator:
        print(f"listening on {emulator.base_url}", flush=True)
        await stop.wait()


def run(args: argparse.Namespace) -> int:
    """Serve until a signal; 0 on a clean stop, 2 for bad flags or an address it cannot bind."""
    try:
        import aiohttp  # noqa: F401  (the server; only the emulator extra installs it)
    except ImportError:
        print("batchd emulator: needs aiohttp, which is not installed: "
              "pip install 'batchd[emulator]'", file=sys.stderr)
        return 2
    try:
        config = _config(args)
    except ValueError as exc:
        print(f"batchd emulator: {exc}", file=sys.stderr)
        return 2
    try:
        import asyncio

        asyncio.run(_serve(config))
    except OSError as exc:
        # A port in use or an address not on this host is the caller's to fix: exit 2,
        # like every other configuration mistake.
        print(
            f"batchd emulator: --host/--port: cannot listen on {config.host}:{config.port}: "
            f"{exc.strerror or exc}", file=sys.stderr
        )
        return 2
    return 0
