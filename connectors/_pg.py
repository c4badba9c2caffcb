"""
What the PostgreSQL source and sink share: turning config values into safe SQL
identifiers, reading the DSN (``env:`` allowed), connecting with backoff, and keeping
the DSN's password out of every message. Their other options are read with
:class:`batchd.Options`.

Config is operator-owned but still goes through here, because an identifier
pasted into SQL text is the one place a typo becomes an injection, and a DSN
in an exception becomes a leaked password in journald.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import asyncpg
import structlog

from batchd.plugins.backoff import Backoff
from batchd.plugins.errors import ConfigError, FatalError, RetriableError
from batchd.plugins.options import Options

__all__ = (
    "CONNECTION_ERRORS",
    "Connection",
    "close_quietly",
    "connect",
    "connection_options",
    "describe",
    "is_connection_error",
    "quote_column",
    "quote_table",
    "redact",
    "resolve_dsn",
)

log = structlog.get_logger("batchd.postgres")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")

#: Errors that mean "the connection is gone", as opposed to "the SQL is wrong".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
)


def quote_column(opts: Options, key: str, value: Any) -> str:
    """A validated, double-quoted column name, or ConfigError naming the option."""
    if not isinstance(value, str) or not _IDENT.match(value):
        raise opts.error(key, f"must be a column name matching [A-Za-z_][A-Za-z0-9_$]*, "
                              f"got {value!r}")
    return f'"{value}"'


def quote_table(opts: Options, key: str, value: Any) -> str:
    """``table`` or ``schema.table``, each part validated and double-quoted."""
    parts = value.split(".") if isinstance(value, str) else []
    if not 1 <= len(parts) <= 2 or not all(_IDENT.match(part) for part in parts):
        raise opts.error(key, "must be a table name or schema.table, each part matching "
                              f"[A-Za-z_][A-Za-z0-9_$]*, got {value!r}")
    return ".".join(f'"{part}"' for part in parts)


@dataclass(frozen=True, slots=True)
class Connection:
    """Where and how patiently to connect: the options the source and the sink share."""

    dsn: str
    attempts: int
    timeout: float


def connection_options(opts: Options) -> Connection:
    """``dsn``, ``connect_attempts`` (default 3) and ``connect_timeout`` (default 10 s)."""
    return Connection(resolve_dsn(opts), opts.integer("connect_attempts", 3, min=1),
                      opts.duration("connect_timeout", 10.0))


def resolve_dsn(opts: Options) -> str:
    """
    The DSN from ``dsn``: ``"env:VAR"`` reads the environment so the secret
    never sits in the config file; anything else is taken literally.
    """
    value: str = opts.secret("dsn")
    _register_secret(value)
    return value


def _register_secret(dsn: str) -> None:
    """Tell the log pipeline (when the daemon's is loaded) to mask this DSN's password."""
    password = _password(dsn)
    if not password:
        return
    try:
        from batchd.daemon.ops._logging import register_secret
    except ImportError:  # used as a library without the daemon: messages are still redacted
        return
    register_secret(password)
    register_secret(unquote(password))


def _password(dsn: str) -> str | None:
    try:
        password = urlsplit(dsn).password
    except ValueError:
        password = None
    if password:
        return password
    match = re.search(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn)
    if match:
        return match.group(1).strip("'")
    return None


def redact(text: str, dsn: str | None = None) -> str:
    """
    ``text`` with any password removed: the one in ``dsn`` wherever it appears,
    plus anything shaped like ``scheme://user:secret@`` or ``password=secret``.
    """
    if dsn:
        password = _password(dsn)
        if password:
            text = text.replace(password, "***").replace(unquote(password), "***")
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text, flags=re.I)


def describe(dsn: str) -> str:
    """Where a DSN points, for messages: ``user@host:port/db`` with no password."""
    try:
        parts = urlsplit(dsn)
        if parts.scheme.startswith("postgres"):
            user = f"{parts.username}@" if parts.username else ""
            port = f":{parts.port}" if parts.port else ""
            return f"{user}{parts.hostname or 'localhost'}{port}{parts.path}"
    except ValueError:
        pass
    return redact(dsn, dsn)


def is_connection_error(exc: BaseException, conn: asyncpg.Connection | None = None) -> bool:
    """True when ``exc`` means the connection is unusable rather than the SQL wrong."""
    if isinstance(exc, CONNECTION_ERRORS):
        return True
    if isinstance(exc, asyncpg.InternalClientError):
        # A backend terminated between two statements leaves asyncpg's protocol in a
        # state it cannot leave ("another operation is in progress", asyncpg#1069).
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        return conn is None or conn.is_closed()
    return False


async def connect(
    dsn: str,
    *,
    owner: str,
    application_name: str,
    attempts: int,
    connect_timeout: float,
    read_only: bool = False,
) -> asyncpg.Connection:
    """
    A connection, retried with jittered exponential backoff (0.2 s doubling to 5 s).

    Unreachable server after ``attempts`` tries: :class:`RetriableError` (the
    engine backs off further). Wrong password, missing database or a malformed
    DSN: :class:`FatalError`/:class:`ConfigError`, because retrying cannot fix
    them. Every message is redacted and the original exception is not chained,
    since its text is asyncpg's and may echo the DSN.
    """
    settings = {"application_name": application_name[:63]}
    if read_only:
        settings["default_transaction_read_only"] = "on"
    backoff = Backoff(0.2, 5.0)
    last = ""
    for attempt in range(1, attempts + 1):
        try:
            return await asyncpg.connect(dsn, timeout=connect_timeout, server_settings=settings)
        except (asyncpg.InvalidAuthorizationSpecificationError,
                asyncpg.InvalidCatalogNameError) as exc:
            message = f"{owner}: cannot connect to {describe(dsn)}: {redact(str(exc), dsn)}"
            raise FatalError(message) from None
        except (ValueError, asyncpg.ClientConfigurationError) as exc:
            message = f"{owner}: option 'dsn' is not a valid DSN: {redact(str(exc), dsn)}"
            raise ConfigError(message) from None
        except Exception as exc:
            if not is_connection_error(exc):
                raise RetriableError(
                    f"{owner}: cannot connect to {describe(dsn)}: "
                    f"{type(exc).__name__}: {redact(str(exc), dsn)}"
                ) from None
            last = f"{type(exc).__name__}: {redact(str(exc), dsn)}"
            log.warning("postgres connect failed", owner=owner, target=describe(dsn),
                        attempt=attempt, error=last)
        if attempt < attempts:
            await anyio.sleep(backoff.next_delay())
    raise RetriableError(
        f"{owner}: cannot connect to {describe(dsn)} after {attempts} attempts: {last}"
    ) from None


async def close_quietly(conn: asyncpg.Connection | None) -> None:
    """Close ``conn`` without raising; a dead socket is simply dropped."""
    if conn is None or conn.is_closed():
        return
    try:
        with anyio.fail_after(2):
            await conn.close()
    except Exception:
        conn.terminate()
