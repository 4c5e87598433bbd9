"""A lean HTTP/1.1 client for the front door's hop to llama-server.

The proxy's upstream hop needs little of a general client: plain HTTP on loopback,
one request per kept-alive connection at a time, the response body passed on chunk
by chunk. A general client (aiohttp) costs about as much Python per request as the
rest of the front door together, so this hop uses asyncio protocols and httptools'
parser directly:

* the request leaves in one write (request line, headers and body);
* connections are kept alive and reused newest-first, and one that the server closed
  while idle is never handed out;
* the response's body chunks are queued as they arrive and read as an async
  iterator; reading pauses the socket when the reader falls behind;
* a reused connection that fails before any byte of the response arrives raises
  ``Stale``, so the caller may retry it elsewhere: nothing was answered yet;
* ``sock_read`` bounds the silence between two arrivals (headers or chunks), one
  timer per request rather than one per chunk;
* every failure is one of this module's errors, whatever its cause (a request that
  HTTP cannot carry, bytes that are not HTTP), so a caller that holds a backend's slot
  for the request always learns that it failed and frees it.

The monitor's health probes go through the same client.
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import AsyncIterator, Mapping

import httptools

from modelfleet.errors import BrokenOff, ConnectFailed, Garbled, Stale, Unsendable, UpstreamError, UpstreamTimeout

__all__ = [
    "BrokenOff",
    "Client",
    "ConnectFailed",
    "Garbled",
    "Response",
    "Stale",
    "Unsendable",
    "UpstreamError",
    "UpstreamTimeout",
]

HIGH_WATER = 1 << 20  # bytes queued for a slow reader before the socket is paused
MAX_IDLE_PER_HOST = 64
_UNSAFE_TARGET = re.compile(r"[\x00-\x20\x7f]")  # would end or split the request line
_UNSAFE_HEADER = re.compile(r"[\r\n\x00]")


class _Connection(asyncio.Protocol):
    """One kept-alive connection to a backend; it carries one response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.interim = False  # parsing a 1xx response, which precedes the real one

    # asyncio protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports don't subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response._lost(exc)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: the connection cannot be trusted any more
            self.close()
            return
        response.last_arrival = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            response._fail(BrokenOff("the backend switched protocols"))
            self.close()
        except Exception as exc:  # httptools' errors, or a callback's: the connection cannot be trusted
            if response._started:
                response._fail(BrokenOff(f"malformed response from the backend: {exc}"))
            else:
                response._fail(Garbled(f"the backend did not answer HTTP: {exc}"))
            self.close()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.response is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # 100 Continue, 103 Early Hints: the answer follows
            self.interim = True
            self.response.raw_headers.clear()
            return
        self.response._headers_done(status)

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._feed(body)

    def on_message_complete(self) -> None:
        assert self.response is not None
        if self.interim:
            self.interim = False
            return
        self.response._complete(self.parser.should_keep_alive())

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Response:
    """An upstream response: status and headers at once, the body as it arrives."""

    def __init__(self, client: Client, key: tuple[str, int], conn: _Connection, head: bool, sock_read: float) -> None:
        self.client, self.key, self.conn, self.head = client, key, conn, head
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.last_arrival = conn.loop.time()
        self._sock_read = sock_read
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._started = False  # headers arrived
        self._done = False  # the whole message arrived
        self._keep_alive = False
        self._settled = False  # released or closed
        self._timer: asyncio.TimerHandle | None = None

    # --- fed by the connection -------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _headers_done(self, status: int) -> None:
        self.status = status
        self._started = True
        if self.head:  # a HEAD response has no body, whatever Content-Length says
            self._complete(False)
        self._wake()

    def _feed(self, body: bytes) -> None:
        self._chunks.append(body)
        self._queued += len(body)
        if self._queued > HIGH_WATER and not self._paused and self.conn.transport is not None:
            self._paused = True
            self.conn.transport.pause_reading()
        self._wake()

    def _complete(self, keep_alive: bool) -> None:
        if self._done:
            return
        self._done = True
        self._keep_alive = keep_alive and not self.head
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self._done:
            self._error = error
        self._wake()

    def _lost(self, exc: Exception | None) -> None:
        if self._done:
            return
        if self._started and not self._delimited():
            self._complete(False)  # a body that runs to the end of the connection
        elif self._started:
            self._fail(BrokenOff(f"the backend closed the connection mid-response ({exc or 'EOF'})"))
        else:
            self._fail(Stale(f"the connection closed before a response began ({exc or 'EOF'})"))

    def _delimited(self) -> bool:
        names = {name.lower() for name, _ in self.raw_headers}
        return b"content-length" in names or b"transfer-encoding" in names

    # --- timeouts ----------------------------------------------------------------------

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self.conn.loop.call_at(self.last_arrival + self._sock_read, self._check_timeout)

    def _check_timeout(self) -> None:
        self._timer = None
        if self._done or self._error is not None or self._settled:
            return
        due = self.last_arrival + self._sock_read
        if self.conn.loop.time() >= due:
            self._fail(UpstreamTimeout(f"no data from the backend for {self._sock_read:g} s"))
        else:
            self._arm()

    async def _wait(self) -> None:
        self._waiter = self.conn.loop.create_future()
        self._arm()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # --- read by the caller --------------------------------------------------------------

    async def _start(self) -> None:
        """Wait for the status line and headers."""
        while not self._started and self._error is None:
            await self._wait()
        if not self._started:
            assert self._error is not None
            raise self._error

    async def body_begun(self) -> None:
        """Wait for the first byte of the body, or the end of a message without one.

        Raises ``BrokenOff`` or ``TimeoutError`` if the response fails first: then none of
        its body came, so a caller that has passed nothing on may still retry it elsewhere.
        """
        while not self._chunks and not self._done and self._error is None:
            await self._wait()
        if not self._chunks and not self._done:
            assert self._error is not None
            raise self._error

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk as it arrives (never buffered to its end)."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._queued -= len(chunk)
                if self._paused and self._queued < HIGH_WATER // 4 and self.conn.transport is not None:
                    self._paused = False
                    self.conn.transport.resume_reading()
                yield chunk
            elif self._done:
                return
            elif self._error is not None:
                raise self._error
            else:
                await self._wait()

    @property
    def arrived(self) -> bool:
        """The whole message is here (what is left of its body is queued, not on the wire)."""
        return self._done

    def release(self) -> None:
        """Done with the response: keep its connection for the next request if that is safe, else close it."""
        if self._settled:
            return
        self._settled = True
        self._cancel_timer()
        conn = self.conn
        conn.response = None
        if self._done and self._keep_alive and not self._chunks and not conn.closed:
            if self._paused and conn.transport is not None:
                conn.transport.resume_reading()
            self.client._put(self.key, conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection (llama-server cancels the request it was serving)."""
        if self._settled:
            return
        self._settled = True
        self._cancel_timer()
        self.conn.response = None
        self.conn.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Client:
    """Kept-alive connections to backends, by (host, port)."""

    def __init__(self, connect_timeout: float = 5.0, sock_read: float = 600.0) -> None:
        self.connect_timeout = connect_timeout
        self.sock_read = sock_read
        self._idle: dict[tuple[str, int], list[_Connection]] = {}

    def _put(self, key: tuple[str, int], conn: _Connection) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) >= MAX_IDLE_PER_HOST:
            conn.close()
            return
        idle.append(conn)

    async def _connection(self, key: tuple[str, int]) -> _Connection:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(loop), key[0], key[1])
        except TimeoutError as exc:
            raise ConnectFailed(f"connecting to {key[0]}:{key[1]} took over {self.connect_timeout:g} s") from exc
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {key[0]}:{key[1]}: {exc.strerror or exc}") from exc
        return conn

    async def request(
        self,
        method: str,
        host: str,
        port: int,
        target: str,
        headers: Mapping[str, str],
        body: bytes = b"",
    ) -> Response:
        """Send a request; return once the status line and headers have arrived.

        Raises ``ConnectFailed``, ``Stale`` or ``Garbled`` (nothing was answered: safe to
        retry elsewhere), ``Unsendable`` (nothing was sent: the request itself is at
        fault), ``UpstreamTimeout`` (a ``TimeoutError``) when the backend stays silent past ``sock_read``.
        """
        head = _head(method, host, port, target, headers, body)
        key = (host, port)
        conn = await self._connection(key)
        response = Response(self, key, conn, head=method == "HEAD", sock_read=self.sock_read)
        conn.response = response
        assert conn.transport is not None
        conn.transport.write(head + body)
        try:
            await response._start()
        except BaseException:
            response.close()
            raise
        return response

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing


def _head(method: str, host: str, port: int, target: str, headers: Mapping[str, str], body: bytes) -> bytes:
    """The request line and headers, or ``Unsendable`` if HTTP cannot carry them as given."""
    if _UNSAFE_TARGET.search(method) or _UNSAFE_TARGET.search(target):
        raise Unsendable(f"the request target {target!r} has a space or control character")
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n"]
    for name, value in headers.items():
        if _UNSAFE_HEADER.search(name) or _UNSAFE_HEADER.search(value):
            raise Unsendable(f"the header {name!r} has a line break or NUL")
        lines.append(f"{name}: {value}\r\n")
    if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    try:
        return "".join(lines).encode("latin-1")
    except UnicodeEncodeError as exc:
        raise Unsendable(f"the request has a character HTTP/1.1 cannot carry: {exc}") from exc
