"""
A sink that keeps failing is an operator's problem, not a retry loop.

Every sink call the collector makes goes through :func:`sink_call`, which turns any
error but a :class:`FatalError` into :class:`SinkFailed`. The chunk driver counts
them: after ``ALARM_AFTER`` failures in a row it raises the ``sink_failed`` alarm
(naming the sink's error, which names the path) and pauses the pipeline, so no new
batch is paid for while results cannot be stored; it keeps retrying the write, and
the first collect that succeeds resumes the pipeline.
"""

from __future__ import annotations

from collections.abc import Awaitable

from batchd.plugins.contract import Sink
from batchd.plugins.errors import FatalError

__all__ = ("ALARM_AFTER", "RETRY_CAP", "SinkFailed", "sink_call")

ALARM_AFTER = 3  # failures in a row before the alarm and the pause
RETRY_CAP = 10.0  # seconds between write attempts at most: a freed disk is noticed soon


class SinkFailed(Exception):
    """A sink's put or flush failed; retried, alarmed when it keeps failing."""

    def __init__(self, sink: Sink, error: BaseException) -> None:
        self.sink = sink
        self.error = error
        super().__init__(f"{type(sink).__name__}: {error}")


async def sink_call(sink: Sink, call: Awaitable[None]) -> None:
    """Await a sink call; a failure that is not fatal becomes :class:`SinkFailed`."""
    try:
        await call
    except FatalError:
        raise
    except Exception as exc:
        raise SinkFailed(sink, exc) from exc
