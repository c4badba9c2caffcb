"""
Running an emulator in-process: in the caller's event loop or in its own thread.

Async tests and the demo use `run_emulator`; sync tests and anything that
starts ``batchd run`` subprocesses use `EmulatorThread`, whose loop runs in a
daemon thread so the test's own code may block freely.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from aiohttp import web

from batchd.daemon.emulator.app import build_app
from batchd.daemon.emulator.config import EmulatorConfig
from batchd.daemon.emulator.service import EmulatorService

__all__ = ("Emulator", "EmulatorThread", "run_emulator")

T = TypeVar("T")


class Emulator:
    """
    A running emulator, for code in the same event loop.

    .. versionadded:: 0.1
    """

    def __init__(self, service: EmulatorService, base_url: str) -> None:
        self.service = service
        self.base_url = base_url

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    def stats(self) -> dict[str, Any]:
        """Batches and requests received (per custom_id), HTTP calls and faults injected."""
        return self.service.stats()

    def set_faults(self, **values: Any) -> dict[str, Any]:
        """Change fault settings (keys as in `FaultSettings`); returns them all."""
        return self.service.set_faults(**values)

    def faults(self) -> dict[str, Any]:
        return self.service.get_faults()

    def advance_clock(self, seconds: float) -> float:
        """Move the virtual clock forward (to reach TTL or retention without waiting)."""
        return self.service.advance_clock(seconds)

    async def reset(self) -> None:
        """Forget everything, as ``POST /_emulator/reset`` does."""
        await self.service.reset()


@contextlib.asynccontextmanager
async def run_emulator(config: EmulatorConfig | None = None) -> AsyncIterator[Emulator]:
    """
    Serve an emulator for the duration of the ``async with`` block.

    .. versionadded:: 0.1
    """
    config = config or EmulatorConfig()
    service = EmulatorService(config)
    runner = web.AppRunner(
        build_app(service), access_log=None, handle_signals=False, shutdown_timeout=2.0
    )
    try:
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        yield Emulator(service, f"http://{shown}:{port}")
    finally:
        await runner.cleanup()
        await service.close()


class EmulatorThread:
    """
    An emulator in a daemon thread with its own event loop; a sync context manager.

    .. versionadded:: 0.1
    """

    def __init__(self, config: EmulatorConfig | None = None) -> None:
        self.config = config or EmulatorConfig()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._emulator: Emulator | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="batchd-emulator", daemon=True)

    @property
    def base_url(self) -> str:
        return self._running().base_url

    @property
    def port(self) -> int:
        return self._running().port

    def _running(self) -> Emulator:
        if self._emulator is None:
            raise RuntimeError("the emulator thread is not running (use it as a context manager)")
        return self._emulator

    def start(self) -> EmulatorThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=30)

    def __enter__(self) -> EmulatorThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _main(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with run_emulator(self.config) as emulator:
                self._emulator = emulator
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            if not isinstance(exc, Exception):
                raise
        finally:
            self._emulator = None

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the emulator thread is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=60)

    def stats(self) -> dict[str, Any]:
        """As `Emulator.stats`, read on the emulator's own loop."""
        emulator = self._running()

        async def read() -> dict[str, Any]:
            return emulator.stats()

        return self._call(read())

    def set_faults(self, **values: Any) -> dict[str, Any]:
        """As `Emulator.set_faults`; a ValueError names the bad setting."""
        emulator = self._running()

        async def change() -> dict[str, Any]:
            return emulator.set_faults(**values)

        return self._call(change())

    def faults(self) -> dict[str, Any]:
        emulator = self._running()

        async def read() -> dict[str, Any]:
            return emulator.faults()

        return self._call(read())

    def advance_clock(self, seconds: float) -> float:
        emulator = self._running()

        async def advance() -> float:
            return emulator.advance_clock(seconds)

        return self._call(advance())

    def reset(self) -> None:
        self._call(self._running().reset())
