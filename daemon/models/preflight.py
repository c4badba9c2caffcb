"""
Pre-flight checks: would the model take this request at all?

A batch validates its rows only after the whole batch has run, so a request the
model rejects (a retired model, ``max_tokens`` above its ceiling, a thinking mode
or effort it does not take) costs hours and comes back as thousands of errored
rows. The model catalog knows each model's rules; this module applies them before
anything is read or sent: to a pipeline's constant model at start (``batchd run``
exits 2 naming file, table, key and rule), and to a model named per record (a
``{field}`` in ``model``) for each record, which is then dead-lettered with the
reason before any request is paid for.

A model the catalog does not know is allowed with a warning: the API decides,
and a catalog is always a little behind the API.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import structlog

from batchd.daemon.config import Config, PipelineConfig, RequestConfig
from batchd.daemon.intake.shaper import ModelCheck
from batchd.daemon.models.catalog import EFFORTS, Catalog, CatalogError, ModelInfo, with_models
from batchd.daemon.models.pricing import CHARS_PER_TOKEN, PriceTable
from batchd.plugins.errors import ConfigError

__all__ = (
    "ModelCheck",
    "Verdict",
    "catalog_for",
    "check_model",
    "preflight",
    "record_check",
)

log = structlog.get_logger("batchd.preflight")



@dataclass(slots=True)
class Verdict:
    """What the catalog says of one model for one ``[pipeline.request]``."""

    model: str
    errors: list[tuple[str, str]] = field(default_factory=list)  # (key, rule)
    warnings: list[str] = field(default_factory=list)
    info: ModelInfo | None = None

    def reason(self) -> str | None:
        if not self.errors:
            return None
        return "; ".join(f"{key}: {rule}" for key, rule in self.errors)


def catalog_for(config: Config) -> Catalog:
    """The bundled catalog with the config's ``[models]`` tables on top."""
    try:
        return with_models(config.models, f"{config.path}: [models]")
    except CatalogError as exc:
        raise ConfigError(str(exc)) from None


def _thinking_on(request: RequestConfig, info: ModelInfo) -> bool:
    thinking = request.options.thinking
    if thinking is None:
        return info.thinks_by_default()
    return thinking.type != "disabled"


