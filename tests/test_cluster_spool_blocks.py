"""
Spool files as compressed, checksummed blocks in PostgreSQL: verified at seal
and at download, epoch-keyed against zombies, deleted at retire, orphans collected.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import lz4.frame
import pytest

from batchd.daemon.cluster import fencing, spool_blocks
from batchd.daemon.cluster.errors import SpoolCorrupt
from tests.fixtures.cluster import ClusterEnv, sealed_fields


def spool_file(path: Path, lines: int) -> Path:
    """A spool-like file: JSON lines with some entropy, like real requests."""
    with path.open("wb") as f:
        for i in range(lines):
            noise = os.urandom(8).hex()
            f.write(b'{"custom_id":"c%d","params":{"messages":[{"content":"row %d %s"}]}}'
                    b'\t{"key":"%d"}\n' % (i, i, noise.encode(), i))
    return path


@pytest.mark.anyio
class TestSpoolBlocks:
    async def test_round_trip_in_blocks(self, cluster: ClusterEnv, tmp_path: Path) -> None:
        """A multi-block file comes back byte for byte, smaller in the database."""
        c, sql = cluster.conn, cluster.sql
        src = spool_file(tmp_path / "src.jsonl", 5000)
        digest = await spool_blocks.upload(c, sql, "p-000001", 1, src, block_bytes=64 * 1024)
        assert digest.blocks == -(-src.stat().st_size // (64 * 1024))
        assert digest.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
        w = await cluster.worker("a")
        await fencing.seal_chunk(c, sql, await cluster.shard(w), sealed_fields("p-000001"),
                                 spool=digest)
        dest = tmp_path / "dest.jsonl"
        got = await spool_blocks.download(c, sql, "p-000001", dest)
        assert dest.read_bytes() == src.read_bytes()
        assert got == digest
        stored = await c.fetchval(sql("SELECT sum(length(data)) FROM {s}.spool_block"))
        assert stored < src.stat().st_size / 2

    async def test_blocks_an_earlier_release_wrote_with_zlib_still_download(
        self, cluster: ClusterEnv, tmp_path: Path
    ) -> None:
        """A chunk sealed before LZ4 (its blocks zlib, codec per block) downloads as it was."""
        c, sql = cluster.conn, cluster.sql
        src = spool_file(tmp_path / "src.jsonl", 3000)
        digest = await spool_blocks.upload(c, sql, "p-000001", 1, src, block_bytes=64 * 1024)
        w = await cluster.worker("a")
        await fencing.seal_chunk(c, sql, await cluster.shard(w), sealed_fields("p-000001"),
                                 spool=digest)
        for n, data in await c.fetch(sql("SELECT n, data FROM {s}.spool_block")):
            await c.execute(sql("UPDATE {s}.spool_block SET data = $2, codec = 'zlib'"
                                " WHERE n = $1"), n, zlib.compress(lz4.frame.decompress(data), 1))
        dest = tmp_path / "dest.jsonl"
        got = await spool_blocks.download(c, sql, "p-000001", dest)
        assert dest.read_bytes() == src.read_bytes()
        assert (got.blocks, got.raw_bytes, got.sha256) == (
            digest.blocks, digest.raw_bytes, digest.sha256)
        await c.execute(sql("UPDATE {s}.spool_block SET codec = 'zstd' WHERE n = 0"))
        with pytest.raises(SpoolCorrupt, match="unknown codec 'zstd'"):
            await spool_blocks.download(c, sql, "p-000001", dest)

    async def test_an_empty_spool_round_trips(self, cluster: ClusterEnv, tmp_path: Path) -> None:
        """A chunk of only rejects may have an empty request half; zero blocks is valid."""
        c, sql = cluster.conn, cluster.sql
        empty = tmp_path / "empty.jsonl"
        empty.write_bytes(b"")
        digest = await spool_blocks.upload(c, sql, "p-000001", 1, empty)
        w = await cluster.worker("a")
        await fencing.seal_chunk(c, sql, await cluster.shard(w), sealed_fields("p-000001"),
                                 spool=digest)
        await spool_blocks.download(c, sql, "p-000001", tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == b""

    async def test_seal_refuses_blocks_that_are_not_the_uploaded_ones(
        self, cluster: ClusterEnv, tmp_path: Path
    ) -> None:
        """A block lost or altered between upload and seal: the seal fails, no chunk row."""
        c, sql = cluster.conn, cluster.sql
        w = await cluster.worker("a")
        shard = await cluster.shard(w)
        src = spool_file(tmp_path / "src.jsonl", 2000)
        digest = await spool_blocks.upload(c, sql, "p-000001", shard.epoch, src,
                                           block_bytes=32 * 1024)
        await c.execute(sql("UPDATE {s}.spool_block SET data = data || '\\x00'::bytea"
                            " WHERE n = 1"))
        with pytest.raises(SpoolCorrupt, match="spool of chunk p-000001 \\(epoch 1\\)"):
            await fencing.seal_chunk(c, sql, shard, sealed_fields("p-000001"), spool=digest)
        await c.execute(sql("DELETE FROM {s}.spool_block WHERE n = 2"))
        with pytest.raises(SpoolCorrupt, match=r"stored .* blocks"):
            await fencing.seal_chunk(c, sql, shard, sealed_fields("p-000001"), spool=digest)
        assert await c.fetchval(sql("SELECT count(*) FROM {s}.chunk")) == 0
        assert await c.fetchval(sql("SELECT count(*) FROM {s}.event")) == 0

    async def test_download_refuses_a_corrupt_spool_and_writes_nothing(
        self, cluster: ClusterEnv, tmp_path: Path
    ) -> None:
        """Blocks damaged after the seal: SpoolCorrupt names the chunk, dest is untouched."""
        c, sql = cluster.conn, cluster.sql
        w = await cluster.worker("a")
        await cluster.seal(await cluster.shard(w), "p-000001")
        packed = await c.fetchval(sql("SELECT data FROM {s}.spool_block"))
        # Rewritten with the other codec a block may carry (zlib, before lz4), so the
        # block decompresses and only the checksum can tell.
        tampered = zlib.compress(lz4.frame.decompress(packed).replace(b"p-000001-0",
                                                                      b"p-000001-9"))
        await c.execute(sql("UPDATE {s}.spool_block SET data = $1, codec = 'zlib'"), tampered)
        dest = tmp_path / "dest.jsonl"
        with pytest.raises(SpoolCorrupt, match=r"spool of chunk p-000001 .*sha256"):
            await spool_blocks.download(c, sql, "p-000001", dest)
        assert not dest.exists() and not dest.with_name("dest.jsonl.tmp").exists()
        await c.execute(sql("UPDATE {s}.spool_block SET data = 'garbage'::bytea"))
        with pytest.raises(SpoolCorrupt, match="does not decompress"):
            await spool_blocks.download(c, sql, "p-000001", dest)
        with pytest.raises(SpoolCorrupt, match="p-000404: none stored"):
            await spool_blocks.download(c, sql, "p-000404", dest)

    async def test_a_zombie_upload_lands_beside_the_real_blocks(
        self, cluster: ClusterEnv, tmp_path: Path
    ) -> None:
        """Blocks are epoch-keyed: a late upload at an old epoch never replaces the sealed one."""
        c, sql = cluster.conn, cluster.sql
        w = await cluster.worker("a")
        shard = await cluster.shard(w)
        await cluster.seal(shard, "p-000001")
        zombie = spool_file(tmp_path / "zombie.jsonl", 10)
        await spool_blocks.upload(c, sql, "p-000001", shard.epoch + 7, zombie)
        await spool_blocks.download(c, sql, "p-000001", tmp_path / "out")
        assert b"p-000001-0" in (tmp_path / "out").read_bytes()

    async def test_orphans_are_collected_after_an_hour_retired_at_once(
        self, cluster: ClusterEnv, tmp_path: Path
    ) -> None:
        """Unsealed and wrong-epoch blocks go once old; a retired chunk's go immediately."""
        c, sql = cluster.conn, cluster.sql
        w = await cluster.worker("a")
        shard = await cluster.shard(w)
        await cluster.seal(shard, "p-000001")
        await cluster.spool("p-000001", 99)  # a fenced uploader's
        await cluster.spool("p-000002", 1)  # a seal that never committed
        assert await spool_blocks.collect_orphans(c, sql) == 0  # too young to tell
        await c.execute(sql("UPDATE {s}.spool_block SET created_at = now() - interval '2 hours'"))
        assert await spool_blocks.collect_orphans(c, sql) == 2
        left = await c.fetch(sql("SELECT chunk, epoch FROM {s}.spool_block"))
        assert [tuple(r) for r in left] == [("p-000001", 1)]
        await c.execute(sql("UPDATE {s}.chunk SET stage = 'retired'"))
        assert await spool_blocks.collect_orphans(c, sql) == 1
        assert await spool_blocks.delete(c, sql, "p-000001") == 0

    async def test_reupload_replaces_the_same_epoch(
        self, cluster: ClusterEnv, tmp_path: Path
    ) -> None:
        """An upload retried after a lost connection leaves one whole file, not two."""
        c, sql = cluster.conn, cluster.sql
        await spool_blocks.upload(c, sql, "p-000001", 1, spool_file(tmp_path / "a", 3000),
                                  block_bytes=16 * 1024)
        small = await spool_blocks.upload(c, sql, "p-000001", 1, spool_file(tmp_path / "b", 3))
        assert await c.fetchval(sql("SELECT count(*) FROM {s}.spool_block")) == small.blocks == 1
