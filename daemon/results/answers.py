"""
Reading a succeeded answer as today's API returns it.

A ``succeeded`` result is not always an answer. The output is the text of the
``text`` blocks (``thinking`` and ``redacted_thinking`` blocks never are; they
stay in ``message`` when ``keep_message`` is on), and ``stop_reason`` decides the
rest:

* ``end_turn`` / ``stop_sequence``: the answer.
* ``max_tokens`` with text: kept, flagged ``truncated`` (paying again gives the same).
* ``max_tokens`` with **no** text: the model spent the budget thinking; dead letter
  ``no_answer`` with what to change (models that think by default do this to a tight
  ``max_tokens``).
* ``refusal``: dead letter ``refusal`` with ``stop_details``; resending the same
  request would be refused again.
* ``model_context_window_exceeded``, ``pause_turn``: dead letters with the reason.
* ``tool_use``: the tool's input is the output (JSON).

With ``output_schema`` the text is parsed and validated (``jsonschema``); an
answer that is not JSON or does not match is ``invalid_output``. Every one of
these was billed: the caller counts its cost whatever the route.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from batchd.daemon.config import PipelineConfig
from batchd.daemon.models.catalog import EFFORTS, Catalog, default_catalog

__all__ = ("Answer", "AnswerReader", "Rejected")

_PLAIN_STOPS = frozenset({"end_turn", "stop_sequence"})


@dataclass(slots=True)
class Answer:
    """An answer worth keeping: its text, its JSON value (structured or tool output)."""

    text: str
    value: Any = None
    truncated: bool = False


@dataclass(slots=True)
class Rejected:
    """A billed answer that is not one; dead-lettered as ``error_type`` with ``message``."""

    error_type: str
    message: str


class AnswerReader:
    """Turns one succeeded ``message`` into an :class:`Answer` or a :class:`Rejected`."""

    def __init__(self, pipeline: PipelineConfig, catalog: Catalog | None = None) -> None:
        self.pipeline = pipeline
        self.catalog = catalog if catalog is not None else default_catalog()
        schema = pipeline.request.options.output_schema
        self._validator: Any = None
        if schema is not None:
            from jsonschema import validators

            self._validator = validators.validator_for(schema)(schema)

    def read(self, message: Mapping[str, Any]) -> Answer | Rejected:
        content: Any = message.get("content") or ()
        stop = message.get("stop_reason")
        if self._validator is None and stop in _PLAIN_STOPS and len(content) == 1:
            block = content[0]
            if block.get("type") == "text":
                return Answer(block.get("text", ""))  # the common case, nothing to build
        if stop == "refusal":
            return Rejected("refusal", _refusal(message))
        if stop == "model_context_window_exceeded":
            return Rejected("model_context_window_exceeded", self._context(message))
        if stop == "pause_turn":
            return Rejected("pause_turn", "the model paused a long server-tool turn "
                            "(stop_reason pause_turn); batchd sends single turns and does not "
                            "continue it: give the tools fewer steps or send the row again")
        texts = [b.get("text", "") for b in content if b.get("type") == "text"]
        if stop == "tool_use" or not texts:
            for block in content:
                if block.get("type") == "tool_use":
                    value = block.get("input")
                    return Answer(orjson.dumps(value).decode(), value)
        text = "".join(texts)
        if stop == "max_tokens" and not text:
            return Rejected("no_answer", self._advice(message))
        truncated = stop == "max_tokens"
        if self._validator is None:
            return Answer(text, None, truncated)
        return self._structured(text, truncated)

    def _structured(self, text: str, truncated: bool) -> Answer | Rejected:
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            cut = " (the answer hit max_tokens and was cut off)" if truncated else ""
            return Rejected("invalid_output", f"the answer is not JSON{cut}: {exc}; "
                            f"it begins {text[:80]!r}")
        error = next(iter(self._validator.iter_errors(value)), None)
        if error is not None:
            path = "/".join(str(p) for p in error.absolute_path) or "the root"
            return Rejected("invalid_output", f"the answer does not match output_schema at "
                            f"{path}: {error.message[:200]}")
        return Answer(text, value, truncated)

    def _context(self, message: Mapping[str, Any]) -> str:
        model = str(message.get("model") or "")
        info = self.catalog.get(model)
        window = f" ({info.context_window:,} tokens)" if info is not None else ""
        return (f"the prompt and max_tokens passed {model or 'the model'}'s context "
                f"window{window}; shorten the record's text or lower max_tokens")

    def _advice(self, message: Mapping[str, Any]) -> str:
        """Why a max_tokens answer has no text, and the three ways out."""
        request = self.pipeline.request
        max_tokens = request.max_tokens
        model = str(message.get("model") or "")
        usage = message.get("usage") or {}
        details = usage.get("output_tokens_details") or {}
        thinking = details.get("thinking_tokens") if isinstance(details, Mapping) else None
        spent = f" ({thinking:,} thinking tokens)" if isinstance(thinking, int) else ""
        ways: list[str] = []
        info = self.catalog.get(model)
        effort = request.options.effort or (info.effort_default if info else None)
        if info is None or "disabled" in info.thinking_types:
            cap = info.disabled_max_effort if info is not None else None
            at = f" ({model} takes it at effort {cap} or lower)" if cap and cap != "max" else ""
            ways.append(f'thinking = "disabled"{at}')
        else:
            ways.append(f"(thinking cannot be turned off: {model} always thinks)")
        if effort in EFFORTS and EFFORTS.index(effort) > 0 and (info is None or info.efforts):
            ways.append(f"a lower effort (now {effort})")
        ways.append(f"a larger max_tokens (now {max_tokens:,})")
        return (f"no answer: the model spent all {max_tokens:,} max_tokens on thinking{spent} "
                f"and wrote no text; set {', or '.join(ways)}")


def _refusal(message: Mapping[str, Any]) -> str:
    details = message.get("stop_details") or {}
    category = details.get("category") if isinstance(details, Mapping) else None
    explanation = details.get("explanation") if isinstance(details, Mapping) else None
    what = f" ({category})" if category else ""
    why = f": {explanation}" if explanation else ""
    return (f"the model refused{what}{why}; not retried, as the same request is refused "
            "again (stop_details kept in the message)")
