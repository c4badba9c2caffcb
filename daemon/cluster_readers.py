"""
What a cluster worker keeps per source shard it reads, when the source is split in
shards (a Kafka topic's partitions): the shard's lease, its own source and packer.

Kept apart from :mod:`batchd.daemon.cluster_shard_runner` (the loops that take and hand
back shards) so that the types the loops share are named in one place. A source that
can be split says so by having :meth:`SplitSource.shards` and :meth:`SplitSource.only`
(the Kafka source does); every other source is read as one shard, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from batchd.daemon.intake.packer import Packer
from batchd.daemon.store.contract import ShardLease
from batchd.plugins.contract import Source

__all__ = ("ShardReader", "ShardStore", "SplitSource", "fair_share", "split_source")


@runtime_checkable
class SplitSource(Protocol):
    """A source several workers read apart, one shard each (Kafka: a topic-partition)."""

    async def shards(self) -> list[str]:
        """Every shard's name, in a stable order."""

    def only(self, shard: str) -> None:
        """Read just *shard*; called on a fresh source, before ``start``."""


@runtime_checkable
class ShardStore(Protocol):
    """What the cluster store (``PgStore``, through the mirror) adds for split sources."""

    async def release_shard(self, lease: ShardLease) -> bool:
        """Stop reading a shard; anyone may take it at once."""

    async def next_chunk_number(self, pipeline: str) -> int:
        """A chunk number no reader of another shard of the pipeline gets."""

    async def free_shards(self, pipeline: str, names: list[str]) -> list[str]:
        """Which of *names* nobody else live holds."""

    async def join_readers(self, pipeline: str) -> None:
        """List this worker among the readers of *pipeline*'s shards."""

    async def live_readers(self, pipeline: str) -> int:
        """How many live workers share *pipeline*'s shards."""


def split_source(source: Source) -> SplitSource | None:
    """*source* as a split source, or None when it is read as one shard."""
    return source if isinstance(source, SplitSource) else None


def fair_share(shards: int, workers: int) -> int:
    """How many of *shards* one of *workers* live workers reads (rounded up)."""
    return math.ceil(shards / max(1, workers))


@dataclass(eq=False)
class ShardReader:
    """One shard this worker reads: its lease, its own source and its packer."""

    name: str
    lease: ShardLease
    source: Source
    packer: Packer | None = None
    #: Set to hand the shard back at the next chunk boundary (over this worker's share).
    release_wanted: bool = False
    #: Read to its end (``--until-drained``): held only until its chunks are retired.
    drained: bool = False
