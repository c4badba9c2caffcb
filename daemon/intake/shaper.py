"""
Turns a record into Messages ``params`` from the pipeline's request template.

A record that cannot be shaped (a missing field) is that record's problem:
:class:`ShapeError` carries the reason to the dead-letter sink and the run
goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from batchd.daemon.config import PipelineConfig
from batchd.daemon.intake.template import MissingField
from batchd.plugins.manager import load_plugins, pm
from batchd.plugins.records import Record

__all__ = ("ModelCheck", "ModelRejected", "ShapeError", "Shaper")

#: ``model id -> None`` when the model takes the request, else why not (``models.preflight``).
ModelCheck = Callable[[str], str | None]


class ShapeError(Exception):
    """The record cannot become a request; the message says why."""

    error_type = "shape_error"


class ModelRejected(ShapeError):
    """The record names a model that would reject the request (pre-flight, per record)."""

    error_type = "model_rejected"


class Shaper:
    """Builds params for one pipeline; the constant parts are built once."""

    def __init__(self, pipeline: PipelineConfig, model_check: ModelCheck | None = None) -> None:
        self.pipeline = pipeline
        self._model_check = model_check
        request = pipeline.request
        base: dict[str, Any] = {"max_tokens": request.max_tokens}
        base.update(request.options.params(request.system))
        base.update(request.extra)
        self._base = base
        self._model = request.model
        self._constant_model = request.model.source if request.model.is_constant else None
        self._user = request.user
        load_plugins()
        self._hooked = bool(pm.hook.batchd_shape_request.get_hookimpls())

    def params(self, record: Record) -> dict[str, Any]:
        # Templates may use the record's fields and ``{key}``.
        values, key = record.fields, record.key
        try:
            model = self._constant_model or self._model.render(values, key)
            user = self._user.render(values, key)
        except MissingField as exc:
            raise ShapeError(str(exc)) from None
        if self._model_check is not None:
            reason = self._model_check(model)
            if reason is not None:
                raise ModelRejected(f"{reason} (model catalog)")
        if not self._hooked and not user.strip():
            # The API answers an empty message with invalid_request_error: say so before
            # a batch round trip, naming the template.
            raise ShapeError(f"the user message is empty (template {self._user.source!r})")
        params = dict(self._base)
        params["model"] = model
        params["messages"] = [{"role": "user", "content": user}]
        if self._hooked:
            replaced = pm.hook.batchd_shape_request(
                pipeline=self.pipeline.name, record=record, params=params
            )
            if replaced is not None:
                if not isinstance(replaced, dict):
                    raise ShapeError(
                        f"batchd_shape_request returned {type(replaced).__name__}, not a dict"
                    )
                params = replaced
        return params

    def preferred_custom_id(self, record: Record) -> str | None:
        template = self.pipeline.custom_id
        if template is None:
            return None
        try:
            return template.render(record.fields, record.key)
        except MissingField:
            return None
