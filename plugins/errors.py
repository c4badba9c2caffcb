"""
Error types shared by the engine and plugins.

They live in their own module so that connectors, sinks and the engine can
raise and catch them without importing each other.
"""

from __future__ import annotations

__all__ = (
    "BatchdError",
    "ConfigError",
    "FatalError",
    "InvalidOutput",
    "RetriableError",
)


class BatchdError(Exception):
    """Base of every error batchd raises on purpose."""


class ConfigError(BatchdError):
    """
    The configuration (or an option handed to a plugin) is wrong.

    The message must name the file, table and key at fault so an operator can
    fix it without reading code. The engine also sets ``file``, ``table``, ``key``
    and ``hint`` where it knows them (``batchd validate --json`` reports them apart).
    """

    file: str | None = None
    table: str | None = None
    key: str | None = None
    hint: str | None = None


class RetriableError(BatchdError):
    """
    A transient failure (dropped connection, broker unavailable): the engine
    calls the same method again after a backoff, and nothing is lost.
    """


class FatalError(BatchdError):
    """A failure that retrying cannot fix; the pipeline stops and alarms."""


class InvalidOutput(BatchdError):
    """
    Raised by a ``batchd_parse_result`` hook when a model answer is unusable
    (say, a label outside the allowed set). The row is dead-lettered with this
    message instead of being paid for again.
    """