def check_model(
    model: str,
    request: RequestConfig,
    *,
    catalog: Catalog,
    api_version: str,
    today: dt.date | None = None,
) -> Verdict:
    """Every rule of the catalog that ``model`` and ``request`` break, each with its key."""
    today = today or dt.datetime.now(dt.UTC).date()
    verdict = Verdict(model)
    found = catalog.lookup(model)
    errors = verdict.errors
    if found.retired is not None and today >= found.retired:
        current = sorted(m.id for m in catalog if m.status == "active" and not m.retired_on(today))
        errors.append(("model", f"{model} was retired on {found.retired.isoformat()}; requests "
                       f"to it fail (current models: {', '.join(current)})"))
        return verdict
    info = found.model
    if info is None:
        verdict.warnings.append(
            f"{model} is not in the model catalog: it is sent as written and the API "
            f'decides; describe it with [models."{model}"] like = "<a catalog model>" to have '
            f"it checked, and price it with [prices.\"{model}\"]"
        )
        return verdict
    verdict.info = info
    options = request.options
    max_tokens = request.max_tokens
    if found.retired is not None:
        verdict.warnings.append(f"{model} is deprecated and retires on "
                                f"{found.retired.isoformat()}")
    if max_tokens > info.max_output:
        errors.append(("max_tokens", f"{max_tokens:,} is above {model}'s limit of "
                       f"{info.max_output:,} output tokens"))
    effort = options.effort
    if effort is not None and effort not in info.efforts:
        if not info.efforts:
            errors.append(("effort", f"{model} does not take effort (leave it out)"))
        else:
            errors.append(("effort", f"{model} takes effort {', '.join(info.efforts)}, "
                           f"not {effort!r}"))
    thinking = options.thinking
    if thinking is not None:
        accepted = ", ".join(t for t in ("disabled", "adaptive", "enabled", "between_tools")
                             if t in info.thinking_types)
        if thinking.type not in info.thinking_types:
            shown = "{budget_tokens = N}" if thinking.type == "enabled" else f'"{thinking.type}"'
            always = " (it always thinks)" if "disabled" not in info.thinking_types else ""
            errors.append(("thinking", f"{model} rejects thinking = {shown}{always}; it "
                           f"takes {accepted}"))
        elif thinking.type == "disabled" and info.disabled_max_effort is not None:
            used = effort or info.effort_default
            if used is not None and used in EFFORTS and EFFORTS.index(used) > EFFORTS.index(
                info.disabled_max_effort
            ):
                key = "effort" if effort is not None else "thinking"
                errors.append((key, f'{model} takes thinking = "disabled" only at effort '
                               f"{info.disabled_max_effort} or lower, and the effort is {used}"))
        if thinking.type == "enabled" and thinking.budget_tokens is not None and (
            thinking.budget_tokens >= max_tokens
        ):
            errors.append(("thinking", f"budget_tokens ({thinking.budget_tokens:,}) must be "
                           f"below max_tokens ({max_tokens:,}): thinking counts toward "
                           "max_tokens"))
    if options.output_schema is not None and not info.structured_output:
        errors.append(("output_schema", f"{model} does not take structured output "
                       "(output_config.format)"))
    if options.forced_tool:
        if not info.forced_tool_choice:
            errors.append(("tool_choice", f"{model} rejects a forced tool_choice (any/tool); "
                           'use "auto"'))
        elif thinking is not None and thinking.type == "enabled":
            errors.append(("tool_choice", "a forced tool_choice (any/tool) is rejected with "
                           "manual thinking ({budget_tokens = N})"))
    if options.inference_geo == "us" and not info.inference_geo_us:
        errors.append(("inference_geo", f'{model} rejects inference_geo = "us"'))
    _check_sampling(verdict, request, info, api_version)
    _advise(verdict, request, info)
    return verdict


def _check_sampling(
    verdict: Verdict, request: RequestConfig, info: ModelInfo, api_version: str
) -> None:
    """Under 2023-06-01 each model judges sampling its own way (the catalog's ``sampling``)."""
    sampling = request.options.sampling
    if not sampling or api_version >= "2026-10-21":
        return  # the config check already refused sampling under the newer version
    model = info.id
    if info.sampling == "default_only":
        if "temperature" in sampling and "top_p" in sampling:
            verdict.errors.append(("top_p", f"{model} rejects temperature and top_p together, "
                                   "even at their defaults"))
        for key in ("top_p", "top_k"):
            if key in sampling:
                verdict.errors.append((key, f"{model} rejects non-default sampling; remove {key}"))
        temperature = sampling.get("temperature")
        if temperature is not None and temperature != 1:
            verdict.errors.append(("temperature", f"{model} takes only the default temperature "
                                   f"1, got {temperature}"))
        return
    if _thinking_on(request, info):
        for key in ("temperature", "top_k"):
            if key in sampling:
                verdict.errors.append((key, f"{model} rejects {key} while thinking; set "
                                       'thinking = "disabled" or remove it'))
        top_p = sampling.get("top_p")
        if top_p is not None and not 0.95 <= top_p <= 1:
            verdict.errors.append(("top_p", f"{model} takes top_p only between 0.95 and 1 "
                                   f"while thinking, got {top_p}"))


