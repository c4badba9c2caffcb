"""background_puts: sink writes overlap parsing, yet stay in order, bounded and loud."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import pytest

from batchd.daemon.results.sink_failures import SinkFailed
from batchd.daemon.results.sink_writer import background_puts
from batchd.plugins.contract import Sink
from batchd.plugins.errors import RetriableError
from batchd.plugins.records import ResultRow

pytestmark = pytest.mark.anyio


def rows(*keys: str) -> list[ResultRow]:
    return [ResultRow(key=k, custom_id=k, status="succeeded", pipeline="p") for k in keys]


class RecordingSink(Sink):
    """Keeps what it was given; ``gate`` (when set) holds every put until it is set."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.puts: list[tuple[str, list[str]]] = []
        self.fail_on = fail_on
        self.gate: anyio.Event | None = None

    async def open(self) -> None:
        return None

    async def put(self, group: str, rows: Sequence[ResultRow]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if any(row.key == self.fail_on for row in rows):
            raise RetriableError(f"disk full while writing {self.fail_on}")
        self.puts.append((group, [row.key for row in rows]))

    async def flush(self, group: str) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_every_group_reaches_every_sink_in_order() -> None:
    first, second = RecordingSink(), RecordingSink()
    async with background_puts([first, second], "chunk-1") as hand_over:
        for n in range(5):
            await hand_over(rows(f"a{n}", f"b{n}"))
    expected = [("chunk-1", [f"a{n}", f"b{n}"]) for n in range(5)]
    assert first.puts == expected and second.puts == expected  # all done on leaving


async def test_put_error_comes_out_as_itself() -> None:
    """Not an exception group: the engine's retry logic matches on SinkFailed, which
    carries the sink's own error (and so its message naming the path)."""
    sink = RecordingSink(fail_on="bad")
    with pytest.raises(SinkFailed, match="disk full while writing bad") as raised:
        async with background_puts([sink], "g") as hand_over:
            await hand_over(rows("ok"))
            await hand_over(rows("bad"))
            for n in range(100):
                await hand_over(rows(f"later{n}"))  # the failed put cancels the sender
    assert isinstance(raised.value.error, RetriableError)
    assert sink.puts == [("g", ["ok"])]


async def test_body_error_comes_out_as_itself() -> None:
    with pytest.raises(KeyError, match="parse"):
        async with background_puts([RecordingSink()], "g") as hand_over:
            await hand_over(rows("ok"))
            raise KeyError("parse")


async def test_nothing_queues_behind_a_slow_put() -> None:
    """Memory stays at two groups: a stuck sink stops the parser instead of queueing."""
    sink = RecordingSink()
    sink.gate = anyio.Event()
    async with background_puts([sink], "g") as hand_over:
        await hand_over(rows("1"))  # taken by the writer, now stuck in put
        with anyio.move_on_after(0.2) as waited:
            await hand_over(rows("2"))
        assert waited.cancelled_caught  # the parser waited instead of queueing "2"
        sink.gate.set()
        await hand_over(rows("3"))
    assert [keys for _, keys in sink.puts] == [["1"], ["3"]]


async def test_put_starts_before_the_parser_resumes() -> None:
    """A handed-over group is being written by the time the parser runs again."""
    sink = RecordingSink()
    async with background_puts([sink], "g") as hand_over:
        for n in range(1, 4):
            await hand_over(rows(str(n)))
            assert sink.puts[-1] == ("g", [str(n)])  # this put never awaits: already done
