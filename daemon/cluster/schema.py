"""
Where the cluster's tables live and what they hold: the PostgreSQL schema name
and the DDL of every schema version.

All objects live in one PostgreSQL schema (``batchd`` unless configured), so a
test, or two clusters sharing a database, stay apart. Statements are written with
``{s}`` for the schema and qualified by :class:`Sql`; names are never taken from
a search_path, which a connection pooler may not keep.

Lock order (every transaction that takes more than one row lock follows it, so
two workers never deadlock): shard row → chunk rows in ascending id → pipeline
row → limit counters in ascending scope → create slot → worker row.
"""

from __future__ import annotations

import re

from batchd.plugins.errors import ConfigError

__all__ = ("DEFAULT_SCHEMA", "MIGRATIONS", "Migration", "Sql")

DEFAULT_SCHEMA = "batchd"

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class Sql:
    """
    Statements qualified for one cluster schema, cached (each is built once).

    Args:
        schema: a plain lowercase identifier; anything else is a config error
            naming it (it is interpolated into SQL, so it is checked, not quoted
            blindly).
    """

    __slots__ = ("_cache", "_prefix", "schema")

    def __init__(self, schema: str = DEFAULT_SCHEMA) -> None:
        if not isinstance(schema, str) or not _IDENTIFIER.fullmatch(schema):
            raise ConfigError(
                f"cluster schema {schema!r} is not a plain lowercase identifier "
                "(letters, digits, underscore; at most 63)"
            )
        self.schema = schema
        self._prefix = f'"{schema}"'
        self._cache: dict[str, str] = {}

    def __call__(self, template: str) -> str:
        """The statement with every ``{s}`` replaced by the quoted schema name."""
        statement = self._cache.get(template)
        if statement is None:
            statement = self._cache[template] = template.replace("{s}", self._prefix)
        return statement

    def __repr__(self) -> str:
        return f"Sql({self.schema!r})"


class Migration:
    """One schema version: what it adds and the statements that add it."""

    __slots__ = ("description", "statements", "version")

    def __init__(self, version: int, description: str, statements: tuple[str, ...]) -> None:
        self.version = version
        self.description = description
        self.statements = statements


# Stages as the manifest names them; 'retired' rows are kept (35 days by default)
# so every batch id a chunk ever had stays known to the UNIQUE index.
_STAGES = "'sealed','intent','submitted','ended','committed','source_committed','retired'"

