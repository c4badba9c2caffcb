"""
What the metrics port serves: ``/metrics``, ``/healthz``, ``/readyz`` and the dashboard.

Everything is read-only (GET and HEAD; anything else is 405) and answered from
the server's own threads, so a slow client never delays the event loop. What
lives on the loop (the manifest's state) is read *on* the loop through
:class:`LoopBridge`, with a timeout: the HTTP threads never iterate the loop's
dicts while it mutates them, and a wedged loop makes a page say so instead of
hanging it. Only the configured address is bound (``[metrics] address``,
127.0.0.1 by default).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from batchd.daemon.ops.health import Health
from batchd.daemon.ops.metrics import Metrics, MetricsServer

if TYPE_CHECKING:
    from batchd.daemon.config import Config

__all__ = ("DaemonView", "LoopBridge", "WebApp", "start_web_server")

T = TypeVar("T")
StartResponse = Callable[..., Any]
_LOOP_TIMEOUT = 3.0
_SECURITY_HEADERS = [
    # No scripts, no frames, no outside requests: the page is HTML and inline CSS only.
    ("Content-Security-Policy",
     "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
     "frame-ancestors 'none'; base-uri 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]


class LoopUnresponsive(Exception):
    """The event loop did not run a call within the timeout (it is wedged or busy)."""


class LoopBridge:
    """Runs a function on the daemon's event loop from an HTTP thread and waits for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float = _LOOP_TIMEOUT) -> None:
        self.loop = loop
        self.timeout = timeout

    def call(self, fn: Callable[[], T]) -> T:
        timeout = self.timeout
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        try:
            self.loop.call_soon_threadsafe(run)
            return future.result(timeout)
        except (concurrent.futures.TimeoutError, RuntimeError):
            future.cancel()
            raise LoopUnresponsive(f"the event loop did not answer within {timeout:.0f}s") \
                from None


class DaemonView:
    """
    What the dashboard and /readyz need from a running daemon, read on its loop.

    *manifest* is what the runtime reads its state from: the local manifest, or in
    cluster mode the worker's view of the shared store (every worker's chunks).
    """

    def __init__(self, daemon: Any, manifest: Any, bridge: LoopBridge) -> None:
        self.daemon = daemon
        self.manifest = manifest
        self.bridge = bridge

    @property
    def config(self) -> Config:
        config: Config = self.daemon.config  # a frozen object, swapped whole on reload
        return config

    def status(self) -> dict[str, Any]:
        watch = getattr(self.daemon, "cluster_watch", None)
        result: dict[str, Any] = self.bridge.call(
            lambda: self.daemon.live.snapshot(self.daemon.config, self.manifest,
                                              None if watch is None else watch.shown()))
        return result

    def paused(self) -> dict[str, str | None]:
        def read() -> dict[str, str | None]:
            return {name: state.paused for name, state in self.manifest.state.pipelines.items()
                    if name in {p.name for p in self.daemon.config.pipelines}}
        return self.bridge.call(read)

    def family(self, pipeline: str, root: str) -> list[dict[str, Any]]:
        from batchd.daemon.commands.show import chunk_family

        return self.bridge.call(lambda: chunk_family(self.manifest.state, pipeline, root))


class WebApp:
    """The WSGI application behind the metrics port."""

    def __init__(self, metrics: Metrics, health: Health, view: DaemonView | None = None) -> None:
        self.metrics_app = make_wsgi_app(metrics.registry)
        self.health = health
        self.view = view

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO") or "/"
        if method not in ("GET", "HEAD"):
            return self._send(start_response, 405, b"read-only: GET and HEAD only\n",
                              "text/plain; charset=utf-8", [("Allow", "GET, HEAD")])
        if path == "/metrics":
            result: Iterable[bytes] = self.metrics_app(environ, start_response)
            return result
        if path == "/healthz":
            code, payload = self.health.liveness()
            return self._send(start_response, code, Health.body(payload), "application/json")
        if path == "/readyz":
            return self._ready(start_response)
        if path == "/" and self.view is not None:
            return self._overview(start_response)
        if path == "/key" and self.view is not None:
            query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""))
            return self._key(start_response, query)
        return self._send(start_response, 404, b"not found: try /, /metrics, /healthz, /readyz\n",
                          "text/plain; charset=utf-8")

    @staticmethod
    def _send(start_response: StartResponse, code: int, body: bytes, content_type: str,
              headers: list[tuple[str, str]] | None = None) -> list[bytes]:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
                  503: "Service Unavailable", 400: "Bad Request"}.get(code, "")
        start_response(f"{code} {reason}", [
            ("Content-Type", content_type), ("Content-Length", str(len(body))),
            *_SECURITY_HEADERS, *(headers or [])])
        return [body]

    def _ready(self, start_response: StartResponse) -> list[bytes]:
        paused: dict[str, str | None] | None = {}
        if self.view is not None:
            try:
                paused = self.view.paused()
            except LoopUnresponsive:
                paused = None
        code, payload = self.health.readiness(paused)
        return self._send(start_response, code, Health.body(payload), "application/json")

    def _title(self) -> str:
        assert self.view is not None
        return str(self.view.config.path)

    def _overview(self, start_response: StartResponse) -> list[bytes]:
        from batchd.daemon.ops.dashboard import render_overview
        from batchd.daemon.ops.dashboard.dead_letters import newest_dead_letters

        assert self.view is not None
        try:
            status = self.view.status()
        except LoopUnresponsive as exc:
            return self._send(start_response, 503, f"batchd: {exc}\n".encode(),
                              "text/plain; charset=utf-8")
        config = self.view.config
        dead = {p.name: newest_dead_letters(config, p) for p in config.pipelines}
        page = render_overview(status, dead, title=self._title())
        return self._send(start_response, 200, page.encode(), "text/html; charset=utf-8")

    def _key(self, start_response: StartResponse, query: dict[str, list[str]]) -> list[bytes]:
        from batchd.daemon.commands.show import key_history
        from batchd.daemon.ops.dashboard import render_key

        assert self.view is not None
        view = self.view
        config = view.config
        names = [p.name for p in config.pipelines]
        key = (query.get("key") or [""])[0]
        name = (query.get("pipeline") or names[:1] or [""])[0]
        if not key or name not in names:
            return self._send(start_response, 400, b"give ?pipeline=NAME&key=KEY\n",
                              "text/plain; charset=utf-8")
        pipeline = config.pipeline(name)
        try:
            history = key_history(config, pipeline, key,
                                  family_of=lambda root: view.family(name, root))
        except LoopUnresponsive as exc:
            return self._send(start_response, 503, f"batchd: {exc}\n".encode(),
                              "text/plain; charset=utf-8")
        page = render_key(history, title=self._title(), pipelines=names)
        return self._send(start_response, 200, page.encode(), "text/html; charset=utf-8")


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged: stderr would interleave with the JSON log lines."""


class _ThreadingServer(WSGIServer):
    """One thread per request, so a slow client never holds up a scrape or a probe."""

    daemon_threads = True

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(target=self._handle, args=(request, client_address),
                                  daemon=True)
        thread.start()

    def _handle(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client hanging up mid-answer is not worth a traceback on stderr."""


def start_web_server(app: WebApp, host: str, port: int) -> MetricsServer:
    """
    Serve ``app`` on ``host:port`` from a daemon thread; port 0 picks a free one.

    Raises:
        OSError: the address cannot be bound (the port is taken, the address is not here).
    """

    class Server(_ThreadingServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(host, port, app, server_class=Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="batchd-web", daemon=True)
    thread.start()
    return MetricsServer(host=host, port=server.server_port, _server=server, _thread=thread)
