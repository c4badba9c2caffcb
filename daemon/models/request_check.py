"""
The constant part of each pipeline's request, judged as the API would judge every row.

``[pipeline.request]`` checks its own options for shape, but ``extra`` (anything
``MessageCreateParams`` has), server tools and the cache breakpoints that
``cache`` adds to a tool's own ``cache_control`` pass through unchecked. A batch
validates its rows only after the whole batch has run, so a field the API does not
take (``extra = {foo = 1}``, ``stream``, ``speed``, a ``service_tier`` outside its
enum) would come back hours later as one ``invalid_request_error`` dead letter per
row. The same strict rules the emulator applies (read from the installed SDK's
types, so they move with it) judge the request here, once, before a row is read.

Imports the SDK's types: ``batchd run`` calls this only after its logging is set
up (the SDK's import configures logging of its own when ``ANTHROPIC_LOG`` is set).
"""

from __future__ import annotations

from typing import Any

from batchd.daemon.config import Config, PipelineConfig
from batchd.daemon.intake.request_options import SAMPLING_KEYS
from batchd.plugins.errors import ConfigError

__all__ = ("request_problems",)

# A placeholder user turn: the template's text is the record's, never the config's.
_MESSAGES = [{"role": "user", "content": "x"}]


def _key(field: str, pipeline: PipelineConfig) -> str:
    """The config key a params field comes from."""
    request = pipeline.request
    if field in request.extra:
        return f"extra.{field}"
    if field == "cache_control" or (field == "system" and request.options.cache):
        return "cache"
    if field == "output_config":
        return "output_schema" if request.options.output_schema is not None else "effort"
    return field


def _problem(pipeline: PipelineConfig, params: dict[str, Any], version: str) -> str | None:
    from batchd.daemon.emulator.cache import check_breakpoints
    from batchd.daemon.emulator.prompt import has_cache_marker, prompt_units
    from batchd.daemon.emulator.strict_params import check_strict
    from batchd.daemon.emulator.versions import LATEST, VERSIONS

    problem = check_strict(params, VERSIONS.get(version, VERSIONS[LATEST]))
    if problem is None and has_cache_marker(params):
        problem = check_breakpoints(prompt_units(params, keys=False))
    return problem


def request_problems(config: Config) -> list[ConfigError]:
    """One error per pipeline whose constant params the API would reject in every row."""
    from batchd.plugins.manager import load_plugins, pm

    load_plugins()
    if pm.hook.batchd_shape_request.get_hookimpls():
        return []  # a plugin reshapes every request: judge what it sends, not this
    problems = []
    for pipeline in config.pipelines:
        request = pipeline.request
        params: dict[str, Any] = {"max_tokens": request.max_tokens}
        params.update(request.options.params(request.system))
        params.update(request.extra)
        for key in SAMPLING_KEYS:  # judged by the API version's own rule (config, preflight)
            params.pop(key, None)
        params["model"] = request.model.source if request.model.is_constant else "model"
        params["messages"] = _MESSAGES
        problem = _problem(pipeline, params, config.api.version)
        if problem is None:
            continue
        field = problem.split(":", 1)[0].split(".", 1)[0]
        where = f"{config.path}: [pipeline.request] of {pipeline.name!r}"
        error = ConfigError(f"{where}: {_key(field, pipeline)}: the API would reject every "
                            f"request ({problem})")
        error.file, error.table, error.key = (str(config.path), f"[pipeline.request] of "
                                              f"{pipeline.name!r}", _key(field, pipeline))
        problems.append(error)
    return problems
