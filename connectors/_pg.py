"""
What the PostgreSQL source and sink share: turning config values into safe SQL
identifiers, resolving ``env:`` DSNs, connecting with backoff, and keeping the
DSN's password out of every message.

Config is operator-owned but still goes through here, because an identifier
pasted into SQL text is the one place a typo becomes an injection, and a DSN
in an exception becomes a leaked password in journald.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import asyncpg
import structlog

from batchd.daemon.durations import parse_duration
from batchd.plugins.errors import ConfigError, FatalError, RetriableError

__all__ = (
    "CONNECTION_ERRORS",
    "close_quietly",
    "connect",
    "describe",
    "is_connection_error",
    "option_bool",
    "option_int",
    "option_seconds",
    "option_str",
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


def _where(owner: str, option: str) -> str:
    return f"{owner}: option {option!r}"


def quote_column(value: Any, *, owner: str, option: str) -> str:
    """A validated, double-quoted column name, or ConfigError naming the option."""
    if not isinstance(value, str) or not _IDENT.match(value):
        raise ConfigError(
            f"{_where(owner, option)} must be a column name matching "
            f"[A-Za-z_][A-Za-z0-9_$]*, got {value!r}"
        )
    return f'"{value}"'


def quote_table(value: Any, *, owner: str, option: str) -> str:
    """``table`` or ``schema.table``, each part validated and double-quoted."""
    parts = value.split(".") if isinstance(value, str) else []
    if not 1 <= len(parts) <= 2 or not all(_IDENT.match(part) for part in parts):
        raise ConfigError(
            f"{_where(owner, option)} must be a table name or schema.table, each part "
            f"matching [A-Za-z_][A-Za-z0-9_$]*, got {value!r}"
        )
    return ".".join(f'"{part}"' for part in parts)


def option_str(options: Mapping[str, Any], name: str, *, owner: str, default: Any = ...) -> Any:
    """A non-empty string option (``default=...`` means required)."""
    if name not in options:
        if default is ...:
            raise ConfigError(f"{_where(owner, name)} is required")
        return default
    value = options[name]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{_where(owner, name)} must be a non-empty string, got {value!r}")
    return value


def option_int(options: Mapping[str, Any], name: str, *, owner: str, default: int,
               minimum: int = 1) -> int:
    """An integer option of at least ``minimum``."""
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{_where(owner, name)} must be an integer >= {minimum}, got {value!r}")
    return value


def option_bool(options: Mapping[str, Any], name: str, *, owner: str, default: bool) -> bool:
    """A true/false option."""
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{_where(owner, name)} must be true or false, got {value!r}")
    return value


def option_seconds(options: Mapping[str, Any], name: str, *, owner: str, default: float) -> float:
    """Seconds as a number or a duration string like ``"5s"``, ``"500ms"``, ``"2m"``."""
    value = options.get(name, default)
    try:
        if not isinstance(value, str | int | float):
            raise ValueError(value)
        return parse_duration(value)
    except ValueError:
        raise ConfigError(
            f"{_where(owner, name)} must be seconds (5) or a duration ('5s', '500ms', '2m'), "
            f"got {value!r}"
        ) from None


def resolve_dsn(options: Mapping[str, Any], *, owner: str) -> str:
    """
    The DSN from ``dsn``: ``"env:VAR"`` reads the environment so the secret
    never sits in the config file; anything else is taken literally.
    """
    value = option_str(options, "dsn", owner=owner)
    if value.startswith("env:"):
        var = value[4:].strip()
        dsn = os.environ.get(var, "")
        if not var or not dsn.strip():
            raise ConfigError(
                f"{_where(owner, 'dsn')} names environment variable {var!r}, which is not set"
            )
        value = dsn.strip()
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
    attempts: int = 3,
    connect_timeout: float = 10.0,
    read_only: bool = False,
) -> asyncpg.Connection:
    """
    A connection, retried with exponential backoff.

    Unreachable server after ``attempts`` tries: :class:`RetriableError` (the
    engine backs off further). Wrong password, missing database or a malformed
    DSN: :class:`FatalError`/:class:`ConfigError`, because retrying cannot fix
    them. Every message is redacted and the original exception is not chained,
    since its text is asyncpg's and may echo the DSN.
    """
    settings = {"application_name": application_name[:63]}
    if read_only:
        settings["default_transaction_read_only"] = "on"
    delay = 0.2
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
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)
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
