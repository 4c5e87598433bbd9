"""The front door: one OpenAI-compatible address for the whole fleet.

Clients name a role, an alias or a task type (the body's ``model``, or the
``X-Task-Type`` header); the Router picks an instance of that pool and the request
is proxied to it unchanged. Responses are forwarded chunk by chunk as they arrive
(server-sent events included), and a client that goes away closes the upstream
connection, which makes llama-server cancel the task and free the slot.

Run as a component of a stack: ``python -m modelfleet.api --config FILE --state-dir DIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from modelfleet import affinity, checkpoint, registry, upstream
from modelfleet.config import StackConfig, Tier, load_config_file
from modelfleet.errors import ApiError, ConnectFailed, FleetError, Stale, UpstreamError
from modelfleet.fleet import Lease
from modelfleet.lifecycle import State
from modelfleet.metrics import Metrics
from modelfleet.pool import Pool
from modelfleet.router import Router
from modelfleet.spec import BinaryInfo, find_llama_server, probe_binary
from modelfleet.stack import Stack
from modelfleet.wire import FrontDoorProtocol

log = logging.getLogger("modelfleet.api")

# Routes proxied to the pool named in the body (or X-Task-Type, or the default role).
MODEL_ROUTES = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/completion",
        "/completions",
        "/embedding",
        "/embeddings",
        "/tokenize",
        "/detokenize",
        "/rerank",
        "/v1/rerank",
        "/infill",
        "/apply-template",
    }
)
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
FORWARD_HEADERS = ("content-type", "accept")
_TOKENS = re.compile(rb'"(?:completion_tokens|predicted_n|tokens_predicted)"\s*:\s*(\d+)')
BAD_KEY = "missing or wrong {which}; send 'Authorization: Bearer <key>'"


@dataclasses.dataclass(frozen=True)
class Incoming:
    """What the proxy needs of a client request, however it arrived (Starlette or the fast path)."""

    method: str
    query: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes


def error_response(exc: FleetError) -> JSONResponse:
    """The one mapping of an error to an HTTP answer: OpenAI's shape, its status, its headers."""
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)


