"""The front door's HTTP/1.1 server: uvicorn's parser and server, with one request cycle of its own.

uvicorn writes a response's status line and headers with one ``write`` and its body
with another. On loopback each write wakes the client, and on a small machine the
woken client takes the CPU from the front door between the two: it reads the
headers, finds no body, sleeps, and is woken again a moment later. That round trip
was most of what the front door added to a short request.

``CoalescingTransport`` gathers everything written during one turn of the event loop
and hands it to the socket in a single write at the end of that turn, so a response
that is ready at once (headers and the whole body) leaves in one segment, and a
stream's chunks still leave as soon as they are produced.

``FrontDoorProtocol`` serves every request (any method and route, pipelined requests,
``Expect: 100-continue``) through ``Exchange``, a minimal ASGI request cycle, in place
of uvicorn's general one; uvicorn supplies the parser (httptools), flow control, the
keep-alive timer and the server's lifecycle. The exchange skips what a proxy of JSON
requests does not need (header validation on every response, a second task per
request), and it acts on a client that leaves before its answer began: the app's
task is cancelled, so a request still queued for a slot, or waiting for a whole
(non-streamed) answer, stops there.

The connection is refused (a JSON error in the front door's shape, then closed) when
the client does not keep to these limits, module constants here because the stack
file has no keys for them:

* ``MAX_HEADER_BYTES``: the request line and headers of one request (431);
* ``HEADER_TIMEOUT_S``: from a request's first byte to the end of its headers (408);
* ``BODY_TIMEOUT_S``: the longest silence while a request body is arriving (408);
* the app's ``max_body_bytes`` (``api.max_body_bytes``): a declared ``Content-Length``
  above it is refused before any of the body is read, a chunked body as soon as it
  passes it (413);
* ``MAX_IDLE_CONNECTIONS``: kept-alive connections waiting for their next request,
  across the server; past it the one idle longest is closed. A connection idle for
  uvicorn's ``timeout_keep_alive`` closes too, a new one that sends nothing included.

Protocol upgrades (WebSocket, ``h2c``) are not honoured: a bodiless upgrade request
is answered as plain HTTP/1.1 and the connection closes after it; ``CONNECT`` and an
upgrade request with a body are refused (400).
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
import weakref
from collections import OrderedDict, deque
from collections.abc import Iterable
from typing import Any

import httptools
from starlette.types import ASGIApp, Message, Scope
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

log = logging.getLogger("modelfleet.api")

MAX_HEADER_BYTES = 64 * 1024
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
MAX_IDLE_CONNECTIONS = 512
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024  # for an app that names no max_body_bytes
MAX_READ_AHEAD = 16  # pipelined requests read ahead of the one being answered before reading pauses
LINGER_S = 1.0  # after a last answer: how long what the client still sends is read and dropped

# Per server: its idle connections, longest idle first.
_IDLE: weakref.WeakKeyDictionary[ServerState, OrderedDict[FrontDoorProtocol, None]] = weakref.WeakKeyDictionary()


class CutShort(Exception):
    """Raised by the app to end a response it has begun without its proper end, so that the
    client sees a broken body (a chunked body without its last chunk, or a short one)."""


def error_json(status: int, message: str, kind: str) -> bytes:
    """An error body in OpenAI's shape, from the front door."""
    error = {"message": message, "type": kind, "code": status, "source": "frontdoor"}
    return json.dumps({"error": error}).encode()


