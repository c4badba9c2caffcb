"""
The ``/_emulator`` endpoints: what tests use to steer and inspect the emulator.

They sit outside ``/v1`` so HTTP faults, ``slow`` and the request counters of
the API never touch them: a test must always be able to turn a fault off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from batchd.daemon.emulator.wire import ApiError, json_response, rfc3339

if TYPE_CHECKING:
    from batchd.daemon.emulator.service import EmulatorService

__all__ = ("add_admin_routes",)


async def _json_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body, or a 400 naming the problem."""
    raw = await request.read()
    try:
        body = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise ApiError("invalid_request_error", f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_request_error", "body must be a JSON object")
    return body


def add_admin_routes(app: web.Application, key: web.AppKey[EmulatorService]) -> None:
    """Register the admin endpoints on ``app``; ``key`` finds the service."""

    async def get_faults(request: web.Request) -> web.StreamResponse:
        return json_response(request.app[key].get_faults())

    async def set_faults(request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        try:
            return json_response(request.app[key].set_faults(**body))
        except ValueError as exc:
            raise ApiError("invalid_request_error", str(exc)) from None

    async def clock(request: web.Request) -> web.StreamResponse:
        service = request.app[key]
        if request.method == "POST":
            body = await _json_object(request)
            try:
                service.advance_clock(float(body.get("advance_seconds", 0)))
            except (TypeError, ValueError) as exc:
                raise ApiError("invalid_request_error", f"advance_seconds: {exc}") from None
        store = service.store
        return json_response({"offset_seconds": store.clock_offset, "now": rfc3339(store.now())})

    async def stats(request: web.Request) -> web.StreamResponse:
        return json_response(request.app[key].stats())

    async def reset(request: web.Request) -> web.StreamResponse:
        await request.app[key].reset()
        return json_response({"reset": True})

    app.router.add_get("/_emulator/faults", get_faults)
    app.router.add_post("/_emulator/faults", set_faults)
    app.router.add_get("/_emulator/clock", clock)
    app.router.add_post("/_emulator/clock", clock)
    app.router.add_get("/_emulator/stats", stats)
    app.router.add_post("/_emulator/reset", reset)
