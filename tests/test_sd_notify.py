"""The sd_notify client against real AF_UNIX datagram sockets standing in for systemd."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from batchd.daemon.ops.sd_notify import Notifier, watchdog_loop


@pytest.fixture
def receiver() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket at a short path (sun_path is limited to 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory)


class _TimedNotifier(Notifier):
    """Records when each ping is sent; the datagrams still go to the real socket."""

    def __init__(self, address: str, *, watchdog_usec: int) -> None:
        super().__init__(address, watchdog_usec=watchdog_usec)
        self.sent_at: list[float] = []

    def watchdog(self) -> bool:
        self.sent_at.append(time.monotonic())
        return super().watchdog()


def _lines(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().splitlines()


def _drain(sock: socket.socket) -> list[list[str]]:
    sock.setblocking(False)
    datagrams = []
    try:
        while True:
            datagrams.append(sock.recv(4096).decode().splitlines())
    except BlockingIOError:
        return datagrams
    finally:
        sock.settimeout(5)


class TestFromEnv:
    """How the notifier reads systemd's environment."""

    def test_no_socket_gives_a_silent_notifier(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without $NOTIFY_SOCKET every call is a no-op that reports False."""
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        notifier = Notifier.from_env()
        assert not notifier.enabled
        assert notifier.ready() is False
        assert notifier.watchdog() is False

    def test_path_socket_from_environment(
        self, monkeypatch: pytest.MonkeyPatch, receiver: tuple[socket.socket, str]
    ) -> None:
        """$NOTIFY_SOCKET with a path is where READY=1 arrives."""
        sock, path = receiver
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        notifier = Notifier.from_env()
        try:
            assert notifier.ready() is True
            assert _lines(sock) == ["READY=1"]
        finally:
            notifier.close()

    def test_abstract_socket(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An address starting with '@' is sent to the Linux abstract namespace."""
        name = f"batchd-test-{secrets.token_hex(6)}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind("\0" + name)
            sock.settimeout(5)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
            notifier = Notifier.from_env()
            try:
                assert notifier.status("recovering") is True
                assert _lines(sock) == ["STATUS=recovering"]
            finally:
                notifier.close()

    def test_unknown_transport_is_ignored(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A vsock: address (systemd in a VM) disables notifications instead of crashing."""
        monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
        assert not Notifier.from_env().enabled


class TestMessages:
    """Each helper sends the fields systemd expects."""

    def test_ready_with_status(self, receiver: tuple[socket.socket, str]) -> None:
        """ready(status) sends both fields in one datagram."""
        sock, path = receiver
        notifier = Notifier(path)
        try:
            notifier.ready("3 batches in flight")
            assert _lines(sock) == ["READY=1", "STATUS=3 batches in flight"]
        finally:
            notifier.close()

    def test_stopping_and_watchdog(self, receiver: tuple[socket.socket, str]) -> None:
        """stopping() and watchdog() send STOPPING=1 and WATCHDOG=1."""
        sock, path = receiver
        notifier = Notifier(path)
        try:
            notifier.stopping()
            notifier.watchdog()
            assert _lines(sock) == ["STOPPING=1"]
            assert _lines(sock) == ["WATCHDOG=1"]
        finally:
            notifier.close()

    def test_reloading_carries_monotonic_timestamp(
        self, receiver: tuple[socket.socket, str]
    ) -> None:
        """reloading() sends RELOADING=1 and the current CLOCK_MONOTONIC in microseconds."""
        sock, path = receiver
        notifier = Notifier(path)
        try:
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            notifier.reloading()
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            first, second = _lines(sock)
            assert first == "RELOADING=1"
            key, _, value = second.partition("=")
            assert key == "MONOTONIC_USEC" and before <= int(value) <= after
        finally:
            notifier.close()

    def test_newlines_in_status_are_flattened(self, receiver: tuple[socket.socket, str]) -> None:
        """A multi-line status cannot inject a second field such as READY=1."""
        sock, path = receiver
        notifier = Notifier(path)
        try:
            notifier.status("line one\nREADY=1")
            assert _lines(sock) == ["STATUS=line one READY=1"]
        finally:
            notifier.close()

    def test_extend_timeout_in_microseconds(self, receiver: tuple[socket.socket, str]) -> None:
        """extend_timeout(seconds) sends EXTEND_TIMEOUT_USEC."""
        sock, path = receiver
        notifier = Notifier(path)
        try:
            notifier.extend_timeout(2.5)
            assert _lines(sock) == ["EXTEND_TIMEOUT_USEC=2500000"]
        finally:
            notifier.close()

    def test_vanished_socket_does_not_raise(self, tmp_path: Path) -> None:
        """If systemd's socket is gone the send reports False and the daemon carries on."""
        notifier = Notifier(str(tmp_path / "missing"))
        try:
            assert notifier.ready() is False
        finally:
            notifier.close()


class TestWatchdogInterval:
    """$WATCHDOG_USEC and $WATCHDOG_PID decide whether the watchdog is ours."""

    def test_interval_in_seconds(self) -> None:
        """WATCHDOG_USEC=60000000 means a 60 s watchdog."""
        env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "60000000"}
        assert Notifier.from_env(env).watchdog_interval() == 60.0

    def test_pid_of_another_process_disables_it(self) -> None:
        """A WATCHDOG_PID naming another process (we are a child) means no watchdog."""
        env = {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getppid())}
        assert Notifier.from_env(env).watchdog_interval() is None

    def test_own_pid_keeps_it(self) -> None:
        """A WATCHDOG_PID naming this process keeps the watchdog."""
        env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
        assert Notifier.from_env(env).watchdog_interval() == 1.0

    @pytest.mark.parametrize("value", ["", "0", "-5", "soon"])
    def test_malformed_usec_means_none(self, value: str) -> None:
        """Empty, zero, negative or non-numeric WATCHDOG_USEC disables the watchdog."""
        assert Notifier.from_env({"WATCHDOG_USEC": value}).watchdog_interval() is None


