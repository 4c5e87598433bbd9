"""The front door's HTTP/1.1 server protocol: uvicorn's, with a short path for the model routes.

uvicorn writes a response's status line and headers with one ``write`` and its body
with another. On loopback each write wakes the client, and on a small machine the
woken client takes the CPU from the front door between the two: it reads the
headers, finds no body, sleeps, and is woken again a moment later. That round trip
was most of what the front door added to a short request.

``CoalescingTransport`` gathers everything written during one turn of the event loop
and hands it to the socket in a single write at the end of that turn, so a response
that is ready at once (headers and the whole body) leaves in one segment, and a
stream's chunks still leave as soon as they are produced.

``FrontDoorProtocol`` also serves the model routes (``POST /v1/chat/completions``
and the like) through ``Exchange``, a minimal ASGI request cycle, in place of
uvicorn's general one. The application code is the same either way; the exchange
skips what a proxy of JSON requests does not need (header validation on every
response, the per-request scope copy, a second task per request). Everything else
(other routes, pipelined requests, ``Expect: 100-continue``, upgrades) goes the
usual uvicorn way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, Protocol

import httptools
from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger("modelfleet.api")


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


class FastApp(Protocol):
    """An ASGI app that names the routes it wants served by ``Exchange``."""

    fast_paths: frozenset[bytes]  # raw request paths (POST only)
    max_body_bytes: int

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...


class FrontDoorProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a ``CoalescingTransport``, with ``Exchange`` for the app's
    fast paths (pass the class as ``uvicorn.run(http=...)``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        app = self.app
        fast = getattr(app, "fast_paths", None) is not None and self.limit_concurrency is None
        self.fast_app: FastApp | None = app if fast else None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))

    def on_headers_complete(self) -> None:
        app = self.fast_app
        if (
            app is not None
            and (self.cycle is None or self.cycle.response_complete)  # else it queues, the usual way
            and not self.expect_100_continue
            and self.parser.get_method() == b"POST"
            and not self.parser.should_upgrade()
        ):
            url = httptools.parse_url(self.url)
            if url.path in app.fast_paths:
                version = self.parser.get_http_version()
                scope: Scope = self.scope  # type: ignore[assignment]  # uvicorn's TypedDict, filled in here
                scope["method"] = "POST"
                scope["path"] = url.path.decode("ascii")
                scope["raw_path"] = url.path
                scope["query_string"] = url.query or b""
                scope["http_version"] = version
                keep_alive = version != "1.0" and self.parser.should_keep_alive()
                self.cycle = Exchange(self, app, scope, keep_alive)  # type: ignore[assignment]
                return
        super().on_headers_complete()


class Exchange:
    """One request on a model route, answered by the app through a minimal ASGI cycle.

    It stands in for uvicorn's ``RequestResponseCycle`` as the protocol's current
    cycle, so the protocol's own callbacks feed it: ``body`` and ``more_body`` as the
    request arrives, ``disconnected`` when the client goes, ``keep_alive`` cleared on
    shutdown, and ``message_event.set()`` (this object) after each of them.

    Unlike uvicorn's cycle it acts on a disconnect before the response begins: the
    app's task is cancelled, so a request still queued for a slot, or waiting for a
    whole (non-streamed) answer, stops there and its backend stops working on it.
    """

    def __init__(self, protocol: FrontDoorProtocol, app: FastApp, scope: Scope, keep_alive: bool) -> None:
        self.protocol, self.app, self.scope, self.keep_alive = protocol, app, scope, keep_alive
        transport = protocol.transport
        assert isinstance(transport, CoalescingTransport)
        self.transport = transport
        self.body = bytearray()
        self.more_body = True
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.chunked = False
        self.message_event = self
        self.task: asyncio.Task[None] | None = None
        self._read = False  # the app has taken the request body
        self._waiter: asyncio.Future[None] | None = None

    # --- fed by the protocol ----------------------------------------------------------------

    def set(self) -> None:
        """The protocol's signal: more body, the end of it, or a disconnect."""
        if self.disconnected:
            self._wake()
            if self.task is not None and not self.response_started:
                # Gone before the answer began (queued, or the backend still working on a whole
                # answer): stop waiting for it; the app closes the upstream connection on the way out.
                self.task.cancel()
        elif self.task is None and (not self.more_body or len(self.body) > self.app.max_body_bytes):
            # The whole request is here (or already too big to accept): hand it to the app.
            self.task = self.protocol.loop.create_task(self._run())
            self.protocol.tasks.add(self.task)
            self.task.add_done_callback(self.protocol.tasks.discard)
        else:
            self.protocol.flow.resume_reading()  # the body is gathered here, whatever its size so far

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- the ASGI side ------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self.app(self.scope, self.receive, self.send)
        except asyncio.CancelledError:
            self.transport.close()
            raise
        except Exception:
            log.exception("error answering %s", self.scope["path"])
            if not self.response_started:
                await self._plain(500, b"Internal Server Error")
            else:
                self.transport.close()
        else:
            if not self.response_complete and not self.disconnected:
                log.error("%s returned without completing its response", self.scope["path"])
                self.transport.close()

    async def receive(self) -> Message:
        if not self._read and not self.disconnected:
            self._read = True
            body, self.body = bytes(self.body), bytearray()
            return {"type": "http.request", "body": body, "more_body": self.more_body}
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
            if self.chunked:
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
        out = [STATUS_LINE[status]]
        delimited = False
        for name, value in (*self.protocol.server_state.default_headers, *headers):
            if name in (b"content-length", b"transfer-encoding"):
                delimited = True
            out += (name, b": ", value, b"\r\n")
        if not delimited:
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
            self.transport.close()
        self.protocol.on_response_complete()  # keep-alive timer, pipelined requests

    async def _plain(self, status: int, text: bytes) -> None:
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(text)).encode())]
        self.keep_alive = False
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": text})
