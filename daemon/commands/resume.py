"""
``batchd resume PIPELINE``: lift a pause whose cause the operator has fixed.

A pause for an account problem (a spend limit, billing, a revoked key) holds every
row until someone acts, and the daemon cannot tell when the cause is gone. The
command drops a request file in the state directory; a running daemon sees it
within a second and resumes that pipeline (the next create pauses it again if the
cause remains). A stopped daemon resumes every paused pipeline when it starts,
as SIGHUP (``systemctl reload``) does for a running one.

In cluster mode the pause is the cluster's, in its PostgreSQL store, and workers do not
lift it when they start (each would undo the others' pauses): the command records the
``pipeline_resumed`` itself, in the cluster's event log, which every worker reads within
one poll. A budget pause is left, as on one daemon: it lifts with a higher
``budget_usd`` (docs/cluster.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from batchd.daemon.config import Config
from batchd.daemon.wal.manifest import MANIFEST_NAME, replay
from batchd.daemon.wal.records import PauseKind

__all__ = ("ClusterResume", "request_resume", "resume_in_cluster", "resume_request_path")


def resume_request_path(state_dir: Path, pipeline: str) -> Path:
    return state_dir / "resume-requests" / pipeline


def request_resume(config: Config, pipeline: str) -> tuple[Path | None, str | None, str | None]:
    """Write the request if the pipeline is paused; returns it, the pause's reason and kind."""
    config.pipeline(pipeline)  # raises ConfigError naming the pipelines
    reason = kind = None
    manifest = config.state_dir / MANIFEST_NAME
    if manifest.exists():
        state, _ = replay(manifest, truncate=False)
        found = state.pipelines.get(pipeline)
        if found is not None:
            reason, kind = found.paused, found.pause_kind
    if reason is None:
        return None, None, None
    path = resume_request_path(config.state_dir, pipeline)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("resume\n", encoding="utf-8")
    os.replace(tmp, path)
    return path, reason, kind


@dataclass(frozen=True)
class ClusterResume:
    """What ``batchd resume`` found in the cluster, and whether it lifted the pause."""

    reason: str | None  # None: the pipeline was not paused
    kind: str | None
    resumed: bool


async def resume_in_cluster(config: Config, pipeline: str) -> ClusterResume:
    """
    Lift a cluster pipeline's pause (not a budget pause) in the cluster's store.

    Raises:
        ConfigError: an unknown pipeline, the cluster unreachable by its config, or its
            schema missing or at another version (each naming the config's field).
        RetriableError: the database did not answer.
    """
    from batchd.connectors._pg import close_quietly
    from batchd.daemon.cluster.fencing import record_pipeline_event
    from batchd.daemon.commands.cluster_connect import check_schema, connect_cluster

    config.pipeline(pipeline)  # raises ConfigError naming the pipelines
    conn, sql = await connect_cluster(config, "resume")
    try:
        await check_schema(conn, sql, config)
        row = await conn.fetchrow(
            sql("SELECT paused, pause_kind FROM {s}.pipeline WHERE name = $1"), pipeline)
        if row is None or row["paused"] is None:
            return ClusterResume(None, None, False)
        reason, kind = row["paused"], row["pause_kind"]
        if kind == PauseKind.BUDGET:
            return ClusterResume(reason, kind, False)
        # The record checks the row again under its lock: a pause lifted meanwhile is a no-op.
        applied = await record_pipeline_event(conn, sql, "pipeline_resumed",
                                              {"pipeline": pipeline})
        return ClusterResume(reason, kind, not applied.noop)
    finally:
        await close_quietly(conn)
