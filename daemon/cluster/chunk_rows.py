"""
ChunkState and PipelineState as rows, and back.

The columns are the dataclasses' fields by name (``daemon/wal/manifest_state.py``
stays the one definition of what a chunk and a pipeline hold), so a field the
replay code gains fails loudly at the first insert until a migration adds its
column, rather than being dropped silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any

from batchd.daemon.cluster.db import from_json, to_json
from batchd.daemon.wal.manifest_state import ChunkState, PipelineState, Stage

__all__ = (
    "CHUNK_FIELDS",
    "PIPELINE_FIELDS",
    "WHOLE_SOURCE",
    "chunk_from_row",
    "chunk_params",
    "pipeline_from_row",
    "pipeline_params",
    "shard_column",
    "shard_of_row",
)

# ``shard`` is the row's own column, written once at insert: "0" (WHOLE_SOURCE) for a
# source read as one, which the replay state calls None.
CHUNK_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ChunkState) if f.name != "shard")
PIPELINE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(PipelineState))
_JSON = frozenset({"position", "counts", "last_sealed_position", "committed_position",
                   "shards"})
#: The shard of a source read as one (every source but a Kafka one split by partition).
WHOLE_SOURCE = "0"


def shard_column(shard: str | None) -> str:
    """The ``shard`` column for a chunk's replay-state shard."""
    return WHOLE_SOURCE if shard is None else shard


def shard_of_row(column: str) -> str | None:
    """A chunk row's ``shard`` column as the replay state holds it."""
    return None if column == WHOLE_SOURCE else column


def _to_column(name: str, value: Any) -> Any:
    if name in _JSON:
        return to_json(value)
    if isinstance(value, Stage):
        return str(value)
    return value


def chunk_from_row(row: Mapping[str, Any]) -> ChunkState:
    """The ChunkState a chunk row holds (its stage must not be 'retired')."""
    values = {name: row[name] for name in CHUNK_FIELDS}
    for name in _JSON & values.keys():
        values[name] = from_json(values[name])
    values["stage"] = Stage(values["stage"])
    return ChunkState(**values, shard=shard_of_row(row["shard"]))


def chunk_params(chunk: ChunkState) -> list[Any]:
    """Column values in CHUNK_FIELDS order."""
    data = asdict(chunk)
    return [_to_column(name, data[name]) for name in CHUNK_FIELDS]


def pipeline_from_row(row: Mapping[str, Any]) -> PipelineState:
    values = {name: row[name] for name in PIPELINE_FIELDS}
    for name in _JSON & values.keys():
        values[name] = from_json(values[name])
    return PipelineState(**values)


def pipeline_params(pipeline: PipelineState) -> list[Any]:
    """Column values in PIPELINE_FIELDS order."""
    data = asdict(pipeline)
    return [_to_column(name, data[name]) for name in PIPELINE_FIELDS]
