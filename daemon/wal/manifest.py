"""
The write-ahead manifest: an append-only, checksummed JSON-lines log in the state dir.

The engine appends a record *before* every action that crosses a failure boundary
and acts only once :meth:`Manifest.append` returns, which is after the line is on
disk. On start-up the log is replayed into a :class:`ManifestState`, so after a
``kill -9`` every chunk resumes from its last durable record.

Line format: ``<crc32 of the JSON, 8 lowercase hex> <compact JSON>\\n``. A crash
mid-write can only tear the last line, so a last line that is incomplete or fails
its checksum is dropped (and truncated away); a bad line anywhere else means the
file was damaged after it was written, and replay refuses to guess.

Appends use group commit: records that arrive while an fsync runs are written and
synced together by the next one, so many concurrent appenders pay for few fsyncs.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
import zlib
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import orjson

from batchd.daemon.ops.lazy_log import LazyLogger
from batchd.daemon.wal.manifest_damage import ManifestDamaged
from batchd.daemon.wal.manifest_state import ManifestCorrupt, ManifestState, validate_fields
from batchd.daemon.wal.records import Record
from batchd.plugins.errors import FatalError
from batchd.plugins.fsync import fsync_dir

__all__ = (
    "DEFAULT_COMPACT_BYTES",
    "Manifest",
    "ManifestCorrupt",
    "crash_point",
    "encode_line",
    "replay",
)

log = LazyLogger("batchd.manifest")  # status replays without importing structlog

DEFAULT_COMPACT_BYTES = 64 * 1024 * 1024
MANIFEST_NAME = "manifest.jsonl"
LOCK_NAME = "manifest.lock"

_ENVELOPE = frozenset({"seq", "ts", "kind"})
_HEX = frozenset(b"0123456789abcdef")
_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """
    SIGKILL this process if ``BATCHD_CRASH_AT`` names this point (crash drills).

    ``BATCHD_CRASH_AT=name`` kills the first time *name* is reached;
    ``name:N`` kills the N-th time.
    """
    target = os.environ.get("BATCHD_CRASH_AT")
    if not target:
        return
    point, _, nth = target.rpartition(":")
    if not (point and nth.isdigit()):
        point, nth = target, "1"
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)


def encode_line(record: dict[str, Any]) -> bytes:
    """One manifest line for *record*: checksum, space, compact JSON, newline."""
    body = orjson.dumps(record)
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _decode_line(line: bytes) -> tuple[dict[str, Any] | None, str]:
    """The record on a complete line, or None and what is wrong with it."""
    body = line[:-1]
    if len(body) < 10 or body[8:9] != b" " or not _HEX.issuperset(body[:8]):
        return None, "not '<crc32> <json>'"
    stored, computed = int(body[:8], 16), zlib.crc32(body[9:])
    if stored != computed:
        return None, f"checksum mismatch (stored {stored:08x}, computed {computed:08x})"
    try:
        record = orjson.loads(body[9:])
    except orjson.JSONDecodeError as exc:
        return None, f"invalid JSON ({exc})"
    seq = record.get("seq") if isinstance(record, dict) else None
    if (
        not isinstance(seq, int)
        or isinstance(seq, bool)
        or not isinstance(record.get("kind"), str)
        or not isinstance(record.get("ts"), int | float)
    ):
        return None, "record lacks an integer seq, a numeric ts or a string kind"
    return record, ""


def replay(path: Path, *, truncate: bool = False) -> tuple[ManifestState, int]:
    """
    Rebuild the state from the log at *path*; returns it and the log's valid length.

    A torn last line is dropped; with *truncate* (only for the lock holder, which
    is about to append) it is also cut off the file. Without it, replay only reads,
    so ``batchd status`` can use it on a live daemon's log, whose last line may be
    mid-write. Reads line by line, so memory stays flat.

    Raises:
        ManifestCorrupt: naming the file and line of a bad line that is not the
            last one, a seq that does not increase, or an illegal transition.
    """
    state = ManifestState()
    good = 0
    last_seq: int | None = None
    with path.open("rb") as f:
        line, lineno = f.readline(), 1
        while line:
            following = f.readline()
            if line.endswith(b"\n"):
                record, problem = _decode_line(line)
            else:
                record, problem = None, "incomplete (no newline)"
            if record is None:
                if following:
                    raise ManifestDamaged(path, lineno, problem, good)
                log.warning(
                    "manifest torn tail dropped",
                    path=str(path),
                    line=lineno,
                    problem=problem,
                    bytes=len(line),
                )
                break
            seq = record["seq"]
            if record["kind"] == "snapshot" and lineno != 1:
                raise ManifestDamaged(path, lineno, "a snapshot may only be the first record", good)
            if last_seq is not None and seq <= last_seq:
                raise ManifestDamaged(path, lineno, f"seq {seq} does not follow {last_seq}", good)
            try:
                state.apply(record)
            except ManifestCorrupt as exc:
                raise ManifestDamaged(path, lineno, str(exc), good) from None
            good += len(line)
            last_seq = seq
            line, lineno = following, lineno + 1
    if truncate and good != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good)
            os.fsync(f.fileno())
    return state, good


def _take_lock(state_dir: Path) -> int:
    """Hold an exclusive flock on the state dir for as long as the returned fd is open."""
    fd = os.open(state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise FatalError(
            f"state dir {state_dir} is in use by another batchd (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Manifest:
    """
    The open manifest of one state dir: a durable log plus the state it replays to.

    Lifecycle:
        1. ``await Manifest.open(state_dir)``: lock the dir, replay, drop a torn tail.
        2. ``await append(record)`` (a typed record of ``wal/records.py``) before each
           action; ``state`` follows.
        3. ``await compact()`` (or automatically past ``compact_bytes``).
        4. ``await aclose()``, or use ``async with``.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        state: ManifestState,
        head: ManifestState,
        size: int,
        fd: int,
        lock_fd: int,
        compact_bytes: int,
    ) -> None:
        self.state_dir = state_dir
        self.path = state_dir / MANIFEST_NAME
        # Durable state: only records already fsynced. ``_head`` also holds records
        # written but not yet synced; appends are validated against it, so two
        # concurrent appends can never put an illegal pair of records in the log.
        self.state = state
        self._head = head
        self._size = size
        self._fd = fd
        self._lock_fd = lock_fd
        self._compact_bytes = compact_bytes
        self._next_compact_at = compact_bytes
        self._next_seq = state.seq + 1
        self._durable_seq = state.seq
        self._pending: list[tuple[int, bytes]] = []
        self._io_lock = anyio.Lock()
        self._failed: BaseException | None = None
        self._closed = False
        self.fsync_count = 0
        self.compactions = 0

    @classmethod
    async def open(cls, state_dir: Path, *, compact_bytes: int = DEFAULT_COMPACT_BYTES) -> Manifest:
        """
        Open (creating if missing) the manifest in *state_dir* and replay it.

        Raises:
            FatalError: another batchd holds the state dir.
            ManifestCorrupt: the log is damaged before its last line.
        """
        state_dir = Path(state_dir)
        with anyio.CancelScope(shield=True):  # a cancelled open must not leak the lock
            state, size, fd, lock_fd = await anyio.to_thread.run_sync(cls._open_sync, state_dir)
        head = ManifestState.from_snapshot(state.to_snapshot())
        return cls(
            state_dir,
            state=state,
            head=head,
            size=size,
            fd=fd,
            lock_fd=lock_fd,
            compact_bytes=compact_bytes,
        )

    @staticmethod
    def _open_sync(state_dir: Path) -> tuple[ManifestState, int, int, int]:
        state_dir.mkdir(parents=True, exist_ok=True)
        lock_fd = _take_lock(state_dir)
        try:
            path = state_dir / MANIFEST_NAME
            # A snapshot that never got renamed into place: the log it came from is intact.
            (state_dir / (MANIFEST_NAME + ".tmp")).unlink(missing_ok=True)
            if not path.exists():
                path.touch()
                fsync_dir(state_dir)
            state, size = replay(path, truncate=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except BaseException:
            os.close(lock_fd)
            raise
        return state, size, fd, lock_fd

    async def __aenter__(self) -> Manifest:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def size_bytes(self) -> int:
        """Bytes in the log file, as written so far."""
        return self._size

    async def append(self, record: Record) -> dict[str, Any]:
        """
        Append one record and return it (as stored, with its envelope) once it is on
        disk and applied to ``state``.

        Once called, the append completes even if the caller is cancelled (the
        cancellation is delivered afterwards), so a record is never half-announced.

        Raises:
            ValueError: mistyped fields, or a transition the state refuses; nothing
                was written.
            FatalError: the log could not be written; restart to replay it.
        """
        self._check_usable()
        stored, line = self._stage(record.KIND, record.to_fields())
        with anyio.CancelScope(shield=True):
            while self._durable_seq < stored["seq"]:
                async with self._io_lock:
                    if self._durable_seq < stored["seq"]:
                        await self._flush_locked()
            if self._size >= self._next_compact_at:
                await self._auto_compact()
        return orjson.loads(line[9:])  # a private copy: callers may mutate it freely

    def _stage(self, kind: str, fields: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """Validate, number, encode and buffer a record, all without yielding."""
        validate_fields(kind, fields)
        record = {"seq": self._next_seq, "ts": time.time(), "kind": kind, **fields}
        try:
            line = encode_line(record)
        except orjson.JSONEncodeError as exc:
            raise ValueError(f"{kind} record is not JSON-serialisable: {exc}") from None
        canonical = orjson.loads(line[9:])
        try:
            self._head.apply(canonical)
        except ManifestCorrupt as exc:
            raise ValueError(f"illegal {kind} record: {exc}") from None
        self._next_seq += 1
        self._pending.append((record["seq"], line))
        return canonical, line

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError(f"manifest {self.path} is closed")
        if self._failed is not None:
            raise FatalError(
                f"manifest {self.path} failed earlier ({self._failed}); restart batchd to replay it"
            )

    async def _flush_locked(self) -> None:
        """Write and sync everything buffered (caller holds the I/O lock)."""
        self._check_usable()
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        data = b"".join(line for _, line in batch)
        try:
            await anyio.to_thread.run_sync(self._write_and_sync, data)
        except OSError as exc:
            # After a failed write or fsync the file's contents are unknown (and Linux
            # may have dropped the dirty pages): stop here and let replay sort it out.
            self._failed = exc
            raise FatalError(f"manifest {self.path} write failed: {exc}") from exc
        self._size += len(data)
        self.fsync_count += 1
        try:
            for _, line in batch:
                self.state.apply(orjson.loads(line[9:]))
        except ManifestCorrupt as exc:  # the head accepted it: a bug, not bad input
            self._failed = exc
            raise FatalError(f"manifest {self.path} state diverged from its log: {exc}") from exc
        self._durable_seq = batch[-1][0]

    def _write_and_sync(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fdatasync(self._fd)

    async def compact(self) -> None:
        """
        Replace the log with one snapshot record of the current state.

        Write new, fsync, rename, fsync the directory: a crash at any point leaves
        either the old log or the new one, and both replay to the same state.

        Raises:
            OSError: the snapshot could not be written; the old log is still in use.
            FatalError: the rename happened but could not be made durable.
        """
        self._check_usable()
        with anyio.CancelScope(shield=True):
            async with self._io_lock:
                await self._flush_locked()
                await self._compact_locked()

    async def _auto_compact(self) -> None:
        async with self._io_lock:
            if self._size < self._next_compact_at or self._failed or self._closed:
                return
            await self._flush_locked()
            try:
                await self._compact_locked()
            except OSError as exc:
                self._next_compact_at = self._size + self._compact_bytes
                log.error("manifest compaction failed", path=str(self.path), error=str(exc))

    async def _compact_locked(self) -> None:
        snapshot = {
            "seq": self.state.seq,
            "ts": time.time(),
            "kind": "snapshot",
            "state": self.state.to_snapshot(),
        }
        line = encode_line(snapshot)
        before = self._size
        self._fd = await anyio.to_thread.run_sync(self._swap_in, line)
        self._size = len(line)
        self._next_compact_at = max(self._compact_bytes, 2 * self._size)
        self.compactions += 1
        log.info("manifest compacted", path=str(self.path), before=before, after=self._size)

    def _swap_in(self, line: bytes) -> int:
        """Put a one-line log in place of the current one; returns its append fd."""
        tmp = self.path.with_name(MANIFEST_NAME + ".tmp")
        try:
            with tmp.open("wb") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            crash_point("compaction")
            os.replace(tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        try:
            fsync_dir(self.state_dir)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            self._failed = exc
            raise FatalError(f"manifest {self.path} compaction not durable: {exc}") from exc
        os.close(self._fd)
        return fd

    async def aclose(self) -> None:
        """Flush anything buffered, close the log and release the state dir."""
        if self._closed:
            return
        with anyio.CancelScope(shield=True):
            async with self._io_lock:
                try:
                    if self._failed is None:
                        await self._flush_locked()
                finally:
                    self._closed = True
                    os.close(self._fd)
                    os.close(self._lock_fd)
