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


async def init_cluster(config: Config, *, accept_config: bool = False) -> str:
    """
    Migrate the configured schema; the line(s) to print (they name the version).

    With *accept_config*, also record this config's pipelines as the config every
    worker must share (``cluster/pipeline_config.py``), refused while a worker is alive.
    """
    import os
    import socket

    from batchd.connectors._pg import close_quietly
    from batchd.daemon.cluster.migrations import migrate
    from batchd.daemon.cluster.pipeline_config import accept
    from batchd.daemon.store.cluster_worker import pipeline_fields

    conn, sql = await connect_cluster(config, "cluster-init")
    changed: list[str] = []
    try:
        before, after = await migrate(conn, sql)
        if accept_config:
            changed = await accept(conn, sql, pipeline_fields(config),
                                   recorded_by=f"{socket.gethostname()}:{os.getpid()} "
                                               "(cluster init --accept-config)",
                                   grace=config.cluster.takeover_grace, where=str(config.path))
    except SchemaVersionError as exc:
        raise located(config, exc, "schema") from None
    finally:
        await close_quietly(conn)
    target = describe_target(config)
    if before is None:
        line = f"created cluster schema {sql.schema!r} at version {after} in {target}"
    elif before == after:
        line = (f"cluster schema {sql.schema!r} in {target} is already at version {after}; "
                "nothing to do")
    else:
        line = (f"upgraded cluster schema {sql.schema!r} in {target} from version {before} "
                f"to {after}")
    if accept_config:
        names = ", ".join(repr(p.name) for p in config.pipelines if p.name in changed)
        line += (f"\naccepted the config of pipelines {names} for every worker" if changed
                 else "\nthe recorded pipeline config is already this config's")
    return line