_V1 = (
    """CREATE TABLE {s}.worker (
        worker_id text PRIMARY KEY,
        name text NOT NULL,
        host text NOT NULL,
        pid integer NOT NULL,
        lease_ttl interval NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now(),
        stopped_at timestamptz,
        fenced bigint NOT NULL DEFAULT 0
    )""",
    # Materialized PipelineState (daemon/wal/manifest_state.py), one column per field.
    """CREATE TABLE {s}.pipeline (
        name text PRIMARY KEY,
        last_sealed_seq bigint,
        last_sealed_position jsonb,
        next_chunk_no bigint NOT NULL DEFAULT 0,
        committed_seq bigint,
        committed_position jsonb,
        paused text,
        pause_kind text,
        requests_submitted bigint NOT NULL DEFAULT 0,
        batches_submitted bigint NOT NULL DEFAULT 0,
        succeeded bigint NOT NULL DEFAULT 0,
        truncated bigint NOT NULL DEFAULT 0,
        dead bigint NOT NULL DEFAULT 0,
        retried bigint NOT NULL DEFAULT 0,
        cost_usd double precision NOT NULL DEFAULT 0,
        input_tokens bigint NOT NULL DEFAULT 0,
        output_tokens bigint NOT NULL DEFAULT 0,
        unpriced bigint NOT NULL DEFAULT 0,
        resubmitted bigint NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE {s}.shard (
        pipeline text NOT NULL,
        shard text NOT NULL,
        owner text REFERENCES {s}.worker (worker_id) ON DELETE SET NULL,
        epoch bigint NOT NULL DEFAULT 0,
        acquired_at timestamptz,
        next_chunk_no bigint NOT NULL DEFAULT 0,
        sealed_seq bigint,
        sealed_position jsonb,
        committed_seq bigint,
        committed_position jsonb,
        PRIMARY KEY (pipeline, shard)
    )""",
    # Materialized ChunkState plus the lease (owner, epoch), the shard it was read
    # from, its family root, and the spool blocks its seal verified.
    f"""CREATE TABLE {{s}}.chunk (
        chunk text PRIMARY KEY,
        pipeline text NOT NULL,
        attempt integer NOT NULL,
        requests integer NOT NULL,
        bytes bigint NOT NULL,
        rejects integer NOT NULL,
        first_seq bigint,
        last_seq bigint,
        position jsonb,
        parent text,
        stage text NOT NULL CHECK (stage IN ({_STAGES})),
        covers_seq bigint,
        intent_at double precision,
        last_intent_at double precision,
        intent_count integer NOT NULL DEFAULT 0,
        batch_id text UNIQUE,
        created_at text,
        counts jsonb,
        succeeded bigint NOT NULL DEFAULT 0,
        truncated bigint NOT NULL DEFAULT 0,
        dead bigint NOT NULL DEFAULT 0,
        retried bigint NOT NULL DEFAULT 0,
        cost_usd double precision NOT NULL DEFAULT 0,
        input_tokens bigint NOT NULL DEFAULT 0,
        output_tokens bigint NOT NULL DEFAULT 0,
        retry_chunk text,
        shard text NOT NULL,
        root text NOT NULL,
        owner text REFERENCES {{s}}.worker (worker_id) ON DELETE SET NULL,
        epoch bigint NOT NULL DEFAULT 1,
        claimed_at timestamptz,
        sealed_event bigint NOT NULL,
        sealed_at timestamptz NOT NULL DEFAULT now(),
        retired_at timestamptz,
        spool_epoch bigint,
        spool_sha256 text,
        spool_blocks integer,
        spool_bytes bigint
    )""",
    "CREATE INDEX chunk_live ON {s}.chunk (pipeline, sealed_event) WHERE stage <> 'retired'",
    "CREATE INDEX chunk_owner ON {s}.chunk (owner) WHERE owner IS NOT NULL",
    "CREATE INDEX chunk_retired ON {s}.chunk (retired_at) WHERE stage = 'retired'",
    """CREATE TABLE {s}.chunk_range (
        chunk text PRIMARY KEY,
        pipeline text NOT NULL,
        shard text NOT NULL,
        first_seq bigint,
        last_seq bigint,
        position jsonb
    )""",
    "CREATE INDEX chunk_range_shard ON {s}.chunk_range (pipeline, shard, first_seq)",
    # The record log: every applied transition's record, unchanged, in commit order
    # per pipeline (each transition holds its pipeline's row lock when it takes a seq).
    """CREATE TABLE {s}.event (
        seq bigserial PRIMARY KEY,
        ts double precision NOT NULL,
        kind text NOT NULL,
        pipeline text,
        chunk text,
        worker text,
        fence text NOT NULL CHECK (fence IN ('chunk', 'shard', 'none')),
        epoch bigint,
        record jsonb NOT NULL
    )""",
    "CREATE INDEX event_chunk ON {s}.event (chunk, seq) WHERE chunk IS NOT NULL",
    """CREATE TABLE {s}.key_ledger (
        pipeline text NOT NULL,
        key text NOT NULL,
        shard text NOT NULL,
        chunk text NOT NULL,
        position bytea NOT NULL,
        PRIMARY KEY (pipeline, key)
    )""",
    """CREATE TABLE {s}.spool_block (
        chunk text NOT NULL,
        epoch bigint NOT NULL,
        n integer NOT NULL,
        codec text NOT NULL,
        raw_bytes integer NOT NULL,
        data bytea NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (chunk, epoch, n)
    )""",
    # Already compressed: PostgreSQL must not spend CPU compressing it again.
    "ALTER TABLE {s}.spool_block ALTER COLUMN data SET STORAGE EXTERNAL",
    """CREATE TABLE {s}.create_slot (
        workspace text PRIMARY KEY,
        holder text REFERENCES {s}.worker (worker_id) ON DELETE SET NULL,
        epoch bigint NOT NULL DEFAULT 0,
        taken_at timestamptz,
        pending_chunk text,
        pending_epoch bigint,
        pending_since timestamptz
    )""",
    """CREATE TABLE {s}.limit_counter (
        scope text PRIMARY KEY,
        cap numeric,
        reserved numeric NOT NULL DEFAULT 0 CHECK (reserved >= 0),
        spent numeric NOT NULL DEFAULT 0,
        external numeric NOT NULL DEFAULT 0,
        updated_at timestamptz NOT NULL DEFAULT now()
    )""",
    """CREATE TABLE {s}.limit_hold (
        scope text NOT NULL REFERENCES {s}.limit_counter (scope),
        holder text NOT NULL,
        amount numeric NOT NULL CHECK (amount >= 0),
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (holder, scope)
    )""",
    "CREATE INDEX limit_hold_scope ON {s}.limit_hold (scope)",
)

