"""
``batchd resume PIPELINE``: lift a pause whose cause the operator has fixed.

A pause for an account problem (a spend limit, billing, a revoked key) holds every
row until someone acts, and the daemon cannot tell when the cause is gone. The
command drops a request file in the state directory; a running daemon sees it
within a second and resumes that pipeline (the next create pauses it again if the
cause remains). A stopped daemon resumes every paused pipeline when it starts,
as SIGHUP (``systemctl reload``) does for a running one.
"""

from __future__ import annotations

import os
from pathlib import Path

from batchd.daemon.config import Config
from batchd.daemon.wal.manifest import MANIFEST_NAME, replay

__all__ = ("request_resume", "resume_request_path")


def resume_request_path(state_dir: Path, pipeline: str) -> Path:
    return state_dir / "resume-requests" / pipeline


def request_resume(config: Config, pipeline: str) -> tuple[Path | None, str | None, str | None]:
    """Write the request if the pipeline is paused; returns it, the pause's reason and kind."""
    config.pipeline(pipeline)  # raises ConfigError naming the pipelines
    reason = kind = None
    manifest = config.state_dir / MANIFEST_NAME
    if manifest.exists():
        state, _ = replay(manifest, truncate=False)
        found = state.pipelines.get(pipeline)
        if found is not None:
            reason, kind = found.paused, found.pause_kind
    if reason is None:
        return None, None, None
    path = resume_request_path(config.state_dir, pipeline)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("resume\n", encoding="utf-8")
    os.replace(tmp, path)
    return path, reason, kind
