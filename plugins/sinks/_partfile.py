"""
Part files published atomically: write to a hidden temp name, fsync, rename.

A reader of the directory sees either no part file for a group or the whole
of it, never half; a replay of the same group truncates the temp file and
renames over the old part, so writing a group twice leaves one copy.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO

from plugins.errors import FatalError

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
    """

    def __init__(self, directory: Path, suffix: str) -> None:
        self.directory = directory
        self.suffix = suffix
        self._open: dict[str, BinaryIO] = {}

    def prepare(self) -> None:
        """Create the directory (and its parents)."""
        self.directory.mkdir(parents=True, exist_ok=True)

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
        file = self._open.get(group)
        if file is None:
            file = self._open[group] = open(self.temp_path(group), "wb")
        file.write(data)

    def publish(self, group: str) -> bool:
        """fsync the temp file, rename it over the part file, fsync the directory."""
        file = self._open.pop(group, None)
        if file is None:
            return False
        try:
            file.flush()
            os.fsync(file.fileno())
        finally:
            file.close()
        os.replace(self.temp_path(group), self.final_path(group))
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def discard_all(self) -> None:
        """Close and delete every unpublished temp file (a replay will rewrite them)."""
        while self._open:
            group, file = self._open.popitem()
            file.close()
            self.temp_path(group).unlink(missing_ok=True)
