"""
The daemon process: recovery, one runner per pipeline, signals, sd_notify.

Recovery is not a separate mode. Opening the manifest replays it; each
runner then drives every live chunk from its last record. Only after that
is systemd told ``READY=1``. SIGTERM cancels the runners at whatever await
they are in — safe, because every step is announced in the manifest before
it acts and every sink write is idempotent — and in-flight batches keep
running remotely until the next start reattaches them. SIGHUP re-reads the
config and starts a new generation of runners the same way, without ever
letting go of the manifest: sealed chunks keep the requests they were
sealed with, new chunks follow the new config.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import structlog

from batchd.daemon.batches.api import BatchesApi, resolve_api_key
from batchd.daemon.batches.queue_limit import QueueLimit, queue_limit_of
from batchd.daemon.batches.reconcile import RECONCILE_NAME, Reconciler
from batchd.daemon.config import Config, PluginSpec, load_config
from batchd.daemon.factories import build_sink, build_source
from batchd.daemon.intake.ledger import KeyLedger
from batchd.daemon.intake.ledger_binding import open_bound_ledger
from batchd.daemon.models.budget import Budget
from batchd.daemon.models.preflight import catalog_for, preflight, record_check
from batchd.daemon.models.pricing import PriceTable
from batchd.daemon.ops._logging import register_secret
from batchd.daemon.ops.health import Health
from batchd.daemon.ops.live_status import LiveStatus
from batchd.daemon.ops.sd_notify import Notifier, watchdog_loop
from batchd.daemon.ops.telemetry import Telemetry
from batchd.daemon.pipeline import PipelineRunner
from batchd.daemon.results.answers import AnswerReader
from batchd.daemon.results.output_paths import check_outputs
from batchd.daemon.wal.manifest import Manifest
from batchd.daemon.wal.private_state import make_private
from batchd.daemon.wal.state_db import check_reconcile_cache
from batchd.daemon.wal.storage_errors import storage_error
from batchd.plugins.backoff import Backoff
from batchd.plugins.contract import Sink
from batchd.plugins.errors import BatchdError, ConfigError, FatalError, RetriableError

__all__ = ("run_daemon",)

log = structlog.get_logger("batchd")


# Seconds a graceful stop may take before the process exits regardless (the manifest
# makes that safe); well under the unit's TimeoutStopSec.
STOP_BOUND = float(os.environ.get("BATCHD_STOP_TIMEOUT", "30"))


def _exit_after(seconds: float) -> None:
    def force() -> None:
        log.warning("graceful stop took too long; exiting now", bound_seconds=seconds)
        os._exit(1)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()


class _Daemon:
    """State shared by the generations of runners one process lives through."""

    def __init__(self, config: Config, until_drained: bool) -> None:
        self.config = config
        self.until_drained = until_drained
        self.notifier = Notifier.from_env()
        self.runners: list[PipelineRunner] = []
        self.generation: anyio.CancelScope | None = None
        self.reload_requested = False
        self.stopping = False
        self.metrics: Any = None
        self.health = Health()
        self.live = LiveStatus()
        self.reconciler: Reconciler
        self.cluster: Any = None  # cluster mode: the shared store (a MirroredStore)
        self.cluster_watch: Any = None  # cluster mode with metrics: the cluster's overview

    async def build_runners(
        self, stack: AsyncExitStack, manifest: Manifest, ledger: KeyLedger
    ) -> list[PipelineRunner]:
        config = self.config
        api_key = resolve_api_key()
        if api_key is None:
            log.warning("no API key: ANTHROPIC_API_KEY is not set, nor the systemd credential "
                        "anthropic-api-key; requests carry a placeholder only an emulator accepts")
        api = BatchesApi(config.api, api_key)
        stack.push_async_callback(api.aclose)
        catalog = catalog_for(config)
        prices = PriceTable(config.prices, catalog=catalog, source=str(config.path))

        def unknown_price(model: str) -> None:
            log.warning("no price known for model: its cost is counted as unknown (unpriced), "
                        'not guessed; add [prices."<model>"] to the config', model=model)

        limit, origin = queue_limit_of(config.api)
        queue = QueueLimit(limit, manifest)
        log.info("api", version=config.api.version, queue_limit=limit, queue_limit_from=origin)

        cluster = self.cluster
        view: Any = manifest if cluster is None else cluster  # what the runtime reads
        if cluster is not None:
            from batchd.daemon.store.cluster_worker import queue_scope

            scope = queue_scope(config)
            queue = QueueLimit(limit, view)
        create_lock = anyio.Lock()
        # Batches on the API that the manifest does not know (a restored backup): found
        # before anything is created, adopted by the chunks they belong to.
        self.reconciler = Reconciler(manifest, api, config.state_dir, config.api.poll_interval)
        spool_dir = config.state_dir / "spool"
        runner_class = PipelineRunner
        if cluster is not None:
            from batchd.daemon.cluster_runner import ClusterRunner

            runner_class = ClusterRunner
        runners = []
        opened: list[tuple[PipelineRunner, list[tuple[Sink, PluginSpec]]]] = []
        drained = self.until_drained
        for pipeline in config.pipelines:
            source = build_source(config, pipeline.name, pipeline.source, until_drained=drained)
            stack.push_async_callback(source.aclose)
            specs = [*pipeline.sinks, pipeline.dead_letter]
            sinks = [build_sink(config, pipeline.name, spec) for spec in specs]
            if self.metrics is not None:
                self.metrics.declare_pipeline(pipeline.name, pipeline.budget_usd)
            runner = runner_class(
                pipeline, manifest=view, api=api, api_config=config.api, ledger=ledger,
                spool_dir=spool_dir, create_lock=create_lock, source=source, sinks=sinks[:-1],
                dead_letter=sinks[-1],
                cost=prices.cost_function(unknown_price,
                                          geo=pipeline.request.options.inference_geo),
                budget=Budget(pipeline, prices),
                telemetry=Telemetry(self.metrics, pipeline.name),
                make_source=partial(build_source, config, pipeline.name, pipeline.source,
                                    until_drained=drained),
                queue=queue, answers=AnswerReader(pipeline, catalog),
                model_check=record_check(pipeline, catalog=catalog,
                                         api_version=config.api.version),
                reconciler=self.reconciler if cluster is None else None,
                store=cluster,
                workspace=None if cluster is None else config.cluster.workspace,
                queue_scope=None if cluster is None else scope,
            )
            opened.append((runner, list(zip(sinks, specs, strict=True))))
        check_outputs(config.state_dir, [
            (spec.where, sink) for _, pairs in opened for sink, spec in pairs
        ])
        # Sources first: one that cannot start (a missing file) fails before any sink
        # has created a table or a directory.
        for runner, _ in opened:
            try:
                await runner.prepare()
            except (ConfigError, FatalError) as exc:
                raise ConfigError(f"{runner.pipeline.source.where}: {exc}") from None
        for _, sinks_and_specs in opened:
            for sink, spec in sinks_and_specs:
                await _open_sink(sink, spec)
                stack.push_async_callback(sink.aclose)
        runners = [runner for runner, _ in opened]
        log.info("pipelines started", pipelines=[p.name for p in config.pipelines],
                 state_dir=str(config.state_dir), api=api.base_url,
                 live_chunks=len(manifest.state.chunks))
        return runners

    async def run_generation(self, until_drained: bool) -> None:
        """The runners, and beside them the reconciler, stopped once the runners are done."""
        reconcile = anyio.CancelScope()

        async def reconciling() -> None:
            with reconcile:
                await self.reconciler.run()

        async def sweeping() -> None:
            from batchd.daemon.cluster.stray_sweeper import StraySweeper

            cluster = self.config.cluster
            telemetry = {runner.pipeline.name: runner.telemetry for runner in self.runners}
            sweeper = StraySweeper(
                self.cluster.inner, self.runners[0].api, cluster.workspace,
                interval=max(1.0, min(60.0, cluster.lease_ttl)),
                on_alarm=lambda pipeline, kind: (
                    telemetry[pipeline].alarm(kind) if pipeline in telemetry else None),
            )
            with reconcile:
                await sweeper.run()

        async with anyio.create_task_group() as tasks:
            if self.cluster is None:  # in a cluster, other workers' batches are not unknown
                tasks.start_soon(reconciling)
            elif self.runners:  # one sweeper per worker process; one sweeps per workspace
                tasks.start_soon(sweeping)
            async with anyio.create_task_group() as runners:
                for runner in self.runners:
                    runners.start_soon(partial(runner.run, until_drained=until_drained))
            reconcile.cancel()

    async def announce_ready(self) -> None:
        """
        READY=1 once every pipeline has reattached its batches: each chunk that was
        mid-create at start-up is adopted or sent again. While that takes, the start
        timeout is extended; past a minute (the API unreachable, say) READY is sent
        anyway, so systemd does not kill a daemon that is only waiting.
        """
        with anyio.move_on_after(60):
            for runner in self.runners:
                while not runner.recovered.is_set():
                    self.notifier.extend_timeout(30)
                    with anyio.move_on_after(10):
                        await runner.recovered.wait()
        unresolved = [r.pipeline.name for r in self.runners if not r.recovered.is_set()]
        status = "recovered; running" if not unresolved else (
            f"running; still resolving creates of {', '.join(unresolved)}")
        self.notifier.ready(status=status)
        self.health.recovered = True
        log.info("ready", unresolved=unresolved)

    def reload(self) -> None:
        """Re-read the config; a broken one is logged and the running config kept."""
        try:
            new = load_config(self.config.path, state_dir=self.config.state_dir)
        except BatchdError as exc:
            log.error("reload failed; keeping the running config", error=str(exc))
            return
        try:
            preflight(new)
        except BatchdError as exc:
            log.error("reload failed; keeping the running config", error=str(exc))
            return
        if new.state_dir != self.config.state_dir:
            log.error("reload cannot move state_dir; keeping it", state_dir=str(new.state_dir))
            return
        try:  # factories validate options without I/O: catch a bad plugin table now
            for pipeline in new.pipelines:
                build_source(new, pipeline.name, pipeline.source)
                for spec in (*pipeline.sinks, pipeline.dead_letter):
                    build_sink(new, pipeline.name, spec)
        except BatchdError as exc:
            log.error("reload failed; keeping the running config", error=str(exc))
            return
        self.config = new
        log.info("config reloaded", pipelines=[p.name for p in new.pipelines])

    async def on_signals(self, outer: anyio.CancelScope) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: reloading config")
                    self.notifier.reloading()
                    self.reload_requested = True
                    if self.generation is not None:
                        self.generation.cancel()
                    continue
                if self.stopping:
                    log.warning("second signal; exiting at once (the manifest keeps us safe)")
                    os._exit(1)
                self.stopping = True
                log.info("stopping", signal=signal.Signals(signum).name)
                self.notifier.stopping()
                _exit_after(STOP_BOUND)
                outer.cancel()

    async def report(self, manifest: Manifest) -> None:
        """Refresh gauges and systemd's STATUS=; in a terminal, show progress as it goes."""
        interactive = sys.stdout.isatty()
        while True:
            await anyio.sleep(2 if interactive else 5)
            for runner in self.runners:
                runner.telemetry.refresh(runner.live_chunks(), manifest.size_bytes(),
                                         (runner.paused, runner.pause_kind),
                                         runner.ledger.size_bytes())
            if interactive:  # in a cluster, the progress is the whole cluster's
                view = manifest if self.cluster is None else self.cluster
                for p in self.live.snapshot(self.config, view)["pipelines"]:
                    log.info("progress", pipeline=p["name"], **_progress(p, self.live))
            if self.notifier.enabled:
                self.notifier.status(_status_line(self.runners))