class CoalescingTransport(asyncio.Transport):
    """Wraps a transport; ``write`` buffers until the loop's next turn, ``close`` flushes first."""

    def __init__(self, inner: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._inner = inner
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Hand what was written this turn to the socket, in one write."""
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._inner.is_closing():
            self._inner.write(data)

    def close(self) -> None:
        self.flush()
        self._inner.close()

    def abort(self) -> None:
        self._pending.clear()
        self._inner.abort()

    def write_eof(self) -> None:
        self.flush()
        self._inner.write_eof()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size() + sum(map(len, self._pending))

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)


class FrontDoorProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a ``CoalescingTransport``, every request answered by an
    ``Exchange`` (pass the class as ``uvicorn.run(http=...)``).

    One exchange is answered at a time (``exchange``); requests pipelined behind it are
    read ahead (``ahead``, bounded) and answered in order. ``reading`` is the exchange
    whose body is arriving, the answered one or the last one ahead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limit = getattr(self.app, "max_body_bytes", None)
        self.max_body_bytes: int = limit if isinstance(limit, int) else DEFAULT_MAX_BODY_BYTES
        self.exchange: Exchange | None = None
        self.reading: Exchange | None = None
        self.ahead: deque[Exchange] = deque()
        self._stopped = False  # input is no longer parsed (refused, upgraded, closing)
        self._head_bytes = 0  # bytes received of the current request's head, so far
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._idle = _IDLE.setdefault(self.server_state, OrderedDict())

    # --- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))
        self._go_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self._idle.pop(self, None)
        self._unset_keepalive_if_required()
        self._stop_timers()
        if self._linger is not None:
            self._linger.cancel()
        self._stopped = True
        for ex in (self.exchange, *self.ahead):
            if ex is not None:
                ex.lost()
        self.ahead.clear()
        self.reading = None
        if self.flow is not None:
            self.flow.resume_writing()
        if exc is None:
            self.transport.close()
        self.parser = None  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return  # refused or lingering: what still arrives is dropped
        self._last_read = self.loop.time()
        if self.reading is None:  # a request's head (or the start of one)
            self._head_bytes += len(data)
            self._leave_idle()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._stopped = True  # what follows the request is in a protocol not spoken here
        except httptools.HttpParserError as exc:
            self._refuse(400, f"malformed HTTP request: {exc}")
            return
        if self.reading is None and not self._stopped:
            if self._head_bytes > MAX_HEADER_BYTES:
                self._refuse(431, f"the request line and headers are larger than {MAX_HEADER_BYTES} bytes")
            elif self._head_timer is None and self.exchange is None and not self.ahead:
                self._go_idle()  # bytes that began no request (blank lines): still idle

    def shutdown(self) -> None:
        """The server is shutting down: finish the answer under way (if any), then close.

        Requests read ahead of it are dropped, and so is one whose body is still arriving.
        """
        ex = self.exchange
        self._stopped = True
        self.ahead.clear()
        if ex is None or ex.response_complete or ex.task is None:
            self.transport.close()
        else:
            ex.keep_alive = False

    # --- idle, timers, refusals -----------------------------------------------------------

    def _go_idle(self) -> None:
        """Nothing is being asked or answered: wait for the next request, bounded in time and number."""
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        idle = self._idle
        idle[self] = None
        while len(idle) > MAX_IDLE_CONNECTIONS:
            oldest, _ = idle.popitem(last=False)
            oldest._unset_keepalive_if_required()
            oldest.transport.close()

    def _leave_idle(self) -> None:
        self._idle.pop(self, None)
        self._unset_keepalive_if_required()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._stopped or self.reading is not None:
            return
        if self.flow.read_paused:  # paused here (requests read ahead): the delay is not the client's
            self._head_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._head_timeout)
            return
        self._refuse(408, f"the request headers did not arrive within {HEADER_TIMEOUT_S:g} s", "timeout_error")

    def _arm_body_timer(self) -> None:
        if self._body_timer is None:
            self._body_timer = self.loop.call_at(self._last_read + BODY_TIMEOUT_S, self._body_timeout)

    def _body_timeout(self) -> None:
        self._body_timer = None
        ex = self.reading
        if ex is None or self._stopped:
            return
        now = self.loop.time()
        if self.flow.read_paused or ex.expect_100:  # waiting on the front door, not on the client
            self._last_read = now
        elif now - self._last_read >= BODY_TIMEOUT_S:
            self._refuse(408, f"the request body stalled for {BODY_TIMEOUT_S:g} s", "timeout_error")
            return
        self._arm_body_timer()

    def _stop_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _refuse(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        """Stop reading requests; answer ``status`` in turn (after what is being answered), then close."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_timers()
        self.flow.resume_reading()  # keep noticing a client that leaves; what it sends is dropped
        refusal = Exchange(self, None, keep_alive=False, refusal=(status, message, kind))
        cut, self.reading = self.reading, None  # a request cut short is answered by the refusal
        if cut is not None:
            if cut is self.exchange:
                if cut.task is not None:  # pragma: no cover - a task starts only once its body is whole
                    self.transport.close()
                    return
                self.exchange = None
            else:
                self.ahead.remove(cut)
        if self.exchange is None:
            refusal.begin()
        else:
            self.ahead.append(refusal)

    def close_softly(self) -> None:
        """Close once the answer has left: half-close, then drop what the client still sends for
        ``LINGER_S`` (closing with unread input resets the connection, and the answer may be lost)."""
        self._stopped = True
        transport = self.transport
        if self._linger is not None or transport.is_closing():
            return
        self.flow.resume_reading()
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except (OSError, RuntimeError):
                transport.close()
                return
            self._linger = self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    # --- parser callbacks -------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._stopped:
            return
        super().on_message_begin()
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(HEADER_TIMEOUT_S, self._head_timeout)

    def on_headers_complete(self) -> None:
        if self._stopped:
            return
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._head_bytes = 0
        parser = self.parser
        size = len(self.url)
        declared: bytes | None = None
        chunked = False
        for name, value in self.headers:
            size += len(name) + len(value) + 4
            if name == b"content-length":
                declared = value
            elif name == b"transfer-encoding":
                chunked = True
        if size > MAX_HEADER_BYTES:
            self._refuse(431, f"the request line and headers are larger than {MAX_HEADER_BYTES} bytes")
            return
        method = parser.get_method()
        version = parser.get_http_version()
        keep_alive = version != "1.0" and parser.should_keep_alive()
        has_body = chunked or (declared is not None and declared.strip(b"0") != b"")
        if parser.should_upgrade():
            if method == b"CONNECT" or has_body:
                self._refuse(400, "CONNECT and protocol upgrades are not supported: the front door speaks HTTP/1.1")
                return
            keep_alive = False  # answered as plain HTTP/1.1; the parser stops after it
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            self._refuse(400, "the request target is not a valid URL")
            return
        if declared is not None and int(declared) > self.max_body_bytes:
            self._refuse(
                413,
                f"the request body ({int(declared)} bytes) is larger than {self.max_body_bytes} bytes "
                "(api.max_body_bytes)",
            )
            return
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            self._refuse(503, "the front door is at its concurrency limit; retry later", "unavailable_error")
            return
        raw_path = url.path or b"/"
        path = raw_path.decode("latin-1")  # llhttp admits only printable ASCII in a request target
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope: Scope = self.scope  # type: ignore[assignment]  # uvicorn's TypedDict, filled in here
        scope["method"] = method.decode("ascii")
        scope["http_version"] = version
        scope["path"] = self.root_path + path
        scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        scope["query_string"] = url.query or b""
        ex = Exchange(self, scope, keep_alive, expect_100=self.expect_100_continue and has_body)
        self.reading = ex
        if has_body:
            self._arm_body_timer()
        if self.exchange is None:
            ex.begin()
        else:
            self.ahead.append(ex)
            if len(self.ahead) >= MAX_READ_AHEAD:
                self.flow.pause_reading()

    def on_body(self, body: bytes) -> None:
        ex = self.reading
        if ex is None or self._stopped:
            return
        ex.body += body
        if len(ex.body) > self.max_body_bytes:
            self._refuse(413, f"request body is larger than {self.max_body_bytes} bytes (api.max_body_bytes)")
        elif ex is not self.exchange and len(ex.body) > HIGH_WATER_LIMIT:
            self.flow.pause_reading()  # read ahead far enough; the rest waits for its turn

    def on_message_complete(self) -> None:
        ex = self.reading
        if ex is None or self._stopped:
            return
        self.reading = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        ex.ended()

    # --- answers ---------------------------------------------------------------------------

    def on_response_complete(self) -> None:
        """The answered exchange is done: answer the next one read ahead, or wait idle for one."""
        self.server_state.total_requests += 1
        self.exchange = None
        if self.transport.is_closing() or self._linger is not None:
            return
        self.flow.resume_reading()
        if self.ahead:
            self.ahead.popleft().begin()
        elif self.reading is None and self._head_timer is None and not self._stopped:
            self._go_idle()

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, msg)


