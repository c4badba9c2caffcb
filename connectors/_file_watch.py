"""
A file source followed in daemon mode notices when its file is cut, replaced or rewritten.

At start the file is compared with what was read (:meth:`FileSource._check_identity`).
While batchd follows it, an operator can still truncate it (``> tickets.csv``, a
``copytruncate`` rotation), move a new file over it, or rewrite it in place. Reading on
would silently miss rows: an open file that was truncated is read past its new end (rows
written later below that offset are never seen, and once the file grows past it a row is
read from its middle); a replaced file is never read at all. So whenever the reader has
been at the end of the file, before reading on it checks the file is still the one it
read: same inode at the path, at least as long, the same bytes just before the offset.
If not, the source stops with one line naming the file. A restart then compares the file
with what was read, as at any start: a copy with rows appended is resumed, anything else
is refused naming what changed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from batchd.plugins.errors import FatalError

__all__ = ("FileChanged", "FileWatch")

_HASHED = 4096  # bytes compared just before the read offset


class FileChanged(FatalError):
    """The followed file is no longer the one read so far; the message names it."""


class FileWatch:
    """Remembers the bytes before the offset reached at end of file, and checks them."""

    __slots__ = ("_label", "_path", "_seen")

    def __init__(self, path: Path, label: str) -> None:
        self._path = path
        self._label = label
        self._seen: tuple[int, bytes] | None = None  # (offset, digest of the bytes before it)

    def check(self, fd: int, offset: int) -> None:
        """
        Raise :class:`FileChanged` if the file at ``fd`` was cut below ``offset``, is no
        longer the file at the path, or changed just before ``offset`` since last checked.
        """
        st = os.fstat(fd)
        stop = ("; batchd stops reading it, and at the next start compares the file with "
                "what it read (a copy with rows added is resumed; anything else is refused)")
        if st.st_size < offset:
            raise FileChanged(f"{self._label} was truncated while batchd read it: it is "
                              f"{st.st_size} bytes now, batchd had read {offset}{stop}")
        try:
            current = os.stat(self._path)
        except FileNotFoundError:
            raise FileChanged(f"{self._label} was removed or renamed while batchd read "
                              f"it{stop}") from None
        except OSError:
            current = st  # cannot tell (a permission change): the open file still reads
        if (current.st_dev, current.st_ino) != (st.st_dev, st.st_ino):
            raise FileChanged(f"{self._label} was replaced by another file while batchd "
                              f"read it{stop}")
        start = max(0, offset - _HASHED)
        digest = hashlib.blake2b(os.pread(fd, offset - start, start), digest_size=16).digest()
        if self._seen is not None and self._seen[0] == offset and self._seen[1] != digest:
            raise FileChanged(f"{self._label} was rewritten while batchd read it: the "
                              f"bytes before offset {offset} changed{stop}")
        self._seen = (offset, digest)
