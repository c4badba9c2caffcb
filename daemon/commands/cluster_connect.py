"""
Connecting a ``batchd cluster`` command (or ``validate --connect``) to the cluster's database.

asyncpg is imported here, inside the call, and nowhere a light command reaches:
``batchd --help`` and ``batchd status`` must not pay for the driver. Every
message names the config file, ``[cluster]`` and ``dsn`` and shows where the
DSN points without its password (``connectors/_pg.py``'s ``describe``/``redact``).
"""

from __future__ import annotations

from typing import Any

from batchd.daemon.cluster.schema import Sql
from batchd.daemon.config import Config
from batchd.plugins.errors import ConfigError, RetriableError

__all__ = ("CONNECT_TIMEOUT", "check_schema", "cluster_dsn", "connect_cluster",
           "describe_target", "located", "where")

CONNECT_TIMEOUT = 10.0


def where(config: Config, key: str = "dsn") -> str:
    """``file: [cluster]: key``, as every config message starts."""
    return f"{config.path}: [cluster]: {key}"


def located(config: Config, error: ConfigError, key: str) -> ConfigError:
    """*error* as a ``[cluster]`` mistake: its message starts with ``file: [cluster]: key``."""
    message = str(error)
    if not message.startswith(str(config.path)):
        message = f"{where(config, key)}: {message}"
    found = type(error)(message)
    found.file, found.table, found.key = str(config.path), "[cluster]", key
    return found


def cluster_dsn(config: Config) -> str:
    """The configured DSN, or a ConfigError naming the key when there is none."""
    if config.cluster.dsn is None:
        error = ConfigError(f"{where(config)}: is required for the cluster's database "
                            '(store = "postgres", dsn = "env:NAME")')
        error.file, error.table, error.key = str(config.path), "[cluster]", "dsn"
        raise error
    return config.cluster.dsn


def describe_target(config: Config) -> str:
    """Where the DSN points (``user@host:port/db``), never its password."""
    from batchd.connectors._pg import describe

    return describe(cluster_dsn(config))


async def connect_cluster(config: Config, purpose: str) -> tuple[Any, Sql]:
    """
    One connection to the cluster's database (one attempt) and the schema's :class:`Sql`.

    Raises:
        ConfigError: no DSN, a malformed one, a refused login or a missing database
            (exit 2: the config must change), or asyncpg is not installed.
        RetriableError: the server did not answer (exit 1: try again later).

    Every message starts ``file: [cluster]: dsn`` and shows no password.
    """
    dsn = cluster_dsn(config)
    sql = Sql(config.cluster.schema)
    try:
        import asyncpg

        from batchd.connectors._pg import describe, is_connection_error, redact
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != "asyncpg":
            raise
        raise ConfigError("cluster mode needs asyncpg, which is not installed: "
                          "pip install 'batchd[postgres]'") from None
    target = f"{where(config)}: cannot connect to {describe(dsn)}"
    # One attempt and no log line (connectors/_pg.py's connect logs its retries, and a
    # command's stdout may be --json): the caller reports the one failure.
    try:
        conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT, server_settings={
            "application_name": f"batchd:{purpose}"[:63]})
    except (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidCatalogNameError,
            asyncpg.ClientConfigurationError, ValueError) as exc:
        # A refused login, a database that does not exist, a malformed DSN: the config's.
        raise located(config, ConfigError(f"{target}: {redact(str(exc), dsn)}"), "dsn") from None
    except Exception as exc:
        if not is_connection_error(exc):
            raise
        raise RetriableError(f"{target}: {type(exc).__name__}: {redact(str(exc), dsn)}") from None
    return conn, sql


async def check_schema(conn: Any, sql: Sql, config: Config) -> int:
    """
    The schema's version, if it is exactly this batchd's, as a worker requires at start.

    Raises:
        ConfigError: not initialised, older or newer, as a ``[cluster]: schema`` mistake.
    """
    from batchd.daemon.cluster import migrations
    from batchd.daemon.cluster.errors import SchemaVersionError

    try:
        return await migrations.check(conn, sql)
    except SchemaVersionError as exc:
        raise located(config, exc, "schema") from None
