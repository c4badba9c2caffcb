"""
The daemon process: recovery, one runner per pipeline, signals, sd_notify.

Recovery is not a separate mode. Opening the manifest replays it; each
runner then drives every live chunk from its last record. Only after that
is systemd told ``READY=1``. SIGTERM cancels the runners at whatever await
they are in — safe, because every step is announced in the manifest before
it acts and every sink write is idempotent — and in-flight batches keep
running remotely until the next start reattaches them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import anyio
import structlog

from daemon._logging import register_secret
from daemon.api import BatchesApi, resolve_api_key
from daemon.config import Config, PluginSpec
from daemon.ledger import KeyLedger
from daemon.manifest import Manifest
from daemon.pipeline import PipelineRunner
from daemon.sd_notify import Notifier, watchdog_loop
from plugins.contract import PluginContext, Sink, Source
from plugins.errors import ConfigError
from plugins.manager import sink_factory, source_factory

__all__ = ("build_sink", "build_source", "run_daemon")

log = structlog.get_logger("batchd")


def _context(config: Config, pipeline: str) -> PluginContext:
    return PluginContext(
        pipeline=pipeline, state_dir=config.state_dir, config_dir=config.path.resolve().parent
    )


def _build(spec: PluginSpec, factory: Callable[..., Any], context: PluginContext) -> Any:
    try:
        return factory(dict(spec.options), context)
    except ConfigError as exc:
        raise ConfigError(f"{spec.where}: {exc}") from None


def build_source(config: Config, pipeline: str, spec: PluginSpec) -> Source:
    try:
        factory = source_factory(spec.type)
    except ConfigError as exc:
        raise ConfigError(f"{spec.where}: {exc}") from None
    source: Source = _build(spec, factory, _context(config, pipeline))
    return source


def build_sink(config: Config, pipeline: str, spec: PluginSpec) -> Sink:
    try:
        factory = sink_factory(spec.type)
    except ConfigError as exc:
        raise ConfigError(f"{spec.where}: {exc}") from None
    sink: Sink = _build(spec, factory, _context(config, pipeline))
    return sink


def _cost_function(config: Config) -> Callable[[str, dict[str, Any]], float]:
    from daemon.pricing import PriceTable

    table = PriceTable(config.prices)
    return table.batch_cost


def _status_line(runners: list[PipelineRunner]) -> str:
    parts = []
    for runner in runners:
        chunks = runner.live_chunks()
        state = runner.manifest.state.pipelines.get(runner.pipeline.name)
        done = (state.succeeded + state.truncated + state.dead) if state else 0
        cost = state.cost_usd if state else 0.0
        in_flight = sum(1 for c in chunks if c.batch_id and c.stage.value in ("submitted",))
        parts.append(f"{runner.pipeline.name}: {in_flight} batches in flight, "
                     f"{done} rows done, ${cost:.2f}")
    return "; ".join(parts)


async def run_daemon(config: Config, *, until_drained: bool = False) -> int:
    """Run every pipeline until drained (or until SIGTERM); returns the exit code."""
    notifier = Notifier.from_env()
    state_dir = config.state_dir
    spool_dir = state_dir / "spool"
    spool_dir.mkdir(parents=True, exist_ok=True)
    for leftover in spool_dir.glob("*.tmp"):
        leftover.unlink()
    api_key = resolve_api_key()
    if api_key:
        register_secret(api_key)
    compact = int(os.environ.get("BATCHD_COMPACT_BYTES", 64 * 1024 * 1024))

    async with AsyncExitStack() as stack:
        manifest = await Manifest.open(state_dir, compact_bytes=compact)
        stack.push_async_callback(manifest.aclose)
        ledger = KeyLedger(state_dir / "keys.sqlite")
        stack.callback(ledger.close)
        api = BatchesApi(config.api, api_key)
        stack.push_async_callback(api.aclose)
        cost = _cost_function(config)
        metrics = _start_metrics(config, stack)
        create_lock = anyio.Lock()
        runners: list[PipelineRunner] = []
        for pipeline in config.pipelines:
            source = build_source(config, pipeline.name, pipeline.source)
            stack.push_async_callback(source.aclose)
            sinks = [build_sink(config, pipeline.name, spec) for spec in pipeline.sinks]
            dead_letter = build_sink(config, pipeline.name, pipeline.dead_letter)
            for sink in (*sinks, dead_letter):
                await sink.open()
                stack.push_async_callback(sink.aclose)
            if metrics is not None:
                metrics.declare_pipeline(pipeline.name, pipeline.budget_usd)
            runners.append(PipelineRunner(
                pipeline, manifest=manifest, api=api, api_config=config.api, ledger=ledger,
                spool_dir=spool_dir, create_lock=create_lock, source=source, sinks=sinks,
                dead_letter=dead_letter, cost=cost, metrics=metrics,
            ))
        log.info("batchd started", pipelines=[p.name for p in config.pipelines],
                 state_dir=str(state_dir), api=api.base_url,
                 live_chunks=len(manifest.state.chunks))

        stopped = False
        async with anyio.create_task_group() as outer:

            async def on_signals() -> None:
                nonlocal stopped
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        if stopped:
                            log.warning("second signal; exiting at once")
                            os._exit(1)
                        stopped = True
                        log.info("stopping", signal=signal.Signals(signum).name)
                        notifier.stopping()
                        outer.cancel_scope.cancel()

            outer.start_soon(on_signals)
            if notifier.enabled:
                outer.start_soon(watchdog_loop, notifier)
            outer.start_soon(_report_status, notifier, runners)

            async with anyio.create_task_group() as pipelines:
                for runner in runners:
                    pipelines.start_soon(partial(runner.run, until_drained=until_drained))
                notifier.ready(status="recovered; running")
            outer.cancel_scope.cancel()
        log.info("batchd stopped", graceful=stopped)
    return 0


async def _report_status(notifier: Notifier, runners: list[PipelineRunner]) -> None:
    while True:
        await anyio.sleep(5)
        if notifier.enabled:
            notifier.status(_status_line(runners))


def _start_metrics(config: Config, stack: AsyncExitStack) -> Any:
    if config.metrics_port is None:
        return None
    from daemon.metrics import Metrics, start_http_server

    metrics = Metrics()
    server = start_http_server(metrics, port=config.metrics_port)
    stack.callback(server.close)
    log.info("metrics listening", url=server.url)
    return metrics

