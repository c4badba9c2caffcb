"""
What the Kafka source and sink share: the client options (addresses, security,
TLS files), the aiokafka client settings built from them, and sorting client
errors into the engine's retriable and fatal kinds.

Both plugins read every option in their factory with :class:`batchd.Options` (no
I/O there), so a typo in ``pipeline.toml`` is reported at load time naming the
option, not as a confusing broker error minutes later. Every string option may be
``"env:NAME"``, read from the environment when the pipeline is loaded.
"""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from batchd.plugins.contract import PluginContext
from batchd.plugins.errors import BatchdError, ConfigError, FatalError, RetriableError
from batchd.plugins.options import Options

__all__ = (
    "SECURITY_OPTIONS",
    "build_ssl",
    "client_settings",
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
_SECRETS = ("sasl_plain_password",)
#: Paths that build an SSL context at start (relative to the config file).
_SSL_FILES: tuple[str, ...] = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")
_SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")


def owner_name(kind: str, context: PluginContext) -> str:
    """How messages name the connector, e.g. ``pipeline 'x' kafka source``."""
    return f"pipeline {context.pipeline!r} kafka {kind}"


def client_settings(opts: Options, context: PluginContext) -> dict[str, Any]:
    """
    The aiokafka keyword arguments common to consumer and producer.

    Bootstrap addresses may be a string (``"a:9092,b:9092"``), a list, or
    ``env:VAR``. The SSL context is built later, at start, because it reads
    files; here only the paths are checked for type and resolved.
    """
    servers: list[str] = opts.strings("bootstrap_servers", single=True, env=True)
    addresses = [part.strip() for item in servers for part in item.split(",") if part.strip()]
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise opts.error("bootstrap_servers", f"must list host:port addresses, got "
                                                  f"{address!r}")
    settings: dict[str, Any] = {
        "bootstrap_servers": addresses,
        "client_id": f"batchd-{context.pipeline}",
    }
    for option in SECURITY_OPTIONS:
        if option in _SECRETS:
            value = opts.secret(option, None)
        else:
            value = opts.text(option, None, env=True)
        if value is not None:
            settings[option] = value
    protocol = settings.get("security_protocol")
    if protocol is not None and protocol not in _SECURITY_PROTOCOLS:
        raise opts.error("security_protocol", f"must be one of {', '.join(_SECURITY_PROTOCOLS)}"
                                              f", got {protocol!r}")
    for option in _SSL_FILES:
        value = opts.text(option, None, env=True)
        if value is not None:
            settings[option] = str(context.resolve_path(value))
    return settings


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
    text = str(exc)
    # aiokafka's errors already start with their class name ("KafkaConnectionError: ...")
    named = text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"
    message = f"{owner}: {doing} failed: {named}"
    if isinstance(exc, KafkaConnectionError | KafkaTimeoutError | OSError | TimeoutError):
        return RetriableError(message)
    if isinstance(exc, KafkaError) and exc.retriable:
        return RetriableError(message)
    return FatalError(message)
