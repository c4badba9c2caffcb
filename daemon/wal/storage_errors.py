"""
File-system failures turned into one line naming the path, and the exit code they get.

A read-only or inaccessible state directory (or output) is how the host was set up:
retrying cannot fix it, so it is a :class:`ConfigError` (exit 2, no restart loop under
systemd). A full disk is a :class:`StorageFull` (exit 1): systemd restarts the daemon,
which carries on from its manifest once there is room again.
"""

from __future__ import annotations

import errno
from pathlib import Path

from batchd.plugins.errors import BatchdError, ConfigError, FatalError

__all__ = ("StorageFull", "storage_error")

_SETUP = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                    errno.ENAMETOOLONG, errno.ELOOP, errno.EEXIST})
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class StorageFull(FatalError):
    """A write failed for lack of space; the message names the file."""


def storage_error(exc: OSError, path: Path | str | None, what: str) -> BatchdError:
    """One-line error for ``exc`` raised while touching ``path`` (``what`` says whose it is)."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or str(exc)
    message = f"{what} {where}: {reason}" if where is not None else f"{what}: {reason}"
    # A state dir that cannot be made (a parent the kernel refuses, e.g. under /proc) is
    # also how the host was set up.
    if exc.errno in _SETUP or (exc.errno == errno.ENOENT and what == "state dir"):
        if exc.errno == errno.EROFS:
            message += " (mount it read-write, or point state_dir elsewhere)"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            message += " (run batchd as the user that owns it)"
        elif exc.errno == errno.EEXIST:  # a file where batchd makes a directory
            message += " (something that is not a directory is in its place: move it away)"
        return ConfigError(message)
    if exc.errno in _FULL:
        return StorageFull(message + " (free space there; batchd resumes where it stopped)")
    return FatalError(message)
