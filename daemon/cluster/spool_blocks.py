"""
A sealed chunk's spool file in PostgreSQL, as compressed blocks any worker can fetch.

The spool is what a chunk sends, byte for byte, so it is checked twice: at seal
(the stored blocks must be exactly the ones uploaded: count, size and a chain of
per-block SHA-256s computed by PostgreSQL over what it stored, so no bytes travel
back) and at every download (the decompressed file's SHA-256 must be the one the
seal recorded). A mismatch raises :class:`SpoolCorrupt`; the chunk is quarantined,
never sent.

Blocks are keyed by (chunk, epoch, n), the epoch being the uploader's lease
epoch (the shard's for a new chunk, the parent chunk's for a retry), so a zombie
uploading late writes beside the real blocks, never over them; the seal records
which epoch's blocks are the chunk's. Blocks are deleted when the chunk retires;
anything else (a zombie's upload, one whose seal never committed) is an orphan
that :func:`collect_orphans` removes after an hour.

Compression is LZ4 (frame format): spool JSON shrinks 5-8x, at about five times the
speed of zlib's fastest level, which cost a worker ~1 µs of CPU per row
(docs/benchmarks.md §10). The codec is stored per block: blocks earlier releases
wrote with zlib still download.
Memory stays flat: one block (1 MiB raw) is in flight at a time.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio
import lz4.frame

from batchd.daemon.cluster.errors import SpoolCorrupt
from batchd.daemon.cluster.schema import Sql

__all__ = (
    "BLOCK_BYTES",
    "SpoolDigest",
    "collect_orphans",
    "delete",
    "download",
    "upload",
    "verify_stored",
)

BLOCK_BYTES = 1 << 20
_CODEC = "lz4"
_DECODERS: dict[str, Callable[[bytes], bytes]] = {
    "lz4": lz4.frame.decompress,
    "zlib": zlib.decompress,
}


@dataclass(frozen=True)
class SpoolDigest:
    """What a seal records about a spool: which blocks, how many, and their checksums."""

    epoch: int
    blocks: int
    raw_bytes: int
    sha256: str  # of the spool file's bytes
    chain: str  # sha256 over each stored block's sha256, in order


def _read_block(f: IO[bytes], size: int) -> tuple[bytes, bytes]:
    raw = f.read(size)
    return raw, lz4.frame.compress(raw) if raw else b""


async def upload(
    conn: Any, sql: Sql, chunk: str, epoch: int, path: Path, *, block_bytes: int = BLOCK_BYTES
) -> SpoolDigest:
    """
    Store the spool file at *path* as *chunk*'s blocks for *epoch*, in one transaction.

    An earlier upload for the same chunk and epoch (a retry after a lost
    connection) is replaced, so the blocks are always one whole file or none.
    """
    content = hashlib.sha256()
    chain = hashlib.sha256()
    blocks = raw_bytes = 0
    insert = sql("INSERT INTO {s}.spool_block (chunk, epoch, n, codec, raw_bytes, data)"
                 " VALUES ($1, $2, $3, $4, $5, $6)")
    f = await anyio.to_thread.run_sync(path.open, "rb")
    try:
        async with conn.transaction():
            await conn.execute(
                sql("DELETE FROM {s}.spool_block WHERE chunk = $1 AND epoch = $2"), chunk, epoch
            )
            while True:
                raw, packed = await anyio.to_thread.run_sync(_read_block, f, block_bytes)
                if not raw:
                    break
                content.update(raw)
                chain.update(hashlib.sha256(packed).digest())
                await conn.execute(insert, chunk, epoch, blocks, _CODEC, len(raw), packed)
                blocks += 1
                raw_bytes += len(raw)
    finally:
        f.close()
    return SpoolDigest(epoch, blocks, raw_bytes, content.hexdigest(), chain.hexdigest())


_STORED = """
SELECT count(*) AS blocks, coalesce(max(n), -1) AS last, coalesce(sum(raw_bytes), 0) AS raw,
       encode(sha256(coalesce(string_agg(sha256(data), ''::bytea ORDER BY n), ''::bytea)),
              'hex') AS chain