def _progress(p: dict[str, Any], live: LiveStatus) -> dict[str, Any]:
    """The terminal's progress line: against the whole source where its size is known."""
    from batchd.daemon.ops.status import progress_line

    shown = live.shown_fraction(p["name"], p["progress"]["fraction"])
    filled = round(24 * shown)
    return {
        "bar": "[" + "#" * filled + "-" * (24 - filled) + f"] {100 * shown:.0f}%",
        "rows": progress_line(p),
        "rows_in_flight": p["rows_pending"],
        "cost_usd": round(p["cost_usd"], 4),
    }


async def _open_sink(sink: Sink, spec: PluginSpec) -> None:
    """Open a sink, waiting out an unreachable database or broker with backoff."""
    backoff = Backoff(0.5, 30.0)
    while True:
        try:
            await sink.open()
            return
        except ConfigError as exc:
            raise ConfigError(f"{spec.where}: {exc}") from None
        except RetriableError as exc:
            delay = backoff.next_delay()
            log.warning("sink unavailable at start; retrying", sink=spec.type,
                        error=str(exc), retry_in=round(delay, 1))
            await anyio.sleep(delay)


def _status_line(runners: list[PipelineRunner]) -> str:
    parts = []
    for runner in runners:
        state = runner.manifest.state.pipelines.get(runner.pipeline.name)
        done = state.rows_done if state else 0
        cost = state.cost_usd if state else 0.0
        waiting = sum(1 for c in runner.live_chunks() if c.stage.value == "submitted")
        paused = (f" PAUSED [{state.pause_kind or 'unknown'}] ({state.paused})"
                  if state and state.paused else "")
        parts.append(f"{runner.pipeline.name}: {waiting} batches in flight, {done} rows done, "
                     f"${cost:.2f}{paused}")
    return "; ".join(parts)


