"""
What a chunk driver, the poller and the dead-letter guard may ask of their pipeline.

The pipeline runner implements this; the drivers see only these few calls, not
the runner, so they import nothing of it and can be built in a test against a
small stand-in. Everything a driver *reads* (manifest, API, sinks, ...) comes in
:class:`~batchd.daemon.batches.driver_deps.DriverDeps` instead.
"""

from __future__ import annotations

from typing import Protocol

from batchd.daemon.wal.records import PauseKind

__all__ = ("Alarms", "RunnerControl")


class Alarms(Protocol):
    """Raises an operator-facing alarm (logged, recorded in the manifest, counted)."""

    async def alarm(self, kind: str, message: str, *, chunk: str | None = None) -> None: ...


class RunnerControl(Alarms, Protocol):
    """The pipeline's pause state and the calls that change it."""

    @property
    def paused(self) -> str | None:
        """The reason the pipeline is paused, or None."""

    @property
    def submissions_blocked(self) -> bool:
        """Whether creates must wait (every pause but a budget one)."""

    async def wait_unpaused(self) -> None:
        """Return once creates may go on."""

    async def pause(
        self, reason: str, *, alarm_kind: str, kind: PauseKind, chunk: str | None = None
    ) -> None:
        """Record a pause (once per reason) and raise its alarm."""

    async def sink_failed(self, error: str) -> None:
        """A sink write failed again; enough in a row pause the pipeline."""
