"""
``batchd cluster init CONFIG``: create or upgrade the cluster's schema.

Safe to run again and from several machines at once: ``migrations.migrate``
applies only the versions above the recorded one, in one transaction under an
advisory lock on the schema name. A schema newer than this batchd is refused
(exit 2) naming both versions, and nothing is changed: an older batchd must
not touch a cluster that newer ones run.
"""

from __future__ import annotations

from batchd.daemon.cluster.errors import SchemaVersionError
from batchd.daemon.commands.cluster_connect import connect_cluster, describe_target, located
from batchd.daemon.config import Config

__all__ = ("init_cluster",)


async def init_cluster(config: Config) -> str:
    """Migrate the configured schema; the line to print (it names the version)."""
    from batchd.connectors._pg import close_quietly
    from batchd.daemon.cluster.migrations import migrate

    conn, sql = await connect_cluster(config, "cluster-init")
    try:
        before, after = await migrate(conn, sql)
    except SchemaVersionError as exc:
        raise located(config, exc, "schema") from None
    finally:
        await close_quietly(conn)
    target = describe_target(config)
    if before is None:
        return f"created cluster schema {sql.schema!r} at version {after} in {target}"
    if before == after:
        return (f"cluster schema {sql.schema!r} in {target} is already at version {after}; "
                "nothing to do")
    return f"upgraded cluster schema {sql.schema!r} in {target} from version {before} to {after}"