async def run_daemon(config: Config, *, until_drained: bool = False) -> int:
    """Run every pipeline until drained (or until SIGTERM); returns the exit code."""
    try:
        return await _run(config, until_drained)
    except BaseExceptionGroup as group:
        # Task groups wrap errors; the CLI reports the first one an operator can act on.
        raise _first_error(group) from group


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The first error an operator can act on: a BatchdError, else a file-system error."""
    found: BaseException | None = None
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = _first_error(exc)
        if isinstance(exc, BatchdError):
            return exc
        if found is None and isinstance(exc, OSError):
            found = storage_error(exc, None, "file" if exc.filename is not None else "I/O error")
    return found if found is not None else group


_FRESH_FILES = ("manifest.jsonl", "manifest.lock", "keys.sqlite", "keys.sqlite-wal",
                "keys.sqlite-shm")


async def _run(config: Config, until_drained: bool) -> int:
    try:
        fresh = not (config.state_dir / "manifest.jsonl").exists()
        existing = {name for name in _FRESH_FILES if (config.state_dir / name).exists()}
        had_dir = config.state_dir.exists()
    except OSError as exc:
        raise storage_error(exc, config.state_dir, "state dir") from None
    try:
        return await _serve(config, until_drained)
    except BaseException as exc:
        error = _first_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if fresh and isinstance(error, ConfigError):
            _remove_fresh_state(config.state_dir, existing, had_dir)
        raise


def _remove_fresh_state(state_dir: Path, existing: set[str], had_dir: bool) -> None:
    """A run that failed on its config before doing anything leaves nothing behind
    (and never removes what was there before it: a ledger it refused, say)."""
    for name in _FRESH_FILES:
        if name not in existing:
            with contextlib.suppress(OSError):
                (state_dir / name).unlink(missing_ok=True)
    for directory in (state_dir / "spool", *(() if had_dir else (state_dir,))):
        with contextlib.suppress(OSError):
            directory.rmdir()  # only if empty


async def _serve(config: Config, until_drained: bool) -> int:
    daemon = _Daemon(config, until_drained)
    umask = make_private(config.state_dir)
    try:
        return await _serve_private(daemon, config, until_drained)
    finally:
        os.umask(umask)  # batchd run called in-process (tests) leaves the caller's as it was


async def _serve_private(daemon: _Daemon, config: Config, until_drained: bool) -> int:
    spool_dir = config.state_dir / "spool"
    try:
        spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in spool_dir.glob("*.tmp"):
            leftover.unlink()
    except OSError as exc:
        raise storage_error(exc, spool_dir, "spool dir") from None
    api_key = resolve_api_key()
    if api_key:
        register_secret(api_key)
    compact = int(os.environ.get("BATCHD_COMPACT_BYTES", 64 * 1024 * 1024))

    async with AsyncExitStack() as process:
        if config.cluster.shared:  # checked first: a wrong DSN or schema writes nothing
            from batchd.daemon.store.cluster_worker import open_cluster_store

            daemon.cluster = await open_cluster_store(config, process, spool_dir)
        manifest = await Manifest.open(config.state_dir, compact_bytes=compact)
        process.push_async_callback(manifest.aclose)
        ledger = await open_bound_ledger(config.state_dir, manifest)
        process.callback(ledger.close)
        check_reconcile_cache(config.state_dir / RECONCILE_NAME)
        daemon.metrics = _start_metrics(config, process, daemon, manifest)
        async with anyio.create_task_group() as outer:
            outer.start_soon(daemon.on_signals, outer.cancel_scope)
            outer.start_soon(daemon.health.heartbeat)
            if daemon.metrics is not None or sys.stdout.isatty():  # someone will look
                outer.start_soon(daemon.live.measure_forever, lambda: daemon.runners)
            if daemon.notifier.enabled:
                outer.start_soon(watchdog_loop, daemon.notifier)
            outer.start_soon(daemon.report, manifest)
            if daemon.cluster_watch is not None:
                outer.start_soon(daemon.cluster_watch.run_forever)
            if daemon.cluster is not None:
                from batchd.daemon.store.cluster_worker import heartbeat_loop

                outer.start_soon(heartbeat_loop, daemon.cluster, lambda: daemon.runners,
                                 config.cluster.lease_ttl)
            while True:
                daemon.reload_requested = False
                async with AsyncExitStack() as generation:
                    daemon.runners = await daemon.build_runners(generation, manifest, ledger)
                    with anyio.CancelScope() as scope:
                        daemon.generation = scope
                        async with anyio.create_task_group() as pipelines:
                            pipelines.start_soon(daemon.run_generation, until_drained)
                            pipelines.start_soon(daemon.announce_ready)
                if not daemon.reload_requested:
                    break
                daemon.reload()
            outer.cancel_scope.cancel()
        log.info("batchd stopped", reason="signal" if daemon.stopping else "drained")
    return 0


def _start_metrics(config: Config, stack: AsyncExitStack, daemon: _Daemon,
                   manifest: Manifest) -> Any:
    """Metrics, /healthz, /readyz and the dashboard on ``[metrics] address:port``."""
    if config.metrics_port is None:
        return None
    import asyncio

    from batchd.daemon.ops.metrics import Metrics
    from batchd.daemon.ops.web import DaemonView, LoopBridge, WebApp, start_web_server

    metrics = Metrics()
    state: Any = manifest
    if daemon.cluster is not None:  # the page shows the cluster's progress and workers
        from batchd.daemon.ops.cluster_metrics import ClusterCollector
        from batchd.daemon.ops.cluster_watch import ClusterWatch, watch_interval

        state = daemon.cluster
        daemon.cluster_watch = ClusterWatch(config, daemon.cluster.worker_id,
                                            interval=watch_interval(config.cluster.lease_ttl))
        metrics.registry.register(ClusterCollector(daemon.cluster_watch))
    view = DaemonView(daemon, state, LoopBridge(asyncio.get_running_loop()))
    try:
        server = start_web_server(WebApp(metrics, daemon.health, view),
                                  config.metrics_address, config.metrics_port)
    except OSError as exc:
        key = "port" if exc.errno == errno.EADDRINUSE else "address"
        raise ConfigError(f"{config.path}: [metrics]: {key}: cannot listen on "
                          f"{config.metrics_address}:{config.metrics_port}: "
                          f"{exc.strerror or exc}") from None
    stack.callback(server.close)
    base = server.url.removesuffix("/metrics")
    log.info("metrics listening", url=server.url, dashboard=f"{base}/", healthz=f"{base}/healthz",
             readyz=f"{base}/readyz")
    return metrics
