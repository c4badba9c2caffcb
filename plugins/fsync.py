"""
Make a rename durable: fsync the directory that holds the renamed file.

``os.replace`` is atomic but lives in the directory's metadata; until the
directory itself is fsynced a crash can bring back the old name. The manifest,
the spool and the sinks' part files all publish by rename, so they share this
one helper (it lives beside the plugin contract so connectors and third-party
sinks can import it too).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ("fsync_dir",)


def fsync_dir(directory: Path | str) -> None:
    """fsync *directory* so renames and creations inside it survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
