"""
The local lease deadline and the last-byte gate: a create whose lease ran out
mid-body is cut off before its last bytes, and the API (here the emulator over
real HTTP) creates no batch from an incomplete body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anthropic
import orjson
import pytest
from anthropic.types.messages import MessageBatch

from batchd.daemon.cluster.deadline import LeaseDeadline, boottime, gated
from batchd.daemon.cluster.errors import LeaseExpired
from batchd.daemon.emulator import EmulatorThread
from batchd.daemon.intake.spool import body_size, stream_body
from tests.fixtures.emulator import message_requests


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TestLeaseDeadline:
    def test_never_valid_before_a_heartbeat(self) -> None:
        """A fresh worker may do nothing until its first heartbeat commits."""
        deadline = LeaseDeadline(30.0, 5.0, clock=FakeClock())
        with pytest.raises(LeaseExpired, match="never renewed; not starting or finishing create"):
            deadline.check("create")

    def test_sent_plus_ttl_minus_margin(self) -> None:
        """The deadline counts from when the heartbeat was sent, not when it returned."""
        clock = FakeClock()
        deadline = LeaseDeadline(30.0, 5.0, clock=clock)
        sent = deadline.now()
        clock.now += 20.0  # the heartbeat took 20 s to come back
        deadline.renew(sent)
        assert deadline.remaining() == pytest.approx(5.0)
        clock.now += 6.0
        with pytest.raises(LeaseExpired, match=r"passed 1\.000s ago"):
            deadline.check("commit")

    def test_a_late_reply_never_moves_it_back(self) -> None:
        """Heartbeats that complete out of order keep the later deadline."""
        clock = FakeClock()
        deadline = LeaseDeadline(30.0, 5.0, clock=clock)
        deadline.renew(1010.0)
        deadline.renew(1000.0)
        assert deadline.remaining() == pytest.approx(35.0)
        deadline.expire()
        assert not deadline.valid()

    @pytest.mark.parametrize(("ttl", "margin"), [(0, 0), (10, 10), (10, -1), (-5, 1)])
    def test_rejects_a_margin_that_eats_the_ttl(self, ttl: float, margin: float) -> None:
        """A margin must leave some of the TTL to act in."""
        with pytest.raises(ValueError, match="need 0 <= margin < ttl"):
            LeaseDeadline(ttl, margin)

    def test_boottime_moves_forward(self) -> None:
        """The default clock is monotonic (CLOCK_BOOTTIME on Linux)."""
        assert boottime() <= boottime()


async def pieces(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


@pytest.mark.anyio
class TestGate:
    async def test_passes_everything_while_the_lease_holds(self) -> None:
        """In time, the body goes through unchanged."""
        clock = FakeClock()
        deadline = LeaseDeadline(30.0, 5.0, clock=clock)
        deadline.renew(clock.now)
        got = [p async for p in gated(pieces(b"{", b"x", b"}"), deadline)]
        assert got == [b"{", b"x", b"}"]

    async def test_holds_back_the_last_piece_past_the_deadline(self) -> None:
        """Everything but the last piece may go; the last one never does."""
        clock = FakeClock()
        deadline = LeaseDeadline(30.0, 5.0, clock=clock)
        deadline.renew(clock.now)
        sent: list[bytes] = []
        with pytest.raises(LeaseExpired, match="the body's last bytes"):
            async for piece in gated(pieces(b"{", b"x", b"}"), deadline):
                sent.append(piece)
                clock.now += 20.0
        assert sent == [b"{", b"x"]


def write_spool(path: Path, count: int) -> tuple[int, int]:
    """A real spool file for *count* requests; returns (requests, body bytes)."""
    total = 0
    with path.open("wb") as f:
        for request in message_requests(count):
            line = orjson.dumps(request)
            total += len(line)
            f.write(line + b"\t" + orjson.dumps({"key": request["custom_id"]}) + b"\n")
    return count, body_size(count, total)


async def create(emulator: EmulatorThread, body: AsyncIterator[bytes], size: int) -> MessageBatch:
    client = anthropic.AsyncAnthropic(base_url=emulator.base_url, api_key="test", max_retries=0)
    try:
        return await client.post(
            "/v1/messages/batches", cast_to=MessageBatch, content=body,
            options={"headers": {"Content-Type": "application/json",
                                 "Content-Length": str(size)}},
        )
    finally:
        await client.close()


async def batch_count(emulator: EmulatorThread) -> int:
    client = anthropic.AsyncAnthropic(base_url=emulator.base_url, api_key="test", max_retries=0)
    try:
        page = await client.messages.batches.list(limit=100)
        return len(page.data)
    finally:
        await client.close()


@pytest.mark.anyio
class TestGatedCreate:
    async def test_a_create_cut_before_its_last_bytes_makes_no_batch(
        self, emulator: EmulatorThread, tmp_path: Path
    ) -> None:
        """The lease runs out mid-body: the request fails and the emulator has no batch."""
        spool = tmp_path / "p-000001.jsonl"
        _, size = write_spool(spool, 200)
        clock = FakeClock()
        deadline = LeaseDeadline(30.0, 5.0, clock=clock)
        deadline.renew(clock.now)

        async def slow_lease() -> AsyncIterator[bytes]:
            async for piece in stream_body(spool):
                yield piece
                clock.now += 60.0  # the process was stopped while sending

        with pytest.raises((LeaseExpired, anthropic.APIConnectionError)):
            await create(emulator, gated(slow_lease(), deadline), size)
        assert await batch_count(emulator) == 0
        # The same body in time creates exactly one batch (the test can fail).
        deadline.renew(clock.now)
        batch = await create(emulator, gated(stream_body(spool), deadline), size)
        assert batch.request_counts.processing == 200
        assert await batch_count(emulator) == 1