def _advise(verdict: Verdict, request: RequestConfig, info: ModelInfo) -> None:
    """Warnings: what will work, but not as the operator probably means it."""
    options = request.options
    adaptive = options.thinking is not None and options.thinking.type == "adaptive"
    if (adaptive or (options.thinking is None and info.thinks_by_default())) and (
        request.max_tokens < 1024
    ):
        advice = ('set thinking = "disabled"' if "disabled" in info.thinking_types
                  else "set a lower effort or a larger max_tokens")
        why = ("thinking is on (adaptive)" if adaptive
               else f"{info.id} thinks unless told otherwise")
        verdict.warnings.append(
            f"{why}, and thinking counts toward max_tokens "
            f"({request.max_tokens}): answers may end with no text (dead letter no_answer); "
            f"{advice}"
        )
    if options.cache and request.system:
        tokens = -(-len(request.system) // CHARS_PER_TOKEN)
        if tokens < info.min_cache_tokens:
            verdict.warnings.append(
                f"cache = {options.cache!r}: the system prompt (~{tokens:,} tokens) is shorter "
                f"than {info.id}'s minimum cacheable prompt ({info.min_cache_tokens:,} tokens), "
                "so it is silently not cached"
            )


def _where(config: Config, pipeline: PipelineConfig) -> str:
    return f"{config.path}: [pipeline.request] of {pipeline.name!r}"


def preflight_problems(
    config: Config, *, today: dt.date | None = None, params: bool = True
) -> tuple[list[ConfigError], list[tuple[str, str]]]:
    """
    Every broken model rule of every pipeline's constant model, and the warnings.

    ``batchd validate`` lists them all; ``run`` and ``estimate`` stop at the first.
    Warnings are ``(pipeline, message)``. ``params``: also judge each request's constant
    params as the API would (:mod:`batchd.daemon.models.request_check`, which imports the
    SDK: ``run`` leaves it to :func:`preflight`, after its logging is set up).
    """
    catalog = catalog_for(config)
    prices = PriceTable(config.prices, catalog=catalog, source=str(config.path))
    problems: list[ConfigError] = []
    warnings: list[tuple[str, str]] = []
    for pipeline in config.pipelines:
        request = pipeline.request
        where = _where(config, pipeline)
        if not request.model.is_constant:
            if pipeline.budget_usd is not None:
                warnings.append((pipeline.name, "the model is chosen per record: the budget "
                                 "bounds each chunk at the dearest known price"))
            continue
        model = request.model.source
        verdict = check_model(model, request, catalog=catalog, api_version=config.api.version,
                              today=today)
        problems.extend(
            ConfigError(f"{where}: {key}: {rule} (model catalog)") for key, rule in verdict.errors
        )
        warnings.extend((pipeline.name, warning) for warning in verdict.warnings)
        retired = any(key == "model" for key, _ in verdict.errors)
        if not retired and not prices.known(model):  # a retired model's price is moot
            if pipeline.budget_usd is not None:
                problems.append(ConfigError(
                    f"{where}: model: {model} has no price (neither in the model catalog nor "
                    f'in [prices]), so budget_usd cannot be kept; add [prices."{model}"] '
                    "input = …, output = …"
                ))
            else:
                warnings.append((pipeline.name, f"no price known for {model}: its cost is "
                                 "reported as unknown, never guessed"))
    if params:
        from batchd.daemon.models.request_check import request_problems

        problems.extend(request_problems(config))
    return problems, warnings


def preflight(config: Config, *, today: dt.date | None = None) -> Catalog:
    """
    Check every pipeline's constant model before anything is read; log the warnings.

    Returns the catalog in use (the bundled one plus the config's ``[models]``).

    Raises:
        ConfigError: the first rule broken, naming file, table, key, model and rule.
    """
    problems, warnings = preflight_problems(config, today=today)
    if problems:
        raise problems[0]
    for pipeline, message in warnings:
        log.warning("pre-flight", pipeline=pipeline, message=message)
    return catalog_for(config)


def record_check(
    pipeline: PipelineConfig, *, catalog: Catalog, api_version: str
) -> ModelCheck | None:
    """
    The per-record check for a model named by a record (None for a constant model).

    Each distinct model id is judged once; unknown ids are warned about once.
    """
    if pipeline.request.model.is_constant:
        return None
    seen: dict[str, str | None] = {}

    def check(model: str) -> str | None:
        if model in seen:
            return seen[model]
        verdict = check_model(model, pipeline.request, catalog=catalog, api_version=api_version)
        for warning in verdict.warnings:
            log.warning("pre-flight", pipeline=pipeline.name, message=warning)
        reason = verdict.reason()
        seen[model] = reason
        return reason

    return check