FROM {s}.spool_block WHERE chunk = $1 AND epoch = $2
"""


async def verify_stored(conn: Any, sql: Sql, chunk: str, digest: SpoolDigest) -> None:
    """
    Check that PostgreSQL holds exactly the blocks *digest* describes (seal time).

    Raises:
        SpoolCorrupt: naming the chunk, the epoch and what differs.
    """
    row = await conn.fetchrow(sql(_STORED), chunk, digest.epoch)
    found = (row["blocks"], row["last"] + 1, int(row["raw"]), row["chain"])
    wanted = (digest.blocks, digest.blocks, digest.raw_bytes, digest.chain)
    if found != wanted:
        raise SpoolCorrupt(
            f"spool of chunk {chunk} (epoch {digest.epoch}): stored {row['blocks']} blocks, "
            f"{int(row['raw'])} bytes, chain {row['chain'][:12]}; uploaded {digest.blocks} "
            f"blocks, {digest.raw_bytes} bytes, chain {digest.chain[:12]}"
        )


def _write(f: IO[bytes], codec: str, data: bytes, where: str) -> bytes:
    decode = _DECODERS.get(codec)
    if decode is None:
        raise SpoolCorrupt(f"{where}: unknown codec {codec!r}")
    try:
        raw = decode(data)
    except (zlib.error, RuntimeError, ValueError) as exc:  # lz4 raises RuntimeError
        raise SpoolCorrupt(f"{where}: block does not decompress ({exc})") from None
    f.write(raw)
    return raw


def _finish(f: IO[bytes], tmp: Path, dest: Path) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
    tmp.replace(dest)


async def download(conn: Any, sql: Sql, chunk: str, dest: Path) -> SpoolDigest:
    """
    Write *chunk*'s sealed spool to *dest* (via ``dest.tmp``, fsynced, renamed).

    Raises:
        SpoolCorrupt: the chunk has no stored spool, or what is stored does not
            decompress to the checksum its seal recorded; *dest* is not written.
    """
    meta = await conn.fetchrow(
        sql("SELECT spool_epoch, spool_sha256, spool_blocks, spool_bytes FROM {s}.chunk"
            " WHERE chunk = $1"),
        chunk,
    )
    if meta is None or meta["spool_epoch"] is None:
        raise SpoolCorrupt(f"spool of chunk {chunk}: none stored")
    epoch = meta["spool_epoch"]
    where = f"spool of chunk {chunk} (epoch {epoch})"
    tmp = dest.with_name(dest.name + ".tmp")
    content, chain = hashlib.sha256(), hashlib.sha256()
    blocks = raw_bytes = 0
    f = await anyio.to_thread.run_sync(tmp.open, "wb")
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            cursor = conn.cursor(
                sql("SELECT n, codec, data FROM {s}.spool_block"
                    " WHERE chunk = $1 AND epoch = $2 ORDER BY n"),
                chunk, epoch, prefetch=2,
            )
            async for row in cursor:
                if row["n"] != blocks:
                    raise SpoolCorrupt(f"{where}: block {blocks} is missing")
                raw = await anyio.to_thread.run_sync(_write, f, row["codec"], row["data"], where)
                content.update(raw)
                chain.update(hashlib.sha256(row["data"]).digest())
                blocks += 1
                raw_bytes += len(raw)
        got = (blocks, raw_bytes, content.hexdigest())
        wanted = (meta["spool_blocks"], meta["spool_bytes"], meta["spool_sha256"])
        if got != wanted:
            raise SpoolCorrupt(
                f"{where}: downloaded {blocks} blocks, {raw_bytes} bytes, sha256 "
                f"{got[2][:12]}; sealed {wanted[0]} blocks, {wanted[1]} bytes, sha256 "
                f"{str(wanted[2])[:12]}"
            )
        await anyio.to_thread.run_sync(_finish, f, tmp, dest)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    return SpoolDigest(epoch, blocks, raw_bytes, content.hexdigest(), chain.hexdigest())


async def delete(conn: Any, sql: Sql, chunk: str) -> int:
    """Drop every stored block of *chunk* (at retire); how many went."""
    done = await conn.execute(sql("DELETE FROM {s}.spool_block WHERE chunk = $1"), chunk)
    return int(done.split()[-1])


async def collect_orphans(conn: Any, sql: Sql, *, older_than: float = 3600.0) -> int:
    """
    Drop blocks no live chunk uses: a retired chunk's at once, others after *older_than* s.

    "Others" are blocks of an epoch other than the one the chunk's seal recorded
    (a fenced-out uploader's), or of a chunk that was never sealed; the age
    keeps an upload whose seal is about to commit.
    """
    done = await conn.execute(
        sql("""
        DELETE FROM {s}.spool_block b
        WHERE EXISTS (SELECT 1 FROM {s}.chunk c WHERE c.chunk = b.chunk AND c.stage = 'retired')
           OR (b.created_at < now() - $1 * interval '1 second'
               AND NOT EXISTS (SELECT 1 FROM {s}.chunk c WHERE c.chunk = b.chunk
                               AND c.spool_epoch = b.epoch AND c.stage <> 'retired'))"""),
        older_than,
    )
    return int(done.split()[-1])
