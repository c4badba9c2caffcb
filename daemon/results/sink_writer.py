"""
Sink writes that overlap the parsing of the next group.

The collector parses results on the event loop; a sink's ``put`` waits on a
worker thread (SQLite, files) or on the network (PostgreSQL, Kafka).
Awaiting each put in turn leaves the parser idle for the whole round trip;
handing full groups to a background task lets it go on. Puts still happen
one at a time and in order, and ``collect`` flushes only after the last one
returned, so the contract with the sinks (put*, then flush) is unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import anyio

from batchd.daemon.results.sink_failures import sink_call
from batchd.plugins.contract import Sink
from batchd.plugins.records import ResultRow

__all__ = ("HandOver", "background_puts")

HandOver = Callable[[list[ResultRow]], Awaitable[None]]


@asynccontextmanager
async def background_puts(sinks: Sequence[Sink], group: str) -> AsyncIterator[HandOver]:
    """
    A function to hand row lists over with; each is put to every sink, in order.

    Nothing is queued: handing over waits until the previous list is written,
    so memory holds two groups at most (one being written, one being built).
    Leaving the block waits for the last put; a put's error leaves it as
    that error (not an exception group), cancelling the sender.
    """
    send, receive = anyio.create_memory_object_stream[list[ResultRow]](0)

    async def hand_over(rows: list[ResultRow]) -> None:
        await send.send(rows)
        # Let the writer start this put now: the parser may not yield again for a while,
        # and a put that starts late is a put that does not overlap anything.
        await anyio.lowlevel.checkpoint()

    async def drain() -> None:
        # The receiving end stays open until the task group is done: closing it when a put
        # fails would hand the sender a BrokenResourceError beside the put's own error.
        async for rows in receive:
            for sink in sinks:
                await sink_call(sink, sink.put(group, rows))

    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(drain)
            async with send:
                yield hand_over
    except BaseExceptionGroup as group_error:
        raise _single(group_error) from None
    finally:
        receive.close()


def _single(group_error: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one real error inside a task group's exception group (cancellations aside)."""
    real = [e for e in group_error.exceptions if not isinstance(e, anyio.get_cancelled_exc_class())]
    if len(real) == 1:
        if isinstance(real[0], BaseExceptionGroup):
            return _single(real[0])
        return real[0]
    return group_error
