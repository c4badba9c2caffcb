"""
What the API checks, split the way the API splits it.

`check_request` is the create-time check that fails the whole batch (HTTP
400). `RowJudge` is the asynchronous per-request check (BATCH: "validation
errors are returned when processing of the entire batch has ended"): its
verdict never fails the create, it makes that one request end ``errored``.
It runs the checks in the order the API resolves a request: the params'
schema (`strict_params`), the batch's API version (`versions`), the cache
breakpoints (`cache`), the model's existence, then the model's own rules
(`model_rules`).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any

from batchd.daemon.emulator.cache import check_breakpoints
from batchd.daemon.emulator.model_rules import check_model, max_output_for, resolve_model
from batchd.daemon.emulator.prompt import has_cache_marker, prompt_chars, prompt_units, tokens
from batchd.daemon.emulator.strict_params import check_strict
from batchd.daemon.emulator.versions import ApiVersion, check_version_rules
from batchd.daemon.models.catalog import Catalog

__all__ = ("CUSTOM_ID_PATTERN", "BatchContext", "RowJudge", "check_request")

CUSTOM_ID_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def check_request(index: int, item: Any) -> str:
    """
    The custom_id of ``requests[index]`` after the create-time checks.

    Raises:
        ValueError: a message naming the index (and custom_id) at fault.
    """
    where = f"requests.{index}"
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object with custom_id and params")
    custom_id = item.get("custom_id")
    if custom_id is None:
        raise ValueError(f"{where}.custom_id: Field required")
    if not isinstance(custom_id, str) or not CUSTOM_ID_PATTERN.fullmatch(custom_id):
        raise ValueError(
            f"{where}.custom_id: {custom_id!r} does not match pattern ^[a-zA-Z0-9_-]{{1,64}}$"
        )
    params = item.get("params")
    if params is None:
        raise ValueError(f"{where}.params: Field required (custom_id {custom_id!r})")
    if not isinstance(params, dict):
        raise ValueError(f"{where}.params: expected an object (custom_id {custom_id!r})")
    return custom_id


@dataclass(frozen=True)
class BatchContext:
    """
    What a batch's create call said besides its body, which its rows are judged by.

    Args:
        version: the ``anthropic-version`` of the create call.
        betas: the ``anthropic-beta`` values (e.g. the batch-only 300K output beta).
        user_profile_id, workspace_id: the create call's headers of those names.
        today: the virtual day of the create (retirements are judged by it).
    """

    version: ApiVersion
    betas: frozenset[str] = frozenset()
    user_profile_id: str | None = None
    workspace_id: str | None = None
    today: dt.date = dt.date(2026, 12, 1)


class RowJudge:
    """The per-request verdict for one batch: ``(error_type, message)`` or None."""

    def __init__(self, catalog: Catalog, context: BatchContext) -> None:
        self.catalog = catalog
        self.context = context

    def __call__(self, params: dict[str, Any]) -> tuple[str, str] | None:
        context = self.context
        problem = check_strict(
            params,
            context.version,
            beta=bool(context.betas),
            user_profile_id=context.user_profile_id,
            workspace_id=context.workspace_id,
        )
        if problem is None:
            problem = check_version_rules(context.version, params)
        if problem is not None:
            return ("invalid_request_error", problem)
        if has_cache_marker(params):
            problem = check_breakpoints(prompt_units(params, keys=False))
            if problem is not None:
                return ("invalid_request_error", problem)
        info, missing = resolve_model(self.catalog, params["model"], context.today)
        if info is None:
            return ("not_found_error", missing or f"model: {params['model']}")
        problem = check_model(
            params,
            info,
            max_output=max_output_for(info, context.betas, self.catalog.beta_output_300k),
            sampling_by_model=context.version.sampling_by_model,
            prompt_tokens=tokens(prompt_chars(params)),
        )
        if problem is not None:
            return ("invalid_request_error", problem)
        return None