class TestWatchdogLoop:
    """The event-loop pinger."""

    @pytest.mark.anyio
    async def test_pings_at_half_the_interval(self, receiver: tuple[socket.socket, str]) -> None:
        """With a 0.2 s watchdog the pings are 0.1 s apart (0.2 s would mean no halving)."""
        sock, path = receiver
        notifier = _TimedNotifier(path, watchdog_usec=200_000)
        try:
            with anyio.move_on_after(1.0):
                await watchdog_loop(notifier)
        finally:
            notifier.close()
        datagrams = _drain(sock)
        assert datagrams == [["WATCHDOG=1"]] * len(notifier.sent_at)
        gaps = [b - a for a, b in zip(notifier.sent_at, notifier.sent_at[1:], strict=False)]
        assert len(gaps) >= 4
        assert 0.09 <= statistics.median(gaps) <= 0.15

    @pytest.mark.anyio
    async def test_unhealthy_daemon_stops_pinging(
        self, receiver: tuple[socket.socket, str]
    ) -> None:
        """While is_healthy() is false no ping is sent, so systemd restarts the daemon."""
        sock, path = receiver
        healthy = iter([True, False, False, False, False, False, False, False])
        notifier = Notifier(path, watchdog_usec=100_000)
        try:
            with anyio.move_on_after(0.3):
                await watchdog_loop(notifier, lambda: next(healthy, False))
        finally:
            notifier.close()
        assert _drain(sock) == [["WATCHDOG=1"]]

    @pytest.mark.anyio
    async def test_returns_at_once_without_watchdog(self) -> None:
        """No WATCHDOG_USEC: the loop ends immediately instead of sleeping forever."""
        with anyio.fail_after(1):
            await watchdog_loop(Notifier(None))
