"""
Chunk ids: the one place that knows how they are spelled.

A fresh chunk is ``<pipeline>-<number, 6 digits>`` (``tickets-000003``); its
retries append ``-r<k>`` (``tickets-000003-r1``, ``-r2``, ...). The number is
what the key ledger stores to know which chunk claimed a key last, the root is
what ties a retry family together for the source commit, and ``-r<k>`` is the
attempt. The manifest, the runner, the collector and the operator commands all
read ids through these functions, so the format can change in one place.
"""

from __future__ import annotations

__all__ = ("attempt_of", "fresh_id", "number_of", "retry_id", "root_of")

_DIGITS = 6
_RETRY = "-r"


def fresh_id(pipeline: str, number: int) -> str:
    """The id of the pipeline's *number*-th chunk (``tickets-000003``)."""
    return f"{pipeline}-{number:0{_DIGITS}d}"


def root_of(pipeline: str, chunk: str) -> str:
    """The fresh chunk a retry chunk descends from (``tickets-000003-r2`` → ``tickets-000003``)."""
    return chunk[: len(pipeline) + 1 + _DIGITS]


def number_of(pipeline: str, chunk: str) -> int:
    """The chunk's number (its root's), or -1 for an id that holds none (an owner marker)."""
    digits = chunk[len(pipeline) + 1 : len(pipeline) + 1 + _DIGITS]
    return int(digits) if digits.isdigit() else -1


def retry_id(chunk: str, root: str) -> str:
    """The retry cut from *chunk*: ``root-r1`` after the root, ``root-r(k+1)`` after ``-rk``."""
    if chunk == root:
        return f"{root}{_RETRY}1"
    return f"{root}{_RETRY}{int(chunk.rsplit(_RETRY, 1)[1]) + 1}"


def attempt_of(chunk: str) -> int:
    """``tickets-000003`` is attempt 1, ``tickets-000003-r2`` attempt 3."""
    head, sep, tail = chunk.rpartition(_RETRY)
    return int(tail) + 1 if sep and tail.isdigit() and head else 1
