"""
Outputs that would collide are refused at start, before anything is written.

A sink writing into batchd's own state (the spool, whose files are deleted as chunks
retire; the manifest; the key ledger) destroys it; two sinks on one path overwrite each
other. Each sink names the local paths it writes (:meth:`batchd.plugins.contract.Sink.outputs`);
this module compares them with the state dir and with each other. Sinks inside the
state dir are fine otherwise: it is the one place the systemd unit lets batchd write.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from batchd.plugins.contract import Sink
from batchd.plugins.errors import ConfigError

__all__ = ("RESERVED_NAMES", "check_outputs")

# Entries of the state dir that are batchd's own.
RESERVED_NAMES = (
    "manifest.jsonl", "manifest.jsonl.tmp", "manifest.lock", "keys.sqlite", "keys.sqlite-wal",
    "keys.sqlite-shm", "keys.sqlite-journal", "reconcile.sqlite", "reconcile.sqlite-wal",
    "reconcile.sqlite-shm", "spool", "retry-requests", "resume-requests",
)


def _resolved(path: Path) -> Path:
    try:
        return path.expanduser().resolve(strict=False)
    except (RuntimeError, OSError):  # a symlink loop (RuntimeError up to Python 3.12)
        raise ConfigError(f"output path {path} is a symlink loop (or a chain of links too "
                          "long to follow); point the sink at a real path") from None


def check_outputs(state_dir: Path, sinks: Iterable[tuple[str, Sink]]) -> None:
    """
    Refuse outputs in batchd's own files, on one another, or of the wrong kind.

    Args:
        state_dir: the state directory.
        sinks: (where the config declares it, the sink) for every sink of every pipeline.

    Raises:
        ConfigError: naming the config table and the path at fault.
    """
    state = _resolved(state_dir)
    reserved = [state / name for name in RESERVED_NAMES]
    seen: list[tuple[Path, str, bool, str]] = []
    for where, sink in sinks:
        for output in sink.outputs():
            path = _resolved(output.path)
            kind = "directory" if output.directory else "file"
            if path == state:
                raise ConfigError(f"{where}: writes into {path}, which is the state dir "
                                  "itself; give the output a directory of its own")
            for own in reserved:
                if path == own or own in path.parents:
                    raise ConfigError(
                        f"{where}: writes {path}, which is batchd's own {own.name} in the "
                        f"state dir {state}; writing there would destroy it"
                    )
            if output.directory and path.exists() and not path.is_dir():
                raise ConfigError(f"{where}: path {path} is not a directory (it is a file); "
                                  "part files need a directory of their own")
            if not output.directory and path.is_dir():
                raise ConfigError(f"{where}: path {path} is a directory, not a {kind}")
            for other_path, scope, directory, other_where in seen:
                if other_path == path and (scope == output.scope or directory != output.directory):
                    raise ConfigError(
                        f"{where}: writes {path}, as does {other_where}; two outputs on one "
                        "path overwrite each other"
                    )
            seen.append((path, output.scope, output.directory, where))