class Exchange:
    """One request and its answer, through a minimal ASGI cycle.

    The protocol feeds it: the body as it arrives (``body``), its end (``ended``), a
    client gone (``lost``), and ``begin`` when its turn to be answered comes. The app
    is called once the whole body is here, and gets it in one ``http.request`` message.

    Unlike uvicorn's cycle it acts on a disconnect before the response begins: the
    app's task is cancelled, so a request still queued for a slot, or waiting for a
    whole (non-streamed) answer, stops there and its backend stops working on it.
    """

    def __init__(
        self,
        protocol: FrontDoorProtocol,
        scope: Scope | None,
        keep_alive: bool,
        expect_100: bool = False,
        refusal: tuple[int, str, str] | None = None,
    ) -> None:
        self.protocol, self.scope, self.keep_alive = protocol, scope, keep_alive
        self.app: ASGIApp = protocol.app
        transport = protocol.transport
        assert isinstance(transport, CoalescingTransport)
        self.transport = transport
        self.expect_100 = expect_100  # a 100 Continue is owed before the client sends the body
        self.refusal = refusal
        self.body = bytearray()
        self.more_body = True
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.chunked = False
        self.bare = False  # an answer without a body: HEAD, 1xx, 204, 304
        self.task: asyncio.Task[None] | None = None
        self._read = False  # the app has taken the request body
        self._waiter: asyncio.Future[None] | None = None

    # --- fed by the protocol ----------------------------------------------------------------

    def begin(self) -> None:
        """Its turn to be answered."""
        protocol = self.protocol
        protocol.exchange = self
        if self.refusal is not None:
            self.error(*self.refusal)
        elif not self.more_body:
            self._start_task()
        elif self.expect_100:
            self.expect_100 = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.transport.flush()
            protocol._last_read = protocol.loop.time()  # the body's wait starts now

    def ended(self) -> None:
        """The whole request body is here."""
        self.more_body = False
        if self.protocol.exchange is self and self.task is None:
            self._start_task()

    def lost(self) -> None:
        """The client went away."""
        self.disconnected = True
        self._wake()
        if self.task is not None and not self.response_started:
            # Gone before the answer began (queued, or the backend still working on a whole
            # answer): stop waiting for it; the app closes the upstream connection on the way out.
            self.task.cancel()

    def _start_task(self) -> None:
        protocol = self.protocol
        self.task = task = protocol.loop.create_task(self._run())
        protocol.tasks.add(task)
        task.add_done_callback(protocol.tasks.discard)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- the ASGI side ------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self.scope is not None
        try:
            await self.app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            self.transport.close()
            raise
        except CutShort:
            self.transport.close()
        except Exception:
            log.exception("error answering %s %s", self.scope["method"], self.scope["path"])
            if not self.response_started:
                self.error(500, "the front door failed to answer; see its log", "server_error")
            else:
                self.transport.close()
        else:
            if not self.response_complete and not self.disconnected:
                log.error("%s returned without completing its response", self.scope["path"])
                if not self.response_started:
                    self.error(500, "the front door returned no answer; see its log", "server_error")
                else:
                    self.transport.close()

    async def receive(self) -> Message:
        if not self._read and not self.disconnected:
            self._read = True
            body, self.body = bytes(self.body), bytearray()
            return {"type": "http.request", "body": body, "more_body": False}
        while not (self.disconnected or self.response_complete):
            self._waiter = self.protocol.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        protocol = self.protocol
        if protocol.flow.write_paused and not self.disconnected:
            await protocol.flow.drain()
        if self.disconnected or self.response_complete:
            return
        if message["type"] == "http.response.start":
            self._start(message["status"], message.get("headers", ()))
        elif message["type"] == "http.response.body" and self.response_started:
            body: bytes = message.get("body", b"")
            more = message.get("more_body", False)
            if self.bare:
                pass
            elif self.chunked:
                frame = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
                self.transport.write(frame if more else frame + b"0\r\n\r\n")
            else:
                self.transport.write(body)
            # A body write ends what this turn has to say: send it now (with the headers, if
            # they are still waiting) rather than after the rest of the turn's bookkeeping.
            self.transport.flush()
            if not more:
                self._complete()
        else:
            raise RuntimeError(f"unexpected ASGI message {message['type']!r}")

    def _start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        if self.response_started:
            raise RuntimeError("the response has already started")
        self.response_started = True
        assert self.scope is not None
        out = [STATUS_LINE.get(status) or b"HTTP/1.1 %d \r\n" % status]
        delimited = False
        for name, value in (*self.protocol.server_state.default_headers, *headers):
            if name in (b"content-length", b"transfer-encoding"):
                delimited = True
            elif name == b"connection" and b"close" in value.lower():
                self.keep_alive = False
                continue  # written below, once
            out += (name, b": ", value, b"\r\n")
        self.bare = self.scope["method"] == "HEAD" or status < 200 or status in (204, 304)
        if not delimited and not self.bare:
            self.chunked = True
            out.append(b"transfer-encoding: chunked\r\n")
        if not (self.keep_alive and not self.more_body):  # a body left unread ends the connection
            self.keep_alive = False
            out.append(b"connection: close\r\n")
        out.append(b"\r\n")
        self.transport.write(b"".join(out))

    def _complete(self) -> None:
        self.response_complete = True
        self._wake()
        if not self.keep_alive:
            self.protocol.close_softly()
        self.protocol.on_response_complete()  # keep-alive timer, pipelined requests

    def error(self, status: int, message: str, kind: str) -> None:
        """Answer an error in OpenAI's shape at once (nothing sent yet) and end the connection."""
        if self.response_started or self.disconnected:
            return
        self.response_started = self.response_complete = True
        self.keep_alive = False
        self._wake()
        body = error_json(status, message, kind)
        out = [STATUS_LINE.get(status) or b"HTTP/1.1 %d \r\n" % status]
        for name, value in self.protocol.server_state.default_headers:
            out += (name, b": ", value, b"\r\n")
        out.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        out.append(body)
        self.transport.write(b"".join(out))
        self.transport.flush()
        self.protocol.close_softly()
