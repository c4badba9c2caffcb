"""
What the Kafka source and sink share: reading their options, resolving
``env:`` values, building the aiokafka client settings, and sorting client
errors into the engine's retriable and fatal kinds.

Both plugins validate every option in their factory (no I/O there), so a typo
in ``pipeline.toml`` is reported at load time naming the option, not as a
confusing broker error minutes later.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Collection, Mapping
from typing import Any

from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from batchd.plugins.contract import PluginContext
from batchd.plugins.errors import BatchdError, ConfigError, FatalError, RetriableError

__all__ = (
    "SECURITY_OPTIONS",
    "build_ssl",
    "check_known",
    "client_settings",
    "known_client_options",
    "option_bool",
    "option_float",
    "option_int",
    "option_str",
    "option_str_list",
    "owner_name",
    "translate_error",
)

#: Passed through to aiokafka unchanged (strings, ``env:VAR`` allowed).
SECURITY_OPTIONS: tuple[str, ...] = (
    "security_protocol",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
    "sasl_kerberos_service_name",
    "sasl_kerberos_domain_name",
)
#: Paths that build an SSL context at start (relative to the config file).
_SSL_FILES: tuple[str, ...] = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")


def owner_name(kind: str, context: PluginContext) -> str:
    """How messages name the config table at fault, e.g. ``pipeline 'x' kafka source``."""
    return f"pipeline {context.pipeline!r} kafka {kind}"


def _where(owner: str, option: str) -> str:
    return f"{owner}: option {option!r}"


def check_known(options: Mapping[str, Any], known: Collection[str], owner: str) -> None:
    """Reject unknown options so a misspelt one is not silently ignored."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(
            f"{owner}: unknown option(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(sorted(known))})"
        )


def _resolve_env(value: str, owner: str, option: str) -> str:
    """``env:NAME`` reads the variable, so secrets and addresses stay out of the file."""
    if not value.startswith("env:"):
        return value
    name = value[4:]
    resolved = os.environ.get(name)
    if not name or resolved is None or not resolved.strip():
        raise ConfigError(
            f"{_where(owner, option)} refers to environment variable {name!r}, which is not set"
        )
    return resolved.strip()


def option_str(
    options: Mapping[str, Any], option: str, owner: str, *, default: str | None = None
) -> str | None:
    """A non-empty string option (``env:VAR`` resolved), or ``default`` when absent."""
    value = options.get(option)
    if value is None:
        return default
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{_where(owner, option)} must be a non-empty string, got {value!r}")
    return _resolve_env(value.strip(), owner, option)


def option_str_list(options: Mapping[str, Any], option: str, owner: str) -> list[str] | None:
    """A list of non-empty strings (a single string counts as a list of one)."""
    value = options.get(option)
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, list)
        or not items
        or not all(isinstance(item, str) and item.strip() for item in items)
    ):
        raise ConfigError(
            f"{_where(owner, option)} must be a non-empty list of strings, got {value!r}"
        )
    return [_resolve_env(item.strip(), owner, option) for item in items]


def option_int(
    options: Mapping[str, Any], option: str, owner: str, *, default: int, minimum: int = 0
) -> int:
    """An integer option at least ``minimum``."""
    value = options.get(option, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{_where(owner, option)} must be an integer >= {minimum}, got {value!r}")
    return value


def option_float(options: Mapping[str, Any], option: str, owner: str, *, default: float) -> float:
    """A non-negative number option (seconds)."""
    value = options.get(option, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{_where(owner, option)} must be a number >= 0, got {value!r}")
    return float(value)


def option_bool(options: Mapping[str, Any], option: str, owner: str, *, default: bool) -> bool:
    """A true/false option (TOML booleans only, no truthy strings)."""
    value = options.get(option, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{_where(owner, option)} must be true or false, got {value!r}")
    return value


def client_settings(
    options: Mapping[str, Any], owner: str, context: PluginContext
) -> dict[str, Any]:
    """
    The aiokafka keyword arguments common to consumer and producer.

    Bootstrap addresses may be a string (``"a:9092,b:9092"``), a list, or
    ``env:VAR``. The SSL context is built later, at start, because it reads
    files; here only the paths are checked for type and resolved.
    """
    servers = option_str_list(options, "bootstrap_servers", owner)
    if servers is None:
        raise ConfigError(
            f'{_where(owner, "bootstrap_servers")} is required ("host:port", a list, or "env:VAR")'
        )
    addresses = [part.strip() for item in servers for part in item.split(",") if part.strip()]
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(
                f"{_where(owner, 'bootstrap_servers')} must list host:port "
                f"addresses, got {address!r}"
            )
    settings: dict[str, Any] = {
        "bootstrap_servers": addresses,
        "client_id": f"batchd-{context.pipeline}",
    }
    for option in SECURITY_OPTIONS:
        value = option_str(options, option, owner)
        if value is not None:
            settings[option] = value
    protocol = settings.get("security_protocol")
    if protocol is not None and protocol not in _SECURITY_PROTOCOLS:
        raise ConfigError(
            f"{_where(owner, 'security_protocol')} must be one of "
            f"{', '.join(_SECURITY_PROTOCOLS)}, got {protocol!r}"
        )
    for option in _SSL_FILES:
        value = option_str(options, option, owner)
        if value is not None:
            settings[option] = str(context.resolve_path(value))
    return settings


def known_client_options() -> tuple[str, ...]:
    """Every option :func:`client_settings` reads."""
    return ("bootstrap_servers", *SECURITY_OPTIONS, *_SSL_FILES)


def build_ssl(settings: dict[str, Any], owner: str) -> dict[str, Any]:
    """Replace the ``ssl_*`` paths with the ``ssl_context`` aiokafka wants (reads files)."""
    out = {key: value for key, value in settings.items() if key not in _SSL_FILES}
    paths = {key: settings[key] for key in _SSL_FILES if key in settings}
    if paths:
        from aiokafka.helpers import create_ssl_context

        try:
            out["ssl_context"] = create_ssl_context(
                cafile=paths.get("ssl_cafile"),
                certfile=paths.get("ssl_certfile"),
                keyfile=paths.get("ssl_keyfile"),
            )
        except (OSError, ssl.SSLError) as exc:
            named = ", ".join(f"{key} = {value!r}" for key, value in paths.items())
            raise ConfigError(f"{owner}: cannot load the TLS files ({named}): {exc}") from exc
    return out


def translate_error(exc: BaseException, owner: str, doing: str) -> BatchdError:
    """
    The engine's view of a client failure: retriable (back off and call
    again) or fatal (stop and alarm), with a message naming the connector.
    """
    message = f"{owner}: {doing} failed: {type(exc).__name__}: {exc}"
    if isinstance(exc, KafkaConnectionError | KafkaTimeoutError | OSError | TimeoutError):
        return RetriableError(message)
    if isinstance(exc, KafkaError) and exc.retriable:
        return RetriableError(message)
    return FatalError(message)
