"""
Cluster mode's PostgreSQL store: several daemons sharing pipelines through one database.

Groundwork for issue 15, not yet wired into the runtime: each module is one
concept and takes an asyncpg connection plus a :class:`Sql` (the schema the
tables live in), so ``PgStore`` (``daemon/store/postgres.py``) composes them
inside its own transactions. See docs/cluster.md for the protocol and what remains to wire.

=====================  ======================================================
``schema``             table DDL per version, the ``Sql`` qualifier, lock order
``migrations``         ``migrate`` (``batchd cluster init``), ``check`` at start
``workers``            register, heartbeat (DB clock), deregister, status
``deadline``           the local lease deadline (CLOCK_BOOTTIME), the last-byte gate
``leases``             chunk claims (SKIP LOCKED, epoch bump), release
``shards``             intake shard leases, sealed floor, commit frontier
``transitions``        pure: a record's effect via ``ManifestState.apply``
``fencing``            fenced transitions: event + rows in one transaction
``event_log``          the log read back, replayed, compared to the rows
``reads``              rows read back as ChunkState / PipelineState
``create_slot``        creates serialised per workspace, pending intents
``limits``             budget and queue counters, holds, recompute
``spool_blocks``       spools as checksummed compressed blocks
``key_ledger``         the shared key ledger
=====================  ======================================================
"""

from __future__ import annotations

from batchd.daemon.cluster.errors import (
    ClusterError,
    FencedOut,
    IllegalTransition,
    LeaseExpired,
    LimitUndefined,
    SchemaVersionError,
    SpoolCorrupt,
    WorkerGone,
)
from batchd.daemon.cluster.schema import DEFAULT_SCHEMA, Sql

__all__ = (
    "DEFAULT_SCHEMA",
    "ClusterError",
    "FencedOut",
    "IllegalTransition",
    "LeaseExpired",
    "LimitUndefined",
    "SchemaVersionError",
    "SpoolCorrupt",
    "Sql",
    "WorkerGone",
)