# A source read apart by several workers (a Kafka topic's partitions): each shard has
# its own read sequence, kept per shard in the pipeline row (PipelineState.shards, under
# the pipeline row's lock like every frontier), and chunk numbers are handed out per
# pipeline so that readers of different shards never make the same chunk id.
_V2 = (
    "ALTER TABLE {s}.pipeline ADD COLUMN shards jsonb NOT NULL DEFAULT '{}'::jsonb",
    """CREATE TABLE {s}.chunk_number (
        pipeline text PRIMARY KEY,
        next bigint NOT NULL
    )""",
)

# The pipeline config every worker of a pipeline must share (daemon/cluster/pipeline_config.py):
# the fields that change what is sent or how rows map to custom_ids and outcomes, recorded
# by the first worker (or ``batchd cluster init --accept-config``), compared by every later one.
_V3 = (
    """CREATE TABLE {s}.pipeline_config (
        pipeline text PRIMARY KEY,
        config_hash text NOT NULL,
        fields jsonb NOT NULL,
        recorded_by text NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now()
    )""",
)

# Which workers read a split pipeline's shards (a Kafka topic's partitions): a worker's
# fair share is the shard count over the live ones (workers that run other pipelines
# only are not counted, so no shard is left without a reader).
_V4 = (
    """CREATE TABLE {s}.shard_reader (
        pipeline text NOT NULL,
        worker_id text NOT NULL REFERENCES {s}.worker (worker_id) ON DELETE CASCADE,
        PRIMARY KEY (pipeline, worker_id)
    )""",
)

# The key ledger's retention (daemon/cluster/retention.py) deletes a retired chunk's keys
# by chunk: without this index each chunk would be a scan of the whole ledger.
_V5 = (
    "CREATE INDEX key_ledger_chunk ON {s}.key_ledger (chunk)",
)

# The key ledger made cheaper to write, which is most of what PostgreSQL does per row
# (docs/benchmarks.md §10). Keys compare bytewise ("C"): equality is all the ledger asks of
# them, and the database's own collation (C.UTF-8, en_US...) made every index step a
# strcoll. The (chunk) index goes: a retired chunk's keys are found through the chunk's key
# lists instead, one row per claim, written in the claim's own statement (a tenth of an
# index entry per key). Lists may name a key that another chunk took since (a dead reader's
# leftover): retention deletes a key only while it is still the listed chunk's.
_V6 = (
    """CREATE TABLE {s}.key_list (
        id bigserial PRIMARY KEY,
        pipeline text NOT NULL,
        chunk text NOT NULL,
        n integer NOT NULL,
        keys text[] NOT NULL
    )""",
    # Read only by retention, whole: not worth compressing at every claim.
    "ALTER TABLE {s}.key_list ALTER COLUMN keys SET STORAGE EXTERNAL",
    "CREATE INDEX key_list_chunk ON {s}.key_list (chunk)",
    """INSERT INTO {s}.key_list (pipeline, chunk, n, keys)
    SELECT pipeline, chunk, count(*), array_agg(key)
    FROM (SELECT pipeline, chunk, key,
                 (row_number() OVER (PARTITION BY pipeline, chunk) - 1) / 10000 AS part
          FROM {s}.key_ledger) k
    GROUP BY pipeline, chunk, part""",
    "DROP INDEX {s}.key_ledger_chunk",
    'ALTER TABLE {s}.key_ledger ALTER COLUMN key TYPE text COLLATE "C"',
)

# An operator's dead-letter retry (`batchd dead-letters retry`), for whichever worker reads
# the source: a request file would wait in one machine's state dir for that machine's
# worker to hold the source's shard. Per key, the chunk (or batch) its dead letter came
# from: a key is forgotten only while the ledger still gives it to that chunk's family, so
# a row answered since is never sent again. Taken in the transaction that forgets the keys.
_V7 = (
    """CREATE TABLE {s}.retry_request (
        id bigserial PRIMARY KEY,
        pipeline text NOT NULL,
        keys text[] NOT NULL,
        chunks text[] NOT NULL,
        batch_ids text[] NOT NULL,
        requested_at timestamptz NOT NULL DEFAULT now(),
        requested_by text NOT NULL,
        taken_by text,
        taken_at timestamptz
    )""",
    "CREATE INDEX retry_request_pending ON {s}.retry_request (pipeline) WHERE taken_at IS NULL",
)

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "workers, shards, chunks, event log, ledger, spool, create slot, limits", _V1),
    Migration(2, "per-shard read frontiers (pipeline.shards) and chunk numbers", _V2),
    Migration(3, "the pipeline config every worker must share", _V3),
    Migration(4, "the workers reading each split pipeline's shards", _V4),
    Migration(5, "the key ledger by chunk, for its retention", _V5),
    Migration(6, "the key ledger's keys bytewise, found by chunk through key lists", _V6),
    Migration(7, "operators' dead-letter retries, for the source's reader", _V7),
)
