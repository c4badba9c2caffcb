"""
The Message Batches endpoints over HTTP, answering as the real API does.

One middleware gives every response its ``request-id`` and the API's error
shape, counts requests per endpoint, and applies the HTTP-level faults, so no
handler can forget any of that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from pathlib import Path
from typing import IO

import aiohttp
from aiohttp import web

from batchd.daemon.emulator.admin import add_admin_routes
from batchd.daemon.emulator.service import EmulatorService
from batchd.daemon.emulator.validation import BatchContext
from batchd.daemon.emulator.versions import ApiVersion, version_from_header
from batchd.daemon.emulator.wire import (
    ApiError,
    error_body,
    json_response,
    new_id,
    retry_after_header,
)

__all__ = ("SERVICE_KEY", "build_app")

SERVICE_KEY = web.AppKey("service", EmulatorService)
REQUEST_ID = web.RequestKey("request_id", str)
API_VERSION = web.RequestKey("api_version", ApiVersion)
_log = logging.getLogger(__name__)
_BATCHES = "/v1/messages/batches"
_CHUNK = 1024 * 1024
_HTTP_ERROR_TYPES = {404: "not_found_error", 405: "not_found_error", 413: "request_too_large"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Dropped(Exception):
    """The connection was closed on purpose; there is no response to send."""


def _endpoint(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return f"{request.method} {resource.canonical if resource is not None else '<unrouted>'}"


@web.middleware
async def _api_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    service = request.app[SERVICE_KEY]
    request_id = new_id("req_")
    request[REQUEST_ID] = request_id
    is_api = request.path.startswith("/v1/")
    if is_api:
        service.http_requests[_endpoint(request)] += 1
    try:
        if is_api:
            await _before_api_call(request, service)
        response = await handler(request)
    except ApiError as exc:
        response = json_response(
            error_body(exc.error_type, exc.message, request_id, exc.error_code),
            exc.status,
            exc.headers,
        )
        if is_api:
            service.count_http_error(exc.status, exc.error_code or exc.error_type)
    except web.HTTPException as exc:
        error_type = _HTTP_ERROR_TYPES.get(exc.status, "invalid_request_error")
        message = f"{request.method} {request.path}: {exc.reason}"
        response = json_response(error_body(error_type, message, request_id), exc.status)
        if is_api:
            service.count_http_error(exc.status, error_type)
    except _Dropped:
        raise asyncio.CancelledError from None
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        # The client went away mid-request (killed mid-upload, say): nobody to answer.
        raise asyncio.CancelledError from None
    except Exception as exc:
        # A bug in the emulator must still answer in the API's shape (and say so).
        _log.exception("emulator bug while handling %s %s", request.method, request.path)
        message = f"emulator internal error: {type(exc).__name__}: {exc}"
        response = json_response(error_body("api_error", message, request_id), 500)
        if is_api:
            service.count_http_error(500, "api_error")
    if not response.prepared:
        response.headers["request-id"] = request_id
        # The API's clock is the emulator's virtual one (created_at, expires_at): say so in
        # Date too, as clients measure their clock skew from it.
        response.headers["Date"] = formatdate(service.store.now(), usegmt=True)
    return response


def _auth_scheme(request: web.Request) -> str:
    """``x-api-key`` or ``bearer``: how the call authenticates (any non-empty key passes)."""
    if request.headers.get("x-api-key", "").strip():
        return "x-api-key"
    authorization = request.headers.get("authorization")
    if authorization is None:
        raise ApiError("authentication_error", "x-api-key header is required")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            "authentication_error", "Authorization header must be 'Bearer <API key>'"
        )
    return "bearer"


async def _before_api_call(request: web.Request, service: EmulatorService) -> None:
    """Authentication, ``anthropic-version``, the RPM limit, ``slow`` and the HTTP faults."""
    scheme = _auth_scheme(request)
    try:
        version = version_from_header(request.headers.get("anthropic-version"))
    except ValueError as exc:
        raise ApiError("invalid_request_error", str(exc)) from None
    request[API_VERSION] = version
    service.count_client(version.name, scheme)
    if request.path.startswith(_BATCHES):
        wait = service.rpm.admit(service.store.now(), service.faults.settings.rpm_limit)
        if wait is not None:
            service.faults.count("rpm_limit")
            raise ApiError(
                "rate_limit_error",
                f"Number of requests has exceeded your per-minute rate limit of "
                f"{service.faults.settings.rpm_limit} on the Message Batches endpoints",
                headers={"retry-after": retry_after_header(wait)},
            )
    slow = service.faults.settings.slow
    if slow > 0:
        service.faults.count("slow")
        await asyncio.sleep(slow)
    is_create = request.method == "POST" and request.path.rstrip("/") == _BATCHES
    fault = service.faults.http_fault(is_create=is_create)
    if fault is not None:
        headers = {}
        if fault.retry_after:
            headers["retry-after"] = retry_after_header(service.faults.settings.retry_after)
        raise ApiError(
            fault.error_type,
            f"{fault.message(service.store.now())} (emulator fault {fault.kind})",
            headers=headers,
            status=fault.status,
            error_code=fault.error_code,
        )


async def _create(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE_KEY]
    content_type = request.headers.get("Content-Type")
    if content_type is not None and not _is_json(request.content_type):
        raise ApiError(
            "invalid_request_error",
            f"Content-Type must be application/json, got {content_type!r}",
        )
    length, limit = request.content_length, service.config.max_body_bytes
    if length is not None and length > limit:
        raise ApiError(
            "request_too_large", f"Request body of {length} bytes exceeds the {limit}-byte limit"
        )
    headers = request.headers
    context = BatchContext(
        version=request[API_VERSION],
        betas=frozenset(
            beta.strip() for beta in headers.get("anthropic-beta", "").split(",") if beta.strip()
        ),
        user_profile_id=headers.get("anthropic-user-profile-id"),
        workspace_id=headers.get("anthropic-workspace-id"),
        today=service.store.today(),
    )
    batch = await service.store.create(request.content, context)
    if service.faults.drop_this_create():
        if request.transport is not None:
            request.transport.abort()
        raise _Dropped()
    return json_response(batch.to_api(_base_url(request)))


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or mimetype.endswith("+json")


def _base_url(request: web.Request) -> str:
    return str(request.url.origin())


async def _retrieve(request: web.Request) -> web.StreamResponse:
    store = request.app[SERVICE_KEY].store
    batch = store.get(request.match_info["batch_id"])
    if store.in_transient_404(batch):
        raise ApiError("not_found_error", f"Message Batch {batch.id!r} not found")
    return json_response(batch.to_api(_base_url(request)))


async def _list(request: web.Request) -> web.StreamResponse:
    store = request.app[SERVICE_KEY].store
    query = request.query
    raw_limit = query.get("limit", "20")
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 1000:
        raise ApiError(
            "invalid_request_error", f"limit: must be an integer 1..1000, got {raw_limit!r}"
        )
    before_id, after_id = query.get("before_id"), query.get("after_id")
    if before_id is not None and after_id is not None:
        raise ApiError("invalid_request_error", "before_id and after_id cannot both be given")
    page, has_more = store.list(limit, before_id, after_id)
    base = _base_url(request)
    return json_response(
        {
            "data": [batch.to_api(base) for batch in page],
            "has_more": has_more,
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
        }
    )


async def _cancel(request: web.Request) -> web.StreamResponse:
    store = request.app[SERVICE_KEY].store
    batch = store.cancel(request.match_info["batch_id"])
    return json_response(batch.to_api(_base_url(request)))


async def _delete(request: web.Request) -> web.StreamResponse:
    store = request.app[SERVICE_KEY].store
    batch_id = request.match_info["batch_id"]
    await store.delete(batch_id)
    return json_response({"id": batch_id, "type": "message_batch_deleted"})


async def _results(request: web.Request) -> web.StreamResponse:
    store = request.app[SERVICE_KEY].store
    batch = store.get(request.match_info["batch_id"])
    if store.in_transient_404(batch):
        raise ApiError("not_found_error", f"Message Batch {batch.id!r} not found")
    if batch.ended_at is None:
        raise ApiError(
            "invalid_request_error",
            f"Message Batch {batch.id} has not finished processing "
            f"(processing_status {batch.processing_status}); results exist once it has ended",
        )
    if batch.archived_at is not None:
        raise ApiError(
            "not_found_error", f"Results of Message Batch {batch.id} are archived and gone"
        )
    path = await store.results_file(batch)
    cut = store.cut_after(batch)
    response = web.StreamResponse(
        headers={"Content-Type": "application/x-jsonl", "request-id": request[REQUEST_ID]}
    )
    source = await asyncio.to_thread(path.open, "rb")
    try:
        if cut is None:
            response.content_length = await asyncio.to_thread(_size, path)
            await response.prepare(request)
            await _send_all(source, response)
        else:
            await response.prepare(request)
            await _send_lines(source, response, cut)
            if request.transport is not None:
                request.transport.abort()
            raise _Dropped()
    finally:
        await asyncio.to_thread(source.close)
    await response.write_eof()
    return response


def _size(path: Path) -> int:
    return path.stat().st_size


async def _send_all(source: IO[bytes], response: web.StreamResponse) -> None:
    loop = asyncio.get_running_loop()
    while chunk := await loop.run_in_executor(None, source.read, _CHUNK):
        await response.write(chunk)


async def _send_lines(source: IO[bytes], response: web.StreamResponse, lines: int) -> None:
    """Send the first ``lines`` lines of the file (fewer if it is shorter)."""
    loop = asyncio.get_running_loop()
    left = lines
    while left > 0 and (chunk := await loop.run_in_executor(None, source.read, _CHUNK)):
        end = 0
        while left > 0:
            newline = chunk.find(b"\n", end)
            if newline < 0:
                end = len(chunk)
                break
            end = newline + 1
            left -= 1
        await response.write(chunk[:end])


def build_app(service: EmulatorService) -> web.Application:
    """The aiohttp application serving the Batches API and the admin endpoints."""
    app = web.Application(middlewares=[_api_middleware], client_max_size=1024**2)
    app[SERVICE_KEY] = service
    app.router.add_post(_BATCHES, _create)
    app.router.add_get(_BATCHES, _list)
    app.router.add_get(_BATCHES + "/{batch_id}", _retrieve)
    app.router.add_delete(_BATCHES + "/{batch_id}", _delete)
    app.router.add_post(_BATCHES + "/{batch_id}/cancel", _cancel)
    app.router.add_get(_BATCHES + "/{batch_id}/results", _results)
    add_admin_routes(app, SERVICE_KEY)
    return app
