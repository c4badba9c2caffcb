"""
Creating and upgrading the cluster schema, and refusing one this code cannot use.

``migrate`` is what ``batchd cluster init`` will run: it creates the schema if
missing and applies every version above the recorded one, all in one
transaction, so a failed upgrade leaves the previous version intact. Two workers
migrating at once are serialised by a transaction-scoped advisory lock keyed on
the schema name (held only for the migration, never across a crash).

``check`` is what a worker runs at start: the schema must be exactly the
version this code knows. Older means "run batchd cluster init"; newer means
this batchd is older than the cluster and must not touch it. Both name the two
versions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batchd.daemon.cluster.errors import SchemaVersionError
from batchd.daemon.cluster.schema import MIGRATIONS, Migration, Sql

__all__ = ("LATEST_VERSION", "check", "migrate", "version")

LATEST_VERSION = MIGRATIONS[-1].version

_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS {s}.schema_version (
    version integer PRIMARY KEY,
    description text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


async def version(conn: Any, sql: Sql) -> int | None:
    """The schema's recorded version, or None if the cluster was never initialised."""
    exists = await conn.fetchval(
        "SELECT to_regclass($1) IS NOT NULL", f'"{sql.schema}".schema_version'
    )
    if not exists:
        return None
    found: int | None = await conn.fetchval(sql("SELECT max(version) FROM {s}.schema_version"))
    return found


def _too_new(sql: Sql, found: int, known: int) -> SchemaVersionError:
    return SchemaVersionError(
        f"cluster schema {sql.schema!r} is at version {found}, newer than this batchd knows "
        f"(version {known}); upgrade batchd on this machine before it joins the cluster"
    )


async def migrate(
    conn: Any, sql: Sql, *, migrations: Sequence[Migration] = MIGRATIONS
) -> tuple[int | None, int]:
    """
    Bring the schema up to the newest of *migrations*; returns (before, after).

    Args:
        migrations: the versions to know, in order (tests pass a longer list to
            exercise an upgrade).

    Raises:
        SchemaVersionError: the schema is newer than the newest migration.
    """
    known = migrations[-1].version
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"batchd:{sql.schema}")
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{sql.schema}"')
        await conn.execute(sql(_VERSION_TABLE))
        before: int | None = await conn.fetchval(
            sql("SELECT max(version) FROM {s}.schema_version")
        )
        if before is not None and before > known:
            raise _too_new(sql, before, known)
        for migration in migrations:
            if before is not None and migration.version <= before:
                continue
            for statement in migration.statements:
                await conn.execute(sql(statement))
            await conn.execute(
                sql("INSERT INTO {s}.schema_version (version, description) VALUES ($1, $2)"),
                migration.version,
                migration.description,
            )
    return before, known


async def check(conn: Any, sql: Sql, *, known: int = LATEST_VERSION) -> int:
    """
    The schema's version, if it is exactly the one this code uses.

    Raises:
        SchemaVersionError: not initialised, older (run ``batchd cluster init``)
            or newer (upgrade batchd), naming both versions.
    """
    found = await version(conn, sql)
    if found is None:
        raise SchemaVersionError(
            f"cluster schema {sql.schema!r} is not initialised (this batchd uses version "
            f"{known}); run: batchd cluster init"
        )
    if found > known:
        raise _too_new(sql, found, known)
    if found < known:
        raise SchemaVersionError(
            f"cluster schema {sql.schema!r} is at version {found}, this batchd needs version "
            f"{known}; run: batchd cluster init"
        )
    return found
