"""
The two values that cross the plugin boundary: what a source reads
(:class:`Record`) and what a sink writes (:class:`ResultRow`).

Positions are opaque dicts (like Kafka Connect's ``sourceOffset``): the
engine stores them in the manifest and hands them back, but never reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ("Record", "ResultRow")


@dataclass(frozen=True, slots=True)
class Record:
    """
    One unit of work read from a source.

    Args:
        key: the stable join key (a primary key, ticket id, content hash);
            never an array index. It comes back on every result row.
        fields: the values the request template may use (``{body}``).
        position: opaque, JSON-serialisable; where this record came from
            (``{"line": 12}``, ``{"topic": "t", "partition": 0, "offset": 9}``).
            Passed back to :meth:`Source.start` and :meth:`Source.commit`.
        error: set by a source for a row it could read but not use (missing
            key, unparseable line). The engine dead-letters it with this
            reason and the position; it never reaches the API.
    """

    key: str
    fields: dict[str, Any]
    position: dict[str, Any]
    error: str | None = None


@dataclass(slots=True)
class ResultRow:
    """
    One terminal outcome for one key, as handed to sinks.

    ``status`` is ``"succeeded"``, ``"truncated"`` (the answer hit
    ``max_tokens``: kept, flagged, never paid for again) or ``"dead_letter"``
    (permanent error, exhausted retries, a bad source row, a refusal, an answer
    with no text, or one the parse hook or ``output_schema`` rejected).
    Regular sinks receive the first two; the dead-letter sink receives the
    third. Any sink type can serve as a dead-letter sink. ``output_json`` is
    set for a JSON answer (``output_schema``, or a tool call).
    """

    key: str
    custom_id: str
    status: str
    pipeline: str
    output: str | None = None
    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0
    batch_id: str | None = None
    attempt: int = 1
    message: dict[str, Any] | None = None
    error_type: str | None = None
    error_message: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    request: dict[str, Any] | None = None
    source: dict[str, Any] | None = None
    # The answer as JSON (structured output, or a tool's input); ``output`` then holds it
    # as JSON text, so a sink that knows only text still stores it.
    output_json: Any = None

    def to_dict(self) -> dict[str, Any]:
        """The documented JSON shape of this row (results or dead-letter line)."""
        if self.status == "dead_letter":
            return {
                "key": self.key,
                "custom_id": self.custom_id,
                "pipeline": self.pipeline,
                "error_type": self.error_type,
                "error_message": self.error_message,
                "attempts": self.attempt,
                "history": self.history,
                "request": self.request,
                "source": self.source,
                "batch_id": self.batch_id,
            }
        out: dict[str, Any] = {
            "key": self.key,
            "custom_id": self.custom_id,
            "pipeline": self.pipeline,
            "status": self.status,
            "output": self.output if self.output_json is None else self.output_json,
            "model": self.model,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cost_usd": self.cost_usd,
            "batch_id": self.batch_id,
            "attempt": self.attempt,
        }
        if self.message is not None:
            out["message"] = self.message
        return out
