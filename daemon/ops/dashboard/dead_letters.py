"""
The newest dead letters of a pipeline, for the dashboard.

They are read back through the dead-letter sink's optional ``read_dead_letters``
capability (see :class:`batchd.plugins.contract.DeadLetterReader`), newest first, so
no sink's storage format is known here. A sink without the capability, or storage that
cannot be read right now, shows none: the page must render whatever the sink is.
"""

from __future__ import annotations

import sqlite3
from itertools import islice
from typing import Any

from batchd.daemon.config import Config, PipelineConfig
from batchd.plugins.errors import BatchdError

__all__ = ("newest_dead_letters",)

_FIELDS = ("key", "error_type", "error_message", "attempts", "batch_id")


def newest_dead_letters(
    config: Config, pipeline: PipelineConfig, limit: int = 8
) -> list[dict[str, Any]]:
    """Up to ``limit`` dead letters, newest first; [] for sinks that cannot read them back."""
    from batchd.daemon.commands.dead_letters import dead_letter_reader

    try:
        reader = dead_letter_reader(config, pipeline)
        found = islice(reader.read_dead_letters(newest_first=True), limit)
        return [{k: letter.row.get(k) for k in _FIELDS} for letter in found]
    except (BatchdError, OSError, sqlite3.Error):
        return []
