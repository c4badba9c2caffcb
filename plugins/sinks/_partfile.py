"""
Part files published atomically: write to a hidden temp name, fsync, rename.

A reader of the directory sees either no part file for a group or the whole
of it, never half; a replay of the same group truncates the temp file and
renames over the old part, so writing a group twice leaves one copy.

Part files are named after their group (a chunk id, ``<pipeline>-000012``), so two
daemons writing one directory under one pipeline name would overwrite each other's
files. :meth:`PartFiles.claim` prevents it: an exclusive lock per directory and
pipeline while a daemon runs, and an owner record (the state dir) that refuses a
second installation afterwards too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from pathlib import Path
from typing import BinaryIO

import orjson

from batchd.plugins.errors import ConfigError, FatalError, RetriableError
from batchd.plugins.fsync import fsync_dir
from batchd.plugins.sinks._modes import directory_mode

__all__ = ("PartFiles", "check_group")

_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def check_group(group: str) -> str:
    """Refuse group names that could escape the directory or hide as a dotfile."""
    if not isinstance(group, str) or not _GROUP.fullmatch(group) or ".." in group:
        raise FatalError(
            f"sink group name {group!r} is not a safe file name "
            "(letters, digits, '.', '_' and '-' only, not starting with '.')"
        )
    return group


class PartFiles:
    """
    One temp file per open group in ``directory``; blocking, so call from a worker thread.

    Args:
        directory: where part files live; created by :meth:`prepare`.
        suffix: appended to the group name (``.jsonl``).
        what: the sink, as error messages name it (``jsonl sink``).
        mode: the files' mode; None leaves them to the umask (private under batchd).
    """

    def __init__(
        self, directory: Path, suffix: str, *, what: str = "sink", mode: int | None = None
    ) -> None:
        self.directory = directory
        self.suffix = suffix
        self.what = what
        self.mode = mode
        self._open: dict[str, BinaryIO] = {}
        self._lock_fd: int | None = None

    def prepare(self) -> None:
        """Create the directory (and its parents)."""
        if self.directory.exists() and not self.directory.is_dir():
            raise ConfigError(f"{self.what}: path {self.directory} is not a directory "
                              "(it is a file); part files need a directory of their own")
        try:
            created = not self.directory.exists()
            self.directory.mkdir(parents=True, exist_ok=True)
            if created and self.mode is not None:
                self.directory.chmod(directory_mode(self.mode))
        except OSError as exc:
            raise ConfigError(
                f"{self.what}: cannot create {self.directory}: {exc.strerror or exc}"
            ) from None

    def claim(self, scope: str, owner: str) -> None:
        """
        Take the directory for ``scope`` (a pipeline name) on behalf of ``owner`` (a state dir).

        Raises:
            ConfigError: another daemon holds it now, or another state dir wrote its part
                files before (they would be overwritten).
        """
        path = self.directory / f".batchd-{scope}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"{self.what}: cannot lock {path}: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_owner(fd)
                raise ConfigError(
                    f"{self.what}: {self.directory} is being written by another batchd for "
                    f"pipeline {scope!r} (pid {holder.get('pid', '?')}, state dir "
                    f"{holder.get('state_dir', '?')}): two daemons would overwrite each "
                    "other's part files; give each its own path or pipeline name"
                ) from None
            previous = _read_owner(fd).get("state_dir")
            if previous not in (None, owner) and self._has_parts(scope):
                raise ConfigError(
                    f"{self.what}: {self.directory} holds part files of pipeline {scope!r} "
                    f"written by the batchd with state dir {previous}; this one ({owner}) "
                    f"would overwrite them. Use another path, or move those files away and "
                    f"delete {path}"
                )
            with contextlib.suppress(OSError):  # a full disk: the lock still holds, the record
                os.ftruncate(fd, 0)             # of who writes here waits for the next start
                os.pwrite(fd, orjson.dumps({"pid": os.getpid(), "state_dir": owner}) + b"\n", 0)
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _has_parts(self, scope: str) -> bool:
        pattern = re.compile(re.escape(scope) + r"-\d{6}(-r\d+)?" + re.escape(self.suffix))
        return any(pattern.fullmatch(p.name) for p in self.directory.iterdir())

    def final_path(self, group: str) -> Path:
        """Where the group's published part file lives."""
        return self.directory / f"{check_group(group)}{self.suffix}"

    def temp_path(self, group: str) -> Path:
        """Where the group's unpublished rows are written."""
        return self.directory / f".{check_group(group)}{self.suffix}.tmp"

    def is_open(self, group: str) -> bool:
        """Whether rows were written for ``group`` since it was last published."""
        return group in self._open

    def write(self, group: str, data: bytes) -> None:
        """Append to the group's temp file, truncating it on the group's first write."""
        path = self.temp_path(group)
        try:
            file = self._open.get(group)
            if file is None:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, self.mode or 0o600)
                if self.mode is not None:
                    os.fchmod(fd, self.mode)  # the umask would take bits away
                file = self._open[group] = open(fd, "wb")
            file.write(data)
        except OSError as exc:
            self._abandon(group)
            raise RetriableError(f"{self.what}: cannot write {path}: {exc.strerror}") from None

    def _abandon(self, group: str) -> None:
        """
        Forget a group whose write failed: it is replayed whole, from its first put. The temp
        file is left in place (truncated by that replay), so the space it holds on a full
        disk is not handed to another group's retry in between.
        """
        file = self._open.pop(group, None)
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()

    def publish(self, group: str) -> bool:
        """fsync the temp file, rename it over the part file, fsync the directory."""
        file = self._open.pop(group, None)
        if file is None:
            return False
        path = self.temp_path(group)
        try:
            try:
                file.flush()
                os.fsync(file.fileno())
            finally:
                with contextlib.suppress(OSError):
                    file.close()
            os.replace(path, self.final_path(group))
            fsync_dir(self.directory)
        except OSError as exc:  # the group is replayed whole; see _abandon
            raise RetriableError(f"{self.what}: cannot write {path}: {exc.strerror}") from None
        return True

    def discard_all(self) -> None:
        """Close and delete every unpublished temp file (a replay will rewrite them)."""
        while self._open:
            group, file = self._open.popitem()
            with contextlib.suppress(OSError):
                file.close()
            with contextlib.suppress(OSError):
                self.temp_path(group).unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _read_owner(fd: int) -> dict[str, object]:
    try:
        found = orjson.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, orjson.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}