class FrontDoor:
    """The ASGI application and what it owns: the Router (with the HTTP client), the metrics."""

    def __init__(self, cfg: StackConfig, stack: Stack, monitor: bool = True) -> None:
        self.cfg = cfg
        self.stack = stack
        self.run_monitor = monitor
        self.router = Router(cfg, stack)
        # Served by wire.Exchange, uvicorn's request cycle bypassed (see wire.FrontDoorProtocol).
        self.fast_paths = frozenset(path.encode() for path in MODEL_ROUTES)
        self.max_body_bytes = cfg.api.max_body_bytes
        self.started = time.time()
        self.metrics = Metrics(self.router)
        self.app = Starlette(
            routes=self._routes(),
            lifespan=self._lifespan,
            exception_handlers={HTTPException: self._http_error},  # type: ignore[dict-item]
        )

    def _routes(self) -> list[Route]:
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
        return [  # the model routes are served by __call__, ahead of these
            Route("/v1/models", self._guard(self.models), methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/metrics", self._guard(self.metrics_route), methods=["GET"]),
            Route("/upstream/{role}/{path:path}", self._guard(self.upstream_route), methods=methods),
            Route("/admin/status", self._guard(self.admin_status, admin=True), methods=["GET"]),
            Route("/admin/checkpoints", self._guard(self.checkpoints, admin=True), methods=["GET", "POST"]),
            Route("/admin/checkpoints/{id}", self._guard(self.checkpoint_one, admin=True), methods=["POST", "DELETE"]),
            Route("/admin/{action}/{name}", self._guard(self.admin_action, admin=True), methods=["POST"]),
        ]

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.router.adopt()
        monitor = asyncio.create_task(self.router.monitor()) if self.run_monitor else None
        log.info("front door ready on %s:%s", self.cfg.api.host, self.cfg.api.port)
        try:
            yield
        finally:
            if monitor is not None:
                monitor.cancel()
                await asyncio.gather(monitor, return_exceptions=True)
            await self.router.close()  # and its HTTP client

    # --- access ------------------------------------------------------------------

    def _guard(
        self, handler: Callable[[Request], Awaitable[Response]], admin: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            try:
                self._check_key(request.headers, admin)
                return await handler(request)
            except FleetError as exc:
                return error_response(exc)

        return guarded

    def _check_key(self, headers: Mapping[str, str], admin: bool) -> None:
        """Client routes need the API key, admin routes the admin key (else the API key), when set."""
        api = self.cfg.api
        key = (api.admin_key or api.api_key) if admin else api.api_key
        if key is not None and _presented_key(headers) != key:
            which = "admin key" if admin and api.admin_key else "API key"
            raise ApiError(401, BAD_KEY.format(which=which), "authentication_error")

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        msg = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(ApiError(exc.status_code, msg, kind, headers=exc.headers))

    # --- proxy routes --------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry. The model routes take a fast path around Starlette's routing and
        middleware: they are the hot path, and on a small machine every layer shows."""
        if scope["type"] == "http" and scope["path"] in MODEL_ROUTES:
            response = await self._model_route(scope, receive)
            await response(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _model_route(self, scope: Scope, receive: Receive) -> Response:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if scope["method"] != "POST":
                msg = f"{scope['method']} {scope['path']}: Method Not Allowed"
                raise ApiError(405, msg, "invalid_request_error", headers={"Allow": "POST"})
            self._check_key(headers, admin=False)
            body = await self._read_body(headers, receive)
            incoming = Incoming("POST", scope["query_string"].decode("latin-1"), headers, body)
            return await self._model(incoming, scope["path"])
        except FleetError as exc:
            return error_response(exc)

    async def _model(self, incoming: Incoming, path: str) -> Response:
        payload = _parse_json(incoming.body)
        name = incoming.headers.get("x-task-type") or payload.get("model")
        if name is not None and not isinstance(name, str):
            raise ApiError(400, "'model' must be a string naming a role, alias or task type", "invalid_request_error")
        pool = self._pool(name)
        route = self._route(pool, incoming, payload)
        return await self.proxy(incoming, pool, path, stream=payload.get("stream") is True, route=route)

    def _route(self, pool: Pool, incoming: Incoming, payload: Mapping[str, Any]) -> affinity.RouteKey | None:
        """The routing key of a request to a pool that routes by prefix (None for the others)."""
        if pool.affinity is None:
            return None
        header = self.cfg.api.session_header
        session = incoming.headers.get(header.lower()) if header else None
        return affinity.route_key(payload, session or None)

    async def upstream_route(self, request: Request) -> Response:
        pool = self._pool(request.path_params["role"])
        body = await self._read_body(request.headers, request.receive)
        path = "/" + request.path_params["path"]
        return await self.proxy(_incoming(request, body), pool, path, stream=True)

    def _pool(self, name: str | None) -> Pool:
        return self.router.resolve(name)

    def _too_big(self) -> ApiError:
        limit = self.cfg.api.max_body_bytes
        return ApiError(413, f"request body is larger than {limit} bytes (api.max_body_bytes)", "invalid_request_error")

    def _check_declared(self, declared: str | None) -> None:
        if declared is not None and declared.isdigit() and int(declared) > self.cfg.api.max_body_bytes:
            raise self._too_big()

    async def _read_body(self, headers: Mapping[str, str], receive: Receive) -> bytes:
        """The whole request body, refused past ``api.max_body_bytes`` (declared or as it arrives)."""
        self._check_declared(headers.get("content-length"))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(499, "the client went away", "invalid_request_error")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.cfg.api.max_body_bytes:
                raise self._too_big()
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def proxy(
        self, incoming: Incoming, pool: Pool, path: str, stream: bool, route: affinity.RouteKey | None = None
    ) -> Response:
        """Send the request to a backend of the pool; retry once elsewhere if it fails before any byte.

        The slot is a lease: released by the response when it ends, or here on any failure before it.
        """
        t0 = time.perf_counter()
        headers = {k: v for k in FORWARD_HEADERS if (v := incoming.headers.get(k)) is not None}
        target = path + (f"?{incoming.query}" if incoming.query else "")
        exclude: frozenset[str] = frozenset()
        for attempt in (1, 2):
            lease = await self._lease(pool, exclude, route)
            backend = lease.instance
            self.metrics.child(self.metrics.queue_wait, pool.role).observe(time.perf_counter() - t0)
            try:
                response = await self.router.client.request(
                    incoming.method, backend.reach_host, backend.port, target, headers, incoming.body
                )
                return ProxyResponse(self, pool, lease, response, t0, keep_alive=not stream)
            except BaseException as exc:
                lease.release()
                if isinstance(exc, asyncio.CancelledError):
                    # The client left while the backend worked: the closed connection cancels its task there.
                    self.metrics.child(self.metrics.requests, pool.role, backend.name, "499").inc()
                    raise
                if isinstance(exc, ConnectFailed):
                    self.router.report_failure(backend)
                if isinstance(exc, ConnectFailed | Stale) and attempt == 1:
                    # Refused, or a kept-alive connection the backend had closed: nothing was sent back yet.
                    others = any(b.key != backend.key for b in pool.ready)
                    exclude = frozenset({backend.key}) if others else frozenset()
                    continue
                if not isinstance(exc, UpstreamError):
                    raise
                self.metrics.errors.labels(pool.role, "backend").inc()
                raise ApiError(
                    exc.http_status, f"{backend.name} failed before answering: {exc}", source="backend"
                ) from exc
        raise AssertionError("unreachable")

    async def _lease(self, pool: Pool, exclude: frozenset[str], route: affinity.RouteKey | None = None) -> Lease:
        try:
            return await self.router.lease(pool, exclude, route)
        except FleetError:
            self.metrics.errors.labels(pool.role, "frontdoor").inc()
            raise

    # --- fleet views ----------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        cfg = self.cfg
        data = []
        for name in registry.names(cfg):
            role = registry.resolve(cfg, name)
            pool = self.router.pools[role]
            kind = "role" if name in cfg.roles() else "alias" if name in cfg.aliases else "task_type"
            data.append(
                {
                    "id": name,
                    "object": "model",
                    "owned_by": "modelfleet",
                    "kind": kind,
                    "role": role,
                    "state": _pool_state(pool),
                    "instances": [
                        {"name": b.name, "tier": b.tier.value, "state": b.state.value, "port": b.port}
                        for b in pool.backends
                    ],
                }
            )
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        roles = {role: _pool_state(pool) for role, pool in self.router.pools.items()}
        hot_roles = {role for role, pool in self.router.pools.items() if any(b.tier is Tier.HOT for b in pool.backends)}
        ok = all(roles[r] == State.READY for r in hot_roles)
        return JSONResponse({"ready": ok, "roles": roles}, status_code=200 if ok else 503)

    async def metrics_route(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def admin_status(self, request: Request) -> Response:
        return JSONResponse({**self.router.snapshot(), "front_door": {"pid": os.getpid(), "started": self.started}})

    async def admin_action(self, request: Request) -> Response:
        action, name = request.path_params["action"], request.path_params["name"]
        verbs = {"start": self.router.start_component, "stop": self.router.stop_component}
        verbs["reload"] = self.router.reload_component
        verb = verbs.get(action)
        if verb is None:
            raise ApiError(404, f"unknown admin action '{action}'; use start, stop or reload")
        instances = await verb(name, f"admin {action}")
        states = {b.name: b.state.value for b in instances}
        return JSONResponse({"component": name, "action": action, "instances": states})

    async def checkpoints(self, request: Request) -> Response:
        """GET: list; POST {"name", "include_state", "kv"}: create."""
        if request.method == "GET":
            found = await asyncio.to_thread(checkpoint.list_checkpoints, self.stack)
            return JSONResponse({"checkpoints": [dataclasses.asdict(c) for c in found]})
        payload = _parse_json(await self._read_body(request.headers, request.receive))
        name = payload.get("name")
        if not isinstance(name, str):
            raise ApiError(400, "give the checkpoint's 'name' (a string)", "invalid_request_error")
        info = await asyncio.to_thread(
            checkpoint.create, self.stack, name, bool(payload.get("include_state")), bool(payload.get("kv"))
        )
        return JSONResponse(dataclasses.asdict(info), status_code=201)

    async def checkpoint_one(self, request: Request) -> Response:
        """POST: restore; DELETE: delete. A restore goes through the owner and applies its config in-process."""
        checkpoint_id = request.path_params["id"]
        if request.method == "DELETE":
            path = await asyncio.to_thread(checkpoint.delete, self.stack, checkpoint_id)
            return JSONResponse({"deleted": checkpoint_id, "path": str(path)})
        prepared = await asyncio.to_thread(checkpoint.prepare, self.stack, checkpoint_id)
        plan, report = prepared.plan, prepared.report
        self.apply_config(plan.target)
        report.kept = list(plan.keep)
        for comp in plan.stop:
            await self.router.stop_component(comp, f"checkpoint {checkpoint_id}")
        report.stopped = list(plan.stop)
        for comp in plan.reload:
            await self.router.reload_component(comp, f"checkpoint {checkpoint_id}")
            report.reloaded.append(comp)
        for comp in plan.start:
            await self.router.start_component(comp, f"checkpoint {checkpoint_id}")
            report.started.append(comp)
        await asyncio.to_thread(checkpoint.finish, prepared)
        body = report.to_json()
        if report.config_written:
            body["front_door"] = "applied the restored config in-process"
        return JSONResponse(body)

    def apply_config(self, stack: Stack) -> None:
        """Serve ``stack``'s config from now on: routing, pools and API settings, with no restart."""
        self.stack = stack
        self.cfg = stack.cfg
        self.max_body_bytes = stack.cfg.api.max_body_bytes
        self.router.stack = stack
        if hasattr(self.router.actions, "stack"):
            self.router.actions.stack = stack
        self.router.apply_config(stack.cfg)


class ProxyResponse(Response):
    """Streams an upstream response to the client chunk by chunk; frees the slot at the end.

    If the client disconnects, the upstream stream is closed at once: llama-server sees
    the closed connection, cancels the generation and frees its slot.
    """

    def __init__(
        self,
        door: FrontDoor,
        pool: Pool,
        lease: Lease,
        response: upstream.Response,
        t0: float,
        keep_alive: bool,
    ) -> None:
        self.door, self.pool, self.lease, self.response, self.t0 = door, pool, lease, response, t0
        self.backend = lease.instance
        # llama-server closes the connection after a stream while advertising keep-alive:
        # such a connection is never put back in the pool.
        self.keep_alive = keep_alive
        self.status_code = response.status
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            headers = [(k.lower(), v) for k, v in self.response.raw_headers if k.lower() not in HOP_BY_HOP]
            if self.response.arrived:
                await self._send_whole(send, headers)
            else:
                await self._stream(receive, send, headers)
        finally:
            # However the answer ended; both are no-ops when _finish already did them.
            self.response.close()
            self.lease.release()

    async def _send_whole(self, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        """The whole body is already here (a short answer): send it at once, no disconnect watch needed."""
        body = b"".join([chunk async for chunk in self.response.chunks()])
        self._observe(self.door.metrics.ttft)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        finally:
            self._finish(complete=True, tail=body[-4096:], cancelled=False)

    async def _stream(self, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        me = asyncio.current_task()
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if me is not None:
                me.cancel()

        watcher = asyncio.create_task(watch())
        tail = b""
        complete = False
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
            first = True
            async for chunk in self.response.chunks():
                if first:
                    self._observe(self.door.metrics.ttft)
                    first = False
                tail = (tail + chunk)[-4096:]
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            complete = True
        except asyncio.CancelledError:
            if not gone.is_set():
                raise
            log.info("client left %s on %s; upstream request cancelled", self.pool.role, self.backend.name)
        except UpstreamError as exc:
            log.warning("%s broke off mid-response: %r", self.backend.name, exc)
            self.door.metrics.errors.labels(self.pool.role, "backend").inc()
        finally:
            watcher.cancel()
            self._finish(complete, tail, cancelled=gone.is_set())

    def _finish(self, complete: bool, tail: bytes, cancelled: bool) -> None:
        """Free the connection and the slot now; count the request once the answer has left."""
        if complete and self.keep_alive:
            self.response.release()
        else:
            self.response.close()  # closing the connection makes llama-server cancel the task
        self.lease.release()
        # On uvicorn's path the answer is written at the end of this loop turn
        # (wire.CoalescingTransport): the metrics wait for the turn after, off the response's path.
        asyncio.get_running_loop().call_soon(self._record, tail, cancelled)

    def _observe(self, hist: Any) -> None:
        self.door.metrics.child(hist, self.pool.role, self.backend.name).observe(time.perf_counter() - self.t0)

    def _record(self, tail: bytes, cancelled: bool) -> None:
        m = self.door.metrics
        code = "499" if cancelled else str(self.status_code)
        m.child(m.requests, self.pool.role, self.backend.name, code).inc()
        self._observe(m.latency)
        if self.status_code >= 500:
            m.errors.labels(self.pool.role, "backend").inc()
        found = _TOKENS.findall(tail)
        if found:
            m.child(m.tokens, self.pool.role, self.backend.name).inc(int(found[-1]))
        m.prompt_timings(self.door.router.counters, self.pool.role, self.backend.name, tail)


def _presented_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        return auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
    return headers.get("x-api-key")


def _incoming(request: Request, body: bytes) -> Incoming:
    return Incoming(request.method, request.url.query, request.headers, body)


def _parse_json(body: bytes) -> Mapping[str, Any]:
    try:
        payload = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", "invalid_request_error") from exc
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_request_error")
    return payload


def _pool_state(pool: Pool) -> str:
    if pool.ready:
        return "ready"
    states = {b.state for b in pool.backends}
    for state in (State.STARTING, State.BACKOFF, State.EJECTED, State.DRAINING, State.FAILED):
        if state in states:
            return state.value
    return "stopped"


def create_app(cfg: StackConfig, stack: Stack, monitor: bool = True) -> FrontDoor:
    """The ASGI application (its lifespan is Starlette's, behind the fast path)."""
    return FrontDoor(cfg, stack, monitor)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelfleet.api", description=__doc__)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--state-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = load_config_file(args.config)
        binary: BinaryInfo | None = probe_binary(find_llama_server(cfg)) if cfg.servers else None
    except FleetError as exc:
        log.error("%s", exc)
        return exc.exit_code
    stack = Stack(cfg, args.state_dir, binary, say=log.info, stop_grace_s=cfg.api.stop_grace_s)
    app = create_app(cfg, stack)
    uvicorn.run(
        app,
        host=cfg.api.host,
        port=cfg.api.port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http=FrontDoorProtocol,
        proxy_headers=False,  # nothing here reads the client address; the middleware costs on every request
        timeout_graceful_shutdown=int(cfg.api.drain_timeout_s) or None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
