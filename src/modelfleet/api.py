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
import hmac
import json
import logging
import os
import re
import signal
import socket
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from modelfleet import affinity, apply, checkpoint, handover, loading, registry, upstream, webui
from modelfleet.config import StackConfig, Tier, load_config_file
from modelfleet.errors import ApiError, ConnectFailed, FleetError, StartupError, Unavailable, Unsendable, UpstreamError
from modelfleet.events import EventHub
from modelfleet.fleet import Instance, Lease
from modelfleet.instance import Handle, Kind
from modelfleet.lifecycle import State
from modelfleet.metrics import Metrics
from modelfleet.placement import launcher_for
from modelfleet.pool import Pool
from modelfleet.router import Router
from modelfleet.spec import BinaryInfo, find_llama_server, probe_binary
from modelfleet.stack import Stack
from modelfleet.usage import usage_of
from modelfleet.wire import CutShort, FrontDoorProtocol

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
# Completions: the routes whose requests a slot-pinning instance (affinity.SlotMap) gets with an id_slot.
PIN_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/completion", "/completions"})
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
BAD_KEY = "missing or wrong {which}; send 'Authorization: Bearer <key>'"
FRESH_GRACE_S = 1.0  # on shutdown, how long a connection with no request yet may take to send one
# Decoded path characters never forwarded: they would end or split the upstream request line.
_UNFORWARDABLE = re.compile(r"[\x00-\x20\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PATH_SAFE = "/!$&'()*+,;=:@~"  # left as they are when a path is forwarded; the rest is percent-encoded
TAGGED_ERROR_MAX = 64 * 1024  # backend error bodies up to this size get "source": "backend"


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
        self.max_body_bytes = cfg.api.max_body_bytes  # enforced by wire.FrontDoorProtocol as requests arrive
        self.started = time.time()
        self.listener: socket.socket | None = None  # bound by main(); handed to a successor on reload
        self.predecessor: handover.Predecessor | None = None
        self.server: uvicorn.Server | None = None
        self.shutting_down = False
        self.streams: set[ProxyResponse] = set()  # answers being streamed now: ended cleanly on SIGTERM
        self.loop: asyncio.AbstractEventLoop | None = None
        self._applying = asyncio.Lock()  # one apply at a time
        self._tasks: set[asyncio.Task[None]] = set()
        self.metrics = Metrics(self.router)
        self.events = EventHub(self.router)  # the page's feed (/ui, /events)
        self.app = Starlette(
            routes=self._routes(),
            lifespan=self._lifespan,
            exception_handlers={HTTPException: self._http_error, Exception: self._internal_error},  # type: ignore[dict-item]
        )
        # No redirect of /path/ to /path: Starlette would build the Location from the Host header.
        self.app.router.redirect_slashes = False

    def _routes(self) -> list[Route]:
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
        return [  # the model routes are served by __call__, ahead of these
            Route("/v1/models", self._guard(self.models), methods=["GET"]),
            Route("/v1/models/{id:path}", self._guard(self.model_one), methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/metrics", self._guard(self.metrics_route), methods=["GET"]),
            Route("/upstream/{role}/{path:path}", self._guard(self.upstream_route), methods=methods),
            Route("/admin/status", self._guard(self.admin_status, admin=True), methods=["GET"]),
            Route("/admin/apply", self._guard(self.admin_apply, admin=True), methods=["POST"]),
            Route("/admin/checkpoints", self._guard(self.checkpoints, admin=True), methods=["GET", "POST"]),
            Route("/admin/checkpoints/{id}", self._guard(self.checkpoint_one, admin=True), methods=["POST", "DELETE"]),
            Route("/admin/{action}/{name}", self._guard(self.admin_action, admin=True), methods=["POST"]),
            *self._ui_routes(),
        ]

    def _ui_routes(self) -> list[Route]:
        """The web page (webui.py): its files, its view, logs (admin) and the event stream."""

        def bound(fn: Callable[[webui.Door, Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
            return lambda request: fn(self, request)

        return [
            Route("/ui", self._guard(webui.page, page=True), methods=["GET"]),
            Route("/ui/{file}", self._guard(webui.page, page=True), methods=["GET"]),
            Route("/ui/api/view", self._guard(bound(webui.view)), methods=["GET"]),
            Route("/ui/api/history", self._guard(bound(webui.history)), methods=["GET"]),
            Route("/ui/api/sweep.png", self._guard(bound(webui.sweep_plot)), methods=["GET"]),
            Route("/ui/api/logs/{name}", self._guard(bound(webui.logs), admin=True), methods=["GET"]),
            Route("/events", self._guard(bound(webui.events)), methods=["GET"]),
        ]

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.loop = asyncio.get_running_loop()
        await self.router.adopt()
        monitor = asyncio.create_task(self.router.monitor()) if self.run_monitor else None
        sampler = asyncio.create_task(self.events.run())
        control = await self._take_over_and_offer()
        hup = self._listen_for_sighup()
        log.info("front door ready on %s:%s", self.cfg.api.host, self.cfg.api.port)
        try:
            yield
        finally:
            await handover.close(control)
            if hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            sampler.cancel()
            if monitor is not None:
                monitor.cancel()
            await asyncio.gather(sampler, *([monitor] if monitor else []), return_exceptions=True)
            await self.router.close()  # and its HTTP client

    async def _take_over_and_offer(self) -> asyncio.AbstractServer | None:
        """Tell the front door we took the socket from that we serve now; then offer it to our successor."""
        if self.predecessor is not None:
            await asyncio.to_thread(self.predecessor.ready)
            self.predecessor = None
        if self.listener is None:
            return None
        return await handover.offer(self.stack.store.dir, self.cfg.api.port, self.listener, self.hand_off)

    def hand_off(self) -> None:
        """A successor serves on our socket now: stop accepting, finish what is in flight, exit."""
        if self.server is not None:
            self.server.should_exit = True

    @property
    def queued(self) -> int:
        return sum(len(p.waiting) for p in self.router.pools.values())

    def begin_shutdown(self) -> None:
        """Told to stop (SIGTERM): requests waiting for a slot get 503 with Retry-After at once."""
        self.shutting_down = True
        log.info("told to stop: answering %d queued request(s) and ending %d stream(s)", self.queued, len(self.streams))
        for pool in self.router.pools.values():
            pool.fail_waiters(Unavailable("the front door is shutting down; retry in a moment"))
        for stream in list(self.streams):
            stream.end_for_shutdown()

    # --- access ------------------------------------------------------------------

    def _guard(
        self, handler: Callable[[Request], Awaitable[Response]], admin: bool = False, page: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            try:
                if not page:  # the page's files are public; it asks for the key and sends it on every call
                    self._check_key(request.headers, admin)
                if admin:
                    webui.check_same_origin(request.method, request.headers)
                if admin and request.method != "GET":
                    # A change runs to its end even if its client leaves (a request whose client is
                    # gone is cancelled, see wire.Exchange): a half-done stop or restore helps nobody.
                    return await asyncio.shield(handler(request))
                return await handler(request)
            except FleetError as exc:
                return error_response(exc)

        return guarded

    def _check_key(self, headers: Mapping[str, str], admin: bool) -> None:
        """Client routes need the API key, admin routes the admin key (else the API key), when set."""
        api = self.cfg.api
        key = (api.admin_key or api.api_key) if admin else api.api_key
        if key is not None and not _same_key(_presented_key(headers), key):
            which = "admin key" if admin and api.admin_key else "API key"
            raise ApiError(401, BAD_KEY.format(which=which), "authentication_error")

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        msg = f"{request.method} {request.scope['path']}: {exc.detail}"  # not request.url: it reads the Host header
        return error_response(ApiError(exc.status_code, msg, kind, headers=exc.headers))

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        """A fault of the front door itself (Starlette has logged it): still an answer in the usual shape."""
        return error_response(ApiError(500, "the front door failed to answer; see its log", "server_error"))

    # --- proxy routes --------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry. The model routes take a fast path around Starlette's routing and
        middleware: they are the hot path, and on a small machine every layer shows."""
        if scope["type"] == "http" and scope["path"] in MODEL_ROUTES:
            response = await self._model_route(scope, receive)
            await response(scope, receive, send)
        elif scope["type"] == "http" and _CONTROL.search(scope["path"]):
            # No route has one, and Starlette's would not match across a line break (a 404 that hides why).
            msg = "the path has a control character (CR, LF, NUL, TAB, DEL)"
            await error_response(ApiError(400, msg, "invalid_request_error"))(scope, receive, send)
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
        route = self._route(pool, incoming, payload, pin=path in PIN_ROUTES)
        return await self.proxy(incoming, pool, path, stream=payload.get("stream") is True, route=route)

    def _route(self, pool: Pool, incoming: Incoming, payload: Mapping[str, Any], pin: bool) -> affinity.RouteKey | None:
        """The routing key of a request to a pool that routes by prefix or pins slots (None for the others)."""
        if not pool.keyed:
            return None
        header = self.cfg.api.session_header
        session = incoming.headers.get(header.lower()) if header else None
        return affinity.route_key(payload, session or None, pin)

    async def upstream_route(self, request: Request) -> Response:
        pool = self._pool(request.path_params["role"])
        decoded = request.path_params["path"]
        if _UNFORWARDABLE.search(decoded):
            msg = "the path has a space or control character (CR, LF, NUL, TAB, DEL); none is forwarded"
            raise ApiError(400, msg, "invalid_request_error")
        body = await self._read_body(request.headers, request.receive)
        path = "/" + urllib.parse.quote(decoded, safe=_PATH_SAFE)  # non-ASCII as UTF-8, percent-encoded
        return await self.proxy(_incoming(request, body), pool, path, stream=True)

    def _pool(self, name: str | None) -> Pool:
        return self.router.resolve(name)

    def _too_big(self) -> ApiError:
        limit = self.cfg.api.max_body_bytes
        return ApiError(413, f"request body is larger than {limit} bytes (api.max_body_bytes)", "invalid_request_error")

    def _check_declared(self, declared: str | None) -> None:
        if (
            declared is not None
            and declared.isascii()
            and declared.isdigit()
            and int(declared) > self.cfg.api.max_body_bytes
        ):
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
            body = incoming.body
            if lease.slot is not None:
                body = affinity.with_slot(body, lease.slot) or body
            try:
                response = await self.router.client.request(
                    incoming.method, backend.reach_host, backend.port, target, headers, body
                )
                try:
                    # The answer starts with its first body byte: until then, nothing has gone to the
                    # client, and a backend that fails (dies after its headers) may be retried elsewhere.
                    await response.body_begun()
                except BaseException:
                    response.close()
                    raise
                return ProxyResponse(self, pool, lease, response, t0, keep_alive=not stream)
            except BaseException as exc:
                lease.release()  # whatever went wrong before the answer began, the slot is free again
                if isinstance(exc, asyncio.CancelledError):
                    # The client left while the backend worked: the closed connection cancels its task there.
                    self.metrics.child(self.metrics.requests, pool.role, backend.name, "499").inc()
                    raise
                if isinstance(exc, Unsendable):
                    raise ApiError(400, f"the request cannot be forwarded: {exc}", "invalid_request_error") from exc
                if isinstance(exc, TimeoutError):
                    self.metrics.errors.labels(pool.role, "backend").inc()
                    raise ApiError(504, f"{backend.name} did not answer in time", "timeout_error", "backend") from exc
                if not isinstance(exc, UpstreamError):
                    raise
                # Refused, a kept-alive connection the backend had closed, bytes that are not HTTP, or a
                # response cut off before its body began: nothing was passed on to the client yet.
                if isinstance(exc, ConnectFailed):
                    self.router.report_failure(backend)
                if attempt == 1:
                    others = any(b.key != backend.key for b in pool.ready)
                    exclude = frozenset({backend.key}) if others else frozenset()
                    continue
                self.metrics.errors.labels(pool.role, "backend").inc()
                raise ApiError(
                    502, f"{backend.name} failed before answering: {exc}", "upstream_error", "backend"
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
        progress = await self._progress_all()
        data = [self._model_entry(n, progress) for n in registry.names(self.cfg)]
        return JSONResponse({"object": "list", "data": data})

    async def model_one(self, request: Request) -> Response:
        """``GET /v1/models/{id}`` (the OpenAI SDK's ``models.retrieve``): one role, alias or task type."""
        name = request.path_params["id"]
        if name not in registry.names(self.cfg):
            known = ", ".join(registry.names(self.cfg))
            msg = f"no model '{name}' here; known: {known} (GET /v1/models lists them)"
            raise ApiError(404, msg, "not_found_error")
        return JSONResponse(self._model_entry(name, await self._progress_all()))

    def _model_entry(self, name: str, progress: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        role = registry.resolve(cfg, name)
        pool = self.router.pools[role]
        kind = "role" if name in cfg.roles() else "alias" if name in cfg.aliases else "task_type"
        return {
            "id": name,
            "object": "model",
            "created": int(self.started),
            "owned_by": "modelfleet",
            "kind": kind,
            "role": role,
            "state": _pool_state(pool),
            "instances": [
                {"name": b.name, "tier": b.tier.value, "state": b.state.value, "port": b.port} | progress.get(b.key, {})
                for b in pool.backends
            ],
        }

    async def _progress_all(self) -> dict[str, dict[str, Any]]:
        """For each instance that is starting: how long it has been at it and the stage its log shows.
        The logs are read off the event loop (on a Ray node, through its actor)."""
        starting = [b for b in self.router.fleet if b.state is State.STARTING]
        if not starting:
            return {}
        stages = await asyncio.to_thread(lambda: [self._stage(b) for b in starting])
        now = self.router.fleet.clock()
        return {
            b.key: {"starting_for_s": round(now - b.since, 1), "stage": stage}
            for b, stage in zip(starting, stages, strict=True)
        }

    def _stage(self, inst: Instance) -> str | None:
        spec = inst.spec
        if spec.kind is not Kind.LLAMA_SERVER:
            return None
        handle = inst.handle or Handle(spec.node, 0, 0.0, spec.log_file, spec.label)
        return loading.stage(self.stack.launcher.read_log(handle))

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
        verbs: dict[str, Callable[[str, str], Awaitable[list[Instance]]]] = {
            "start": self.router.start_component,
            "stop": self.router.stop_component,
            "reload": self.router.reload_component,
            "drain": self.router.drain_instance,
        }
        verb = verbs.get(action)
        if verb is None:
            raise ApiError(404, f"unknown admin action '{action}'; use start, stop, reload or drain")
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

    async def admin_apply(self, request: Request) -> Response:
        """Re-read the stack file and apply it: POST {"dry_run": true} only plans."""
        payload = _parse_json(await self._read_body(request.headers, request.receive))
        return JSONResponse(await self.apply_file(dry_run=bool(payload.get("dry_run"))))

    async def apply_file(self, dry_run: bool = False) -> dict[str, Any]:
        """Plan the stack file against what runs and carry it out here (see :mod:`modelfleet.apply`)."""
        source = self.cfg.source
        if not source:
            raise ApiError(409, "this front door has no stack file to re-read", "invalid_request_error")
        async with self._applying:
            target = await asyncio.to_thread(apply.load_target, self.stack, Path(source))
            plan = await asyncio.to_thread(apply.make_plan, target)
            if plan.restarts_front_door:
                raise ApiError(
                    409,
                    "the front door itself must restart for this change (its port or host); "
                    "run `modelfleet apply`, which restarts it last",
                    "invalid_request_error",
                )
            if not dry_run:
                await apply.carry_out_in_front_door(plan, self.router, self.apply_config, asyncio.to_thread)
                log.info("applied %s: %s", source, "; ".join(f"{s.action} {s.component}" for s in plan.steps))
        return {"applied": not dry_run, "config": source, **plan.to_json()}

    def _listen_for_sighup(self) -> bool:
        """SIGHUP applies the stack file, as POST /admin/apply does (logged, since nobody waits for it)."""

        async def reapply() -> None:
            try:
                await self.apply_file()
            except FleetError as exc:
                log.error("SIGHUP: the stack file was not applied: %s", exc)

        def on_hup() -> None:
            task = asyncio.get_running_loop().create_task(reapply())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_hup)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests) or no signals
            return False
        return True

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
    the closed connection, cancels the generation and frees its slot. If the backend
    breaks off mid-stream, a server-sent event stream ends with an error event (and its
    proper end); any other body is cut short, so the client sees it is incomplete.
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
        self.task: asyncio.Task[Any] | None = None
        self.closing = False
        # llama-server closes the connection after a stream while advertising keep-alive:
        # such a connection is never put back in the pool.
        self.keep_alive = keep_alive
        self.status_code = response.status
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            headers = [(k.lower(), v) for k, v in self.response.raw_headers if k.lower() not in HOP_BY_HOP]
            headers.append((b"x-modelfleet-instance", self.backend.name.encode()))  # who served it
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
        if self.status_code >= 400 and len(body) < TAGGED_ERROR_MAX:
            body, headers = _tag_backend_error(body, headers)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
        finally:
            self._finish(complete=True, tail=body[-4096:], cancelled=False)

    def end_for_shutdown(self) -> None:
        """The front door is told to stop: end this stream now, with an error event the client can read."""
        self.closing = True
        if self.task is not None:
            self.task.cancel()

    async def _stream(self, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        me = self.task = asyncio.current_task()
        self.door.streams.add(self)
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
        failed: int | None = None
        sse = any(k == b"content-type" and v.lower().startswith(b"text/event-stream") for k, v in headers)
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
            if gone.is_set():
                log.info("client left %s on %s; upstream request cancelled", self.pool.role, self.backend.name)
            elif self.closing:
                failed = 503
                if not sse:
                    raise CutShort("the front door is shutting down") from None
                msg = "the front door is shutting down; retry in a moment"
                await send(
                    {"type": "http.response.body", "body": _sse_error(tail, 503, msg, "frontdoor"), "more_body": True}
                )
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                raise
        except UpstreamError as exc:
            log.warning("%s broke off mid-response: %r", self.backend.name, exc)
            timeout = isinstance(exc, TimeoutError)
            failed = 504 if timeout else 502
            self.door.metrics.errors.labels(self.pool.role, "backend").inc()
            if not sse:
                raise CutShort(str(exc)) from exc
            what = "did not send anything for" if timeout else "broke off mid-response"
            detail = f"{self.door.cfg.api.request_timeout_s:g} s" if timeout else str(exc)
            await send(
                {
                    "type": "http.response.body",
                    "body": _sse_error(tail, failed, f"{self.backend.name} {what} {detail}"),
                    "more_body": True,
                }
            )
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.door.streams.discard(self)
            watcher.cancel()
            self._finish(complete, tail, cancelled=gone.is_set(), failed=failed)

    def _finish(self, complete: bool, tail: bytes, cancelled: bool, failed: int | None = None) -> None:
        """Free the connection and the slot now; count the request once the answer has left."""
        if complete and self.keep_alive:
            self.response.release()
        else:
            self.response.close()  # closing the connection makes llama-server cancel the task
        self.lease.release()
        # The answer is written at the end of this loop turn (wire.CoalescingTransport):
        # the metrics wait for the turn after, off the response's path.
        asyncio.get_running_loop().call_soon(self._record, tail, cancelled, failed)

    def _observe(self, hist: Any) -> None:
        self.door.metrics.child(hist, self.pool.role, self.backend.name).observe(time.perf_counter() - self.t0)

    def _record(self, tail: bytes, cancelled: bool, failed: int | None) -> None:
        m = self.door.metrics
        code = "499" if cancelled else str(failed or self.status_code)
        m.child(m.requests, self.pool.role, self.backend.name, code).inc()
        self._observe(m.latency)
        if self.status_code >= 500 and failed is None:
            m.errors.labels(self.pool.role, "backend").inc()
        usage = usage_of(tail)
        m.count(self.door.router.counters, self.pool.role, self.backend.name, usage)
        latency = time.perf_counter() - self.t0
        self.door.events.record(self.pool.role, self.backend.name, latency, tail, self.status_code, usage)


def _sse_error(tail: bytes, status: int, message: str, source: str = "backend") -> bytes:
    """An error event in OpenAI's shape, as its own event whatever the stream had sent of the last one."""
    kind = {504: "timeout_error", 503: "unavailable_error"}.get(status, "upstream_error")
    event = {"error": {"message": message, "type": kind, "code": status, "source": source}}
    sep = b"" if not tail or tail.endswith(b"\n\n") else b"\n" if tail.endswith(b"\n") else b"\n\n"
    return sep + b"data: " + json.dumps(event).encode() + b"\n\n"


def _tag_backend_error(body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A backend's JSON error body with ``"source": "backend"`` added (and its Content-Length to match)."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return body, headers
    if not isinstance(payload, dict) or not isinstance(payload.get("error"), dict) or "source" in payload["error"]:
        return body, headers
    payload["error"]["source"] = "backend"
    tagged = json.dumps(payload).encode()
    fixed = [(k, str(len(tagged)).encode() if k == b"content-length" else v) for k, v in headers]
    return tagged, fixed


def _presented_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        return auth[7:].strip() if auth.lower().startswith("bearer ") else auth.strip()
    return headers.get("x-api-key")


def _same_key(presented: str | None, key: str) -> bool:
    """Whether the presented key is the key, compared in constant time."""
    if presented is None:
        return False
    try:
        given = presented.encode("latin-1")  # headers are read as latin-1: these are the bytes sent
    except UnicodeEncodeError:
        given = presented.encode("utf-8")
    return hmac.compare_digest(given, key.encode("utf-8"))


def _incoming(request: Request, body: bytes) -> Incoming:
    # The raw query, not request.url's: that one is rebuilt from the Host header.
    return Incoming(request.method, request.scope["query_string"].decode("latin-1"), request.headers, body)


def _parse_json(body: bytes) -> Mapping[str, Any]:
    try:
        payload = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", "invalid_request_error") from exc
    except RecursionError as exc:
        raise ApiError(400, "the request body is JSON nested too deeply", "invalid_request_error") from exc
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
        launcher = launcher_for(cfg)
        connect = getattr(launcher, "connect", None)
        if connect is not None:
            connect()  # a cluster's client joins from the main thread, before the server's loop starts
    except FleetError as exc:
        log.error("%s", exc)
        return exc.exit_code
    stack = Stack(cfg, args.state_dir, binary, launcher=launcher, say=log.info, stop_grace_s=cfg.api.stop_grace_s)
    door = create_app(cfg, stack)
    # The socket of a running front door of this stack if there is one (a reload), else our own.
    taken = handover.take(args.state_dir, cfg.api.port)
    if taken is not None:
        door.listener, door.predecessor = taken
    else:
        try:
            door.listener = handover.listen(cfg.api.host, cfg.api.port)
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", cfg.api.host, cfg.api.port, exc.strerror or exc)
            return StartupError.exit_code
    config = uvicorn.Config(
        door,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http=FrontDoorProtocol,
        proxy_headers=False,  # nothing here reads the client address; the middleware costs on every request
        timeout_graceful_shutdown=int(cfg.api.drain_timeout_s) or None,
    )
    server = FrontDoorServer(config, door)
    door.server = server
    server.run(sockets=[door.listener])
    return 0


class FrontDoorServer(uvicorn.Server):
    """uvicorn's server, telling the front door when it is told to stop."""

    def __init__(self, config: uvicorn.Config, door: FrontDoor) -> None:
        super().__init__(config)
        self.door = door

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop accepting first, then let connections accepted a moment ago send their request
        (up to ``FRESH_GRACE_S``) before uvicorn closes the idle ones: none is cut unanswered."""
        for server in self.servers:
            server.close()
        deadline = time.monotonic() + FRESH_GRACE_S
        while time.monotonic() < deadline and any(
            getattr(c, "cycle", True) is None for c in self.server_state.connections
        ):
            await asyncio.sleep(0.01)
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self.door.loop is not None:  # else not started yet: nothing is waiting
            self.door.loop.call_soon_threadsafe(self.door.begin_shutdown)


if __name__ == "__main__":
    raise SystemExit(main())
