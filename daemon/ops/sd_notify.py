"""
Talk to systemd's service manager over ``$NOTIFY_SOCKET`` (the ``sd_notify(3)`` protocol).

The protocol is one datagram of ``KEY=value`` lines on an AF_UNIX socket, so it is written
here in a few lines instead of depending on the ``systemd`` C bindings, which need
libsystemd headers to build and are absent from most virtualenvs. Outside systemd
(``batchd run`` in a terminal, tests) :meth:`Notifier.from_env` returns a notifier that
does nothing, so the engine calls it unconditionally.

Sends never raise and never block: a lost notification is logged by the caller at most,
and must not take the daemon down or stall its event loop.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

import anyio

__all__ = ("Notifier", "watchdog_loop")


class Notifier:
    """
    Sends state changes to systemd: ready, reloading, stopping, status text, watchdog pings.

    Args:
        address: The notify socket: a filesystem path, or ``@name`` for an abstract socket.
            ``None`` makes every call a no-op returning ``False``.
        watchdog_usec: ``$WATCHDOG_USEC`` as read at start-up, if any.
        watchdog_pid: ``$WATCHDOG_PID`` as read at start-up, if any; the watchdog is ours
            only when it names this process.

    .. versionadded:: 0.1
    """

    __slots__ = ("_address", "_socket", "_watchdog_pid", "_watchdog_usec")

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        self._address = _socket_address(address) if address else None
        self._watchdog_usec = watchdog_usec
        self._watchdog_pid = watchdog_pid
        self._socket: socket.socket | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """
        Build a notifier from ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``.

        Malformed watchdog variables disable the watchdog rather than failing start-up:
        systemd wrote them, not the operator, and the daemon is still useful without pings.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not (address.startswith(("/", "@"))):
            address = None  # vsock: and other transports are not ours to speak
        return cls(
            address,
            watchdog_usec=_positive_int(env.get("WATCHDOG_USEC")),
            watchdog_pid=_positive_int(env.get("WATCHDOG_PID")),
        )

    @property
    def enabled(self) -> bool:
        """Whether a notify socket is configured (we run under ``Type=notify``)."""
        return self._address is not None

    def notify(self, **fields: object) -> bool:
        """
        Send one datagram of ``KEY=value`` lines; keys are upper-cased.

        Returns ``True`` when the datagram was handed to the kernel. Newlines in values are
        flattened to spaces because the protocol is line-based.
        """
        if self._address is None or not fields:
            return False
        payload = "".join(
            f"{key.upper()}={_flatten(value)}\n" for key, value in fields.items()
        ).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)
            self._socket.sendto(payload, self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up (recovery included) is done: ``READY=1``."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """Set the free-form line ``systemctl status`` shows (in-flight counts)."""
        return self.notify(STATUS=text)

    def stopping(self, status: str | None = None) -> bool:
        """Announce a clean shutdown has begun: ``STOPPING=1``."""
        if status is None:
            return self.notify(STOPPING=1)
        return self.notify(STOPPING=1, STATUS=status)

    def reloading(self) -> bool:
        """
        Announce a config reload: ``RELOADING=1`` with ``MONOTONIC_USEC``.

        Send :meth:`ready` when the reload is done. systemd ≥ 253 matches the timestamp to
        the reload it requested; older versions ignore it.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def watchdog(self) -> bool:
        """Ping the watchdog: ``WATCHDOG=1``."""
        return self.notify(WATCHDOG=1)

    def extend_timeout(self, seconds: float) -> bool:
        """
        Ask for ``seconds`` more before systemd gives up on a slow start or stop.

        Recovery of a long manifest or a drain at shutdown may outlast the unit's timeouts;
        send this periodically while such work is making progress.
        """
        return self.notify(EXTEND_TIMEOUT_USEC=int(seconds * 1_000_000))

    def watchdog_interval(self) -> float | None:
        """
        The watchdog timeout in seconds, or ``None`` when no watchdog is ours.

        The engine pings at half this interval so one late tick is not fatal.
        """
        if not self._watchdog_usec:
            return None
        if self._watchdog_pid is not None and self._watchdog_pid != os.getpid():
            return None
        return self._watchdog_usec / 1_000_000

    def close(self) -> None:
        """Close the socket; later calls reopen it."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None


async def watchdog_loop(
    notifier: Notifier, is_healthy: Callable[[], bool] | None = None
) -> None:
    """
    Ping the watchdog every half interval for as long as the daemon is healthy.

    Runs in the engine's task group and returns at once when there is no watchdog. While
    ``is_healthy()`` is false it stays silent, so systemd kills and restarts a daemon that
    is alive but stuck; a wedged event loop stops pinging by itself.

    Args:
        notifier: Where the pings go.
        is_healthy: Checked before each ping; ``None`` means always healthy.
    """
    interval = notifier.watchdog_interval()
    if interval is None:
        return
    period = interval / 2
    while True:
        if is_healthy is None or is_healthy():
            notifier.watchdog()
        await anyio.sleep(period)


def _socket_address(address: str) -> str:
    # Linux abstract sockets are spelt "@name" in the environment and "\0name" on the wire.
    return "\0" + address[1:] if address.startswith("@") else address


def _positive_int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        return None
    return number if number > 0 else None


def _flatten(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value).replace("\r", " ").replace("\n", " ")
