"""
Progress against the whole source, not against the rows read so far.

A pipeline reads its source a chunk at a time, so "rows done / rows read"
starts near 100% and sinks as more is read. Where the source knows its size
(a file's bytes, a table's row estimate, a topic's offsets) the total number
of rows is estimated from it: the rows read so far, scaled by how much of the
source they took up. Where it does not, rows read is the best figure there
is, and the basis says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio

from batchd.daemon.config import Config, PipelineConfig
from batchd.plugins.contract import SourceSize

__all__ = ("MeasuredSize", "MonotonicFraction", "progress_of", "source_sizes")

# How long one source may take to say how big it is (a database or broker call).
SIZE_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class MeasuredSize:
    """A source's size and the pipeline's rows read at the moment it was measured."""

    size: SourceSize
    rows_read: int


def progress_of(
    rows_read: int,
    rows_done: int,
    rows_pending: int,
    size: SourceSize | None,
    rows_at_size: int | None = None,
) -> dict[str, Any]:
    """
    ``basis`` (what the total rests on), ``rows_total`` (estimated) and ``fraction``.

    Bytes or messages: total = rows read × source size ÷ the part of it read, exact
    once the whole source is read. Rows (a table's estimate): the estimate itself,
    never below what is already known. No size: rows read, basis ``"rows read"``.
    ``rows_at_size`` is the rows read when ``size`` was measured, if that was earlier
    (the daemon measures every few seconds): the scale must pair the two.
    """
    known = max(rows_read, rows_done + rows_pending)
    scale_rows = rows_read if rows_at_size is None else rows_at_size
    total: int | None
    if size is None or size.total <= 0:
        basis, total = "rows read", known
    elif size.done is None:
        basis, total = size.unit, max(size.total, known)
    elif size.done >= size.total and scale_rows == rows_read:
        basis, total = size.unit, known
    elif size.done > 0 and scale_rows > 0:
        basis, total = size.unit, max(round(scale_rows * size.total / size.done), known)
    else:
        basis, total = size.unit, None  # nothing read yet: the size says nothing about rows
    fraction = min(rows_done / total, 1.0) if total else 0.0
    return {"basis": basis, "rows_total": total, "fraction": round(fraction, 6)}


class MonotonicFraction:
    """
    A displayed fraction that never goes back.

    The estimated total moves a little as rows of different lengths are read; a live
    display that jumped back by a percent would look like lost work.
    """

    def __init__(self) -> None:
        self.shown = 0.0

    def update(self, fraction: float) -> float:
        self.shown = max(self.shown, fraction)
        return self.shown


async def _size_of(config: Config, pipeline: PipelineConfig,
                   position: dict[str, Any] | None) -> SourceSize | None:
    from batchd.daemon.factories import build_source

    try:
        source = build_source(config, pipeline.name, pipeline.source)
    except Exception:
        return None  # an unusable source table is validate's to report, not status's
    try:
        with anyio.move_on_after(SIZE_TIMEOUT):
            return await source.size(position)
    except Exception:
        return None
    finally:
        try:
            await source.aclose()
        except Exception:
            pass
    return None


async def source_sizes(
    config: Config, positions: dict[str, dict[str, Any] | None]
) -> dict[str, SourceSize | None]:
    """Every pipeline's source size, asked concurrently; None where it is not known."""
    sizes: dict[str, SourceSize | None] = {}

    async def one(pipeline: PipelineConfig) -> None:
        sizes[pipeline.name] = await _size_of(config, pipeline, positions.get(pipeline.name))

    async with anyio.create_task_group() as tg:
        for pipeline in config.pipelines:
            tg.start_soon(one, pipeline)
    return sizes
