"""
What each model accepts, judged from the model catalog (daemon/models/catalog.toml).

Models differ in what they reject (shared/BATCHES_API.md §2): their output
ceiling, thinking types, effort, forced tool choice, prefill, structured
output, ``inference_geo``, and under 2023-06-01 their sampling settings.
Each rule's message names the param and the model, so a dead-lettered row
says what to change.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from batchd.daemon.emulator.thinking import effective_effort, thinking_type
from batchd.daemon.emulator.versions import SAMPLING_PARAMS
from batchd.daemon.models.catalog import EFFORTS, Catalog, ModelInfo, effort_at_most

__all__ = ("check_model", "max_output_for", "resolve_model")

_FORCED = frozenset({"any", "tool"})


def resolve_model(
    catalog: Catalog, model_id: str, today: dt.date
) -> tuple[ModelInfo | None, str | None]:
    """``(info, None)`` for a model that answers today, else ``(None, not_found message)``."""
    found = catalog.lookup(model_id)
    if found.model is not None and not found.model.retired_on(today):
        return found.model, None
    if found.retired is not None and today >= found.retired:
        return None, (
            f"model: {model_id} was retired on {found.retired.isoformat()} and no longer "
            "answers; use a current model"
        )
    return None, f"model: {model_id}"


def max_output_for(info: ModelInfo, betas: frozenset[str], beta_300k: str | None) -> int:
    """The model's ``max_tokens`` ceiling, raised by the batch-only 300K beta where it applies."""
    if beta_300k is not None and beta_300k in betas and info.max_output_beta is not None:
        return info.max_output_beta
    return info.max_output


def _prefill(params: dict[str, Any]) -> bool:
    messages = params["messages"]
    return len(messages) > 1 and messages[-1].get("role") == "assistant"


def _output_format(params: dict[str, Any]) -> Any:
    config = params.get("output_config")
    if isinstance(config, dict) and config.get("format") is not None:
        return config["format"]
    return params.get("output_format")


def _has_citations(params: dict[str, Any]) -> bool:
    for message in params["messages"]:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for block in content:
            citations = block.get("citations") if isinstance(block, dict) else None
            if isinstance(citations, dict) and citations.get("enabled"):
                return True
    return False


def check_model(
    params: dict[str, Any],
    info: ModelInfo,
    *,
    max_output: int,
    sampling_by_model: bool,
    prompt_tokens: int,
) -> str | None:
    """The message for the first rule of ``info`` these params break, or None."""
    model = params["model"]
    max_tokens: int = params["max_tokens"]
    if max_tokens > max_output:
        return (
            f"max_tokens: {max_tokens} > {max_output}, which is the maximum allowed number "
            f"of output tokens for {model}"
        )
    if prompt_tokens + 1 > info.context_window:
        return f"prompt is too long: {prompt_tokens} tokens > {info.context_window - 1} maximum"
    kind = thinking_type(params, info)
    explicit = isinstance(params.get("thinking"), dict)
    if explicit and kind not in info.thinking_types:
        accepted = ", ".join(sorted(info.thinking_types))
        return (
            f"thinking.type: {kind!r} is not supported by {model} (it accepts: {accepted})"
        )
    config = params.get("output_config")
    effort = config.get("effort") if isinstance(config, dict) else None
    if effort is not None:
        if not info.efforts:
            return f"output_config.effort: {model} does not support the effort parameter"
        if effort not in info.efforts:
            accepted = ", ".join(e for e in EFFORTS if e in info.efforts)
            return f"output_config.effort: {effort!r} is not supported by {model} ({accepted})"
    if explicit and kind == "disabled" and info.disabled_max_effort is not None:
        in_force = effective_effort(params, info)
        if not effort_at_most(in_force, info.disabled_max_effort):
            return (
                f"thinking.type: 'disabled' on {model} needs effort "
                f"{info.disabled_max_effort} or lower (effort in force: {in_force})"
            )
    choice = params.get("tool_choice")
    forced_type = choice.get("type") if isinstance(choice, dict) else None
    forced = forced_type in _FORCED
    if forced and not info.forced_tool_choice:
        return (
            f"tool_choice.type: {forced_type!r} forces tool use, which {model} does not "
            "support; use 'auto' or 'none'"
        )
    if forced and kind == "enabled":
        return "tool_choice: thinking may not be enabled when tool_choice forces tool use"
    fmt = _output_format(params)
    if fmt is not None:
        if not info.structured_output:
            return f"output_config.format: structured outputs are not supported by {model}"
        if _prefill(params):
            return "output_config.format: structured outputs cannot be combined with prefill"
        if _has_citations(params):
            return "output_config.format: structured outputs cannot be combined with citations"
    if _prefill(params) and not info.prefill:
        return (
            f"messages: prefilling the assistant message is not supported for {model} "
            "(the last message must be a user message)"
        )
    if params.get("inference_geo") == "us" and not info.inference_geo_us:
        return f"inference_geo: 'us' is not supported by {model}"
    if sampling_by_model:
        return _check_sampling(params, info, thinking=kind in ("enabled", "adaptive"))
    return None


def _check_sampling(params: dict[str, Any], info: ModelInfo, *, thinking: bool) -> str | None:
    """Sampling under 2023-06-01 (TT, DEP); ranges were checked with the schema."""
    given = {name: params[name] for name in SAMPLING_PARAMS if params.get(name) is not None}
    if not given:
        return None
    model = params["model"]
    if info.sampling == "default_only":
        if "temperature" in given and "top_p" in given:
            return f"temperature and top_p cannot both be specified for {model}"
        if "top_k" in given:
            return f"top_k: {model} does not support top_k"
        for name in ("temperature", "top_p"):
            if name in given and given[name] != 1:
                return (
                    f"{name}: {model} only supports the default value 1 "
                    f"(got {given[name]!r}); omit it"
                )
        return None
    if thinking:
        if "temperature" in given and given["temperature"] != 1:
            return "temperature: may only be set to 1 when thinking is enabled"
        if "top_k" in given:
            return "top_k: is not supported when thinking is enabled"
        if "top_p" in given and not 0.95 <= given["top_p"] <= 1:
            return "top_p: must be between 0.95 and 1 when thinking is enabled"
    return None
