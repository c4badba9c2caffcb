"""
Cyclic garbage collector settings for batchd's long-running processes.

Every results line and every source record turns into a handful of dicts that
reference counting frees at once; almost none form cycles. CPython's cyclic
collector still runs a young-generation pass every 700 net allocations and,
now and then, a full pass over everything alive, including the tens of
thousands of objects the SDK and its dependencies leave behind at import.
Measured with ``bench/bench_collector.py``, those passes were a third of the
collector's time. Freezing what exists after start-up takes it out of every
later pass, and a larger young generation makes the passes rarer; reference
counting still frees everything it did before, so memory stays flat.
"""

from __future__ import annotations

import gc

__all__ = ("YOUNG_THRESHOLD", "tune_gc")

YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Call once start-up imports are done and before the work begins."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, 20, 20)
