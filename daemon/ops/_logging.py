"""
One logging set-up for the daemon: JSON lines for journald, a readable console for people.

Under systemd stdout is a pipe to journald, so each event is one JSON object per line
(``journalctl -u batchd -o cat | jq``); in a terminal it is structlog's console renderer.
Library loggers (aiokafka, asyncpg, httpx) go through the same processors, at WARNING,
so their lines look like ours and are redacted like ours.

Redaction is the last processor before rendering and sees every value, the message and
the formatted traceback, because a secret leaks most often through text nobody meant to
log: a DSN inside a connection error, an API key echoed in an exception.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import urllib.parse
from collections.abc import Callable, MutableMapping
from typing import Any, TextIO, cast

import orjson
import structlog

from batchd.daemon.config import LOG_LEVELS

__all__ = ("MASK", "configure_logging", "redact_secrets", "redact_text", "register_secret")

MASK = "***"

LEVELS = LOG_LEVELS
LIBRARY_LEVEL = logging.WARNING

# Secrets shorter than this are not masked literally: masking every "a" in the logs
# because someone's password is "a" would make them useless. Patterns still apply.
MIN_SECRET_LENGTH = 4

_SENSITIVE_KEYS = frozenset(
    {
        "api_key",
        "x_api_key",
        "anthropic_api_key",
        "authorization",
        "proxy_authorization",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "token",
        "access_token",
        "refresh_token",
        "cookie",
        "set_cookie",
        "dsn_password",
    }
)
_SENSITIVE_SUFFIXES = ("_password", "_secret", "_api_key", "_token")

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host  ->  scheme://user:***@host
    (re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*):[^@/\s]+@"), rf"\1:{MASK}@"),
    # libpq keyword DSNs and query strings: password=secret, password='a b'
    (
        re.compile(r"(?i)\b(password|passwd|pwd)(\s*=\s*)('[^']*'|[^\s&;,]+)"),
        rf"\1\2{MASK}",
    ),
    (re.compile(r"sk-ant-[A-Za-z0-9_\-]+"), f"sk-ant-{MASK}"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]{8,}"), rf"\1 {MASK}"),
)

_OUR_HANDLER = "_batchd_handler"
_JSON_HEAD = ("timestamp", "level", "event")

_secrets_lock = threading.Lock()
_secrets: set[str] = set()
_secret_pattern: re.Pattern[str] | None = None


def register_secret(value: str) -> None:
    """
    Mask ``value`` wherever it appears in any later log line.

    The engine registers what it loads: the API key, DSN passwords, broker credentials.
    The URL-encoded spelling is registered too, since a password with ``@`` or ``/``
    appears that way inside a DSN.

    .. versionadded:: 0.1
    """
    global _secret_pattern
    candidates = {value, urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value)}
    with _secrets_lock:
        _secrets.update(c for c in candidates if len(c) >= MIN_SECRET_LENGTH)
        if _secrets:
            alternatives = sorted(_secrets, key=len, reverse=True)
            _secret_pattern = re.compile("|".join(re.escape(s) for s in alternatives))


def _redact_text(text: str) -> str:
    pattern = _secret_pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    for regex, replacement in _PATTERNS:
        text = regex.sub(replacement, text)
    return text


def redact_text(text: str) -> str:
    """``text`` with registered secrets and secret-shaped substrings masked (the dashboard)."""
    return _redact_text(text)


def _is_sensitive_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    normalised = key.lower().replace("-", "_")
    return normalised in _SENSITIVE_KEYS or normalised.endswith(_SENSITIVE_SUFFIXES)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return _redact_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {
            k: (MASK if _is_sensitive_key(k) and v else _redact_value(v)) for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    # Anything else (exceptions, paths, models) would be str()'d by the renderer anyway;
    # doing it here means the text is redacted before it is rendered.
    return _redact_text(str(value))


def redact_secrets(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """
    Processor: mask secrets by key name, by pattern and by registered literal.

    Keys such as ``api_key``, ``authorization`` or ``*_password`` are replaced whole;
    every other string (nested ones included) has URL passwords, ``password=`` pairs,
    ``sk-ant-…`` keys, bearer tokens and registered secrets masked in place.
    """
    for key, value in list(event_dict.items()):
        if key == "exc_info":
            continue  # rendered (and then redacted) by format_exc_info first
        if _is_sensitive_key(key) and value:
            event_dict[key] = MASK
        else:
            event_dict[key] = _redact_value(value)
    return event_dict


def _render_json(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
    # When, how bad and what first, so a human scanning raw journal lines can read them.
    head = {k: event_dict.pop(k) for k in _JSON_HEAD if k in event_dict}
    return orjson.dumps({**head, **event_dict}, default=str).decode()


def _shared_processors() -> list[Callable[..., Any]]:
    return [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]


def _renderer(json: bool, stream: TextIO) -> Callable[..., Any]:
    if json:
        return _render_json
    colors = bool(getattr(stream, "isatty", lambda: False)())
    return structlog.dev.ConsoleRenderer(colors=colors)


class _CurrentStdout:
    """
    ``sys.stdout`` as it is at each write, not as it was at set-up.

    The CLI configures logging once per process, but an embedding program or a test
    harness may swap ``sys.stdout`` afterwards (and close the old one); binding the
    object would then write into a closed file.
    """

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def isatty(self) -> bool:
        return bool(getattr(sys.stdout, "isatty", lambda: False)())


def configure_logging(
    level: str = "info", json: bool | None = None, stream: TextIO | None = None
) -> None:
    """
    Set up structlog and the stdlib root logger to write one redacted line per event.

    Safe to call again (on SIGHUP, in tests): it replaces the previous set-up.

    Args:
        level: ``debug``, ``info``, ``warning``, ``error`` or ``critical`` for batchd's
            own events; library loggers stay at WARNING.
        json: JSON lines if true, console if false, and if ``None`` JSON unless ``stream``
            is a terminal.
        stream: Where lines go; stdout by default (journald under systemd).

    Raises:
        ValueError: ``level`` is not one of the names above.

    .. versionadded:: 0.1
    """
    try:
        numeric_level = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"log level {level!r} is not one of {', '.join(LEVELS)}"
        ) from None
    out: TextIO = cast(TextIO, _CurrentStdout()) if stream is None else stream
    if json is None:
        json = not bool(getattr(out, "isatty", lambda: False)())
    renderer = _renderer(json, out)
    tail: list[Callable[..., Any]] = [
        structlog.processors.format_exc_info,
        redact_secrets,
        renderer,
    ]

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *_shared_processors(),
            structlog.processors.StackInfoRenderer(),
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *_shared_processors()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    setattr(handler, _OUR_HANDLER, True)
    root = logging.getLogger()
    # Only our own earlier handler is replaced: others (pytest's capture, an embedding
    # application's) are not ours to remove.
    for old in [h for h in root.handlers if getattr(h, _OUR_HANDLER, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LIBRARY_LEVEL)
