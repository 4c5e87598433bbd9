"""The front door's HTTP/1.1 server (wire.FrontDoorProtocol) against clients that break the rules.

These run the protocol in this process, under uvicorn, in front of a small ASGI app,
so that its limits (module constants) can be made short. What needs a real fleet is
in test_front_door_hardening.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http import httptools_impl

from conftest import free_port
from modelfleet import wire


class App:
    """Answers with what it was asked; ``/wait`` never answers, ``/boom`` fails, ``/slow`` takes 0.2 s."""

    max_body_bytes = 4096

    def __init__(self) -> None:
        self.waiting = threading.Event()
        self.cancelled = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        message = await receive()
        if path == "/wait":
            self.waiting.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if path == "/boom":
            raise RuntimeError("boom")
        if path == "/slow":
            await asyncio.sleep(0.2)
        seen = {
            "method": scope["method"],
            "path": path,
            "raw_path": scope["raw_path"].decode(),
            "query": scope["query_string"].decode(),
            "body": message["body"].decode("latin-1"),
        }
        body = json.dumps(seen).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def serving(app: App, **config: Any) -> Iterator[int]:
    """uvicorn with the front door's protocol, in a thread, on a free port."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,  # type: ignore[arg-type]
            host="127.0.0.1",
            port=port,
            http=wire.FrontDoorProtocol,  # type: ignore[arg-type]
            loop="uvloop",
            lifespan="off",
            log_level="critical",
            access_log=False,
            proxy_headers=False,
            **config,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive()


@pytest.fixture
def app() -> App:
    return App()


@pytest.fixture
def port(app: App) -> Iterator[int]:
    with serving(app) as p:
        yield p


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def request(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}"
    if body or method in ("POST", "PUT"):
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def read_response(sock: socket.socket, buf: bytearray, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """One response (Content-Length delimited, or none for ``head_only``); ``buf`` keeps what follows."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"connection closed early; had {bytes(buf)!r}"
        buf.extend(data)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    n = 0 if head_only else int(headers.get("content-length", "0"))
    while len(rest) < n:
        data = sock.recv(65536)
        assert data, "connection closed mid-body"
        rest += data
    buf[:] = rest[n:]
    return int(status_line.split()[1]), headers, rest[:n]


def closed(sock: socket.socket, within_s: float = 5.0) -> bool:
    """The server closed the connection (EOF or reset) within the time, reading past anything it sent."""
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def front_door_error(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body)["error"]
    assert error["source"] == "frontdoor" and isinstance(error["message"], str) and error["type"]
    return error


# --- one path for every request ---------------------------------------------------------------


def test_every_request_is_served_by_the_exchange(monkeypatch: pytest.MonkeyPatch, app: App) -> None:
    def no_cycle(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("uvicorn's RequestResponseCycle was used")

    monkeypatch.setattr(httptools_impl, "RequestResponseCycle", no_cycle)
    with serving(app) as port, connect(port) as sock:
        buf = bytearray()
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            sock.sendall(request(method, "/any/route?q=1", b"x" if method != "GET" else b""))
            status, _, body = read_response(sock, buf)
            assert status == 200 and json.loads(body)["method"] == method
        # Pipelined: answered in order, the slow first one included.
        sock.sendall(request("GET", "/slow") + request("POST", "/two", b"2") + request("DELETE", "/three"))
        assert [json.loads(read_response(sock, buf)[2])["path"] for _ in range(3)] == ["/slow", "/two", "/three"]
        # Expect: 100-continue on any route.
        sock.sendall(request("PUT", "/put", b"body", "Expect: 100-continue\r\n")[:-4])
        while b"\r\n\r\n" not in buf:
            buf.extend(sock.recv(65536))
        assert bytes(buf).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        del buf[:25]
        sock.sendall(b"body")
        status, _, body = read_response(sock, buf)
        assert status == 200 and json.loads(body)["body"] == "body"
        # HEAD: the headers of the answer, no body, and the connection stays usable.
        sock.sendall(request("HEAD", "/head") + request("GET", "/after"))
        status, headers, _ = read_response(sock, buf, head_only=True)
        assert status == 200 and int(headers["content-length"]) > 0
        assert json.loads(read_response(sock, buf)[2])["path"] == "/after"


def test_a_client_that_leaves_while_waiting_is_dropped_on_any_route(app: App, port: int) -> None:
    with connect(port) as sock:
        sock.sendall(request("GET", "/wait"))
        assert app.waiting.wait(5)
    assert app.cancelled.wait(5), "the app went on waiting for a client that had left"


def test_a_client_that_leaves_while_its_request_is_pipelined_is_dropped(app: App, port: int) -> None:
    with connect(port) as sock:
        sock.sendall(request("GET", "/wait") + request("GET", "/queued-behind"))
        assert app.waiting.wait(5)
    assert app.cancelled.wait(5)


def test_an_app_failure_is_a_json_500(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(request("GET", "/boom"))
        status, headers, body = read_response(sock, bytearray())
        assert status == 500 and headers["connection"] == "close"
        assert front_door_error(body)["type"] == "server_error"


# --- protocol errors and limits ---------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",  # a raw non-ASCII target
        b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        b"POST / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\nab",
    ],
)
def test_a_malformed_request_is_a_json_400_and_the_end_of_the_connection(port: int, raw: bytes) -> None:
    with connect(port) as sock:
        sock.sendall(raw)
        status, headers, body = read_response(sock, bytearray())
        assert status == 400 and headers["connection"] == "close"
        front_door_error(body)
        assert closed(sock)


def test_a_bodiless_upgrade_request_is_answered_as_http_1_1_then_closed(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(request("GET", "/ws", extra="Connection: Upgrade\r\nUpgrade: websocket\r\n"))
        status, headers, body = read_response(sock, bytearray())
        assert status == 200 and headers["connection"] == "close" and json.loads(body)["path"] == "/ws"
        assert closed(sock)


def test_headers_past_the_limit_get_431(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(request("GET", "/", extra="X-Big: " + "x" * (wire.MAX_HEADER_BYTES + 10) + "\r\n"))
        status, headers, body = read_response(sock, bytearray())
        assert status == 431 and headers["connection"] == "close"
        assert str(wire.MAX_HEADER_BYTES) in front_door_error(body)["message"]
    with connect(port) as sock:  # many small headers count together
        many = "".join(f"X-H{i}: {'v' * 60}\r\n" for i in range(wire.MAX_HEADER_BYTES // 60))
        sock.sendall(request("GET", "/", extra=many))
        assert read_response(sock, bytearray())[0] == 431
    with connect(port) as sock:  # just under the limit is fine
        sock.sendall(request("GET", "/", extra="X-Big: " + "x" * (wire.MAX_HEADER_BYTES - 200) + "\r\n"))
        assert read_response(sock, bytearray())[0] == 200


def test_an_endless_header_is_cut_off_early(port: int) -> None:
    """An unterminated 32 MB header: the server answers 431 and stops taking it after the limit."""
    piece = b"x" * 65536
    sent = 0
    got = bytearray()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
            while sent < 32 * 1024 * 1024 and b"\r\n\r\n" not in got:
                sock.sendall(piece)
                sent += len(piece)
                while select.select([sock], [], [], 0)[0]:
                    data = sock.recv(65536)
                    if not data:
                        break
                    got += data
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert got.startswith(b"HTTP/1.1 431 "), got[:100]
    assert sent < 4 * 1024 * 1024, f"{sent} bytes of one header were taken"


def test_headers_that_do_not_arrive_in_time_get_408(monkeypatch: pytest.MonkeyPatch, app: App) -> None:
    monkeypatch.setattr(wire, "HEADER_TIMEOUT_S", 0.5)
    with serving(app) as port, connect(port) as sock:
        t0 = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        status, _, body = read_response(sock, bytearray())
        assert status == 408 and front_door_error(body)["type"] == "timeout_error"
        assert closed(sock) and time.monotonic() - t0 < 4


def test_a_body_that_stalls_gets_408_and_one_that_trickles_is_read(monkeypatch: pytest.MonkeyPatch, app: App) -> None:
    monkeypatch.setattr(wire, "BODY_TIMEOUT_S", 0.6)
    with serving(app) as port:
        with connect(port) as sock:
            sock.sendall(request("POST", "/", b"0123456789" * 10)[:-90])  # 10 of the 100 bytes
            t0 = time.monotonic()
            status, _, body = read_response(sock, bytearray())
            assert status == 408 and "stalled" in front_door_error(body)["message"]
            assert closed(sock) and time.monotonic() - t0 < 4
        with connect(port) as sock:  # a byte every 0.2 s: slow, but never silent for the whole timeout
            data = request("POST", "/", b"abcdefgh")
            sock.sendall(data[:-8])
            for byte in data[-8:]:
                time.sleep(0.2)
                sock.sendall(bytes([byte]))
            status, _, body = read_response(sock, bytearray())
            assert status == 200 and json.loads(body)["body"] == "abcdefgh"


def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(port: int) -> None:
    for extra in ("", "Expect: 100-continue\r\n"):
        with connect(port) as sock:
            sock.sendall(f"POST / HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: 10000000\r\n\r\n".encode())
            buf = bytearray()
            status, headers, body = read_response(sock, buf)
            assert status == 413 and headers["connection"] == "close"
            assert "4096" in front_door_error(body)["message"]
            assert closed(sock)


def test_a_chunked_body_over_the_limit_is_refused_as_it_passes_it(port: int) -> None:
    with connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"y" * 3000
        sock.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk) * 2)  # 6000 bytes, no last chunk
        status, headers, body = read_response(sock, bytearray())
        assert status == 413 and headers["connection"] == "close" and "max_body_bytes" in body.decode()


def test_idle_connections_past_the_cap_are_closed_longest_idle_first(monkeypatch: pytest.MonkeyPatch, app: App) -> None:
    monkeypatch.setattr(wire, "MAX_IDLE_CONNECTIONS", 3)
    with serving(app) as port:
        socks = []
        try:
            for _ in range(5):
                sock = connect(port)
                sock.sendall(request("GET", "/"))
                assert read_response(sock, bytearray())[0] == 200
                socks.append(sock)
            assert closed(socks[0]) and closed(socks[1])
            for sock in socks[2:]:
                sock.sendall(request("GET", "/again"))
                assert read_response(sock, bytearray())[0] == 200
        finally:
            for sock in socks:
                sock.close()


def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive_timeout(app: App) -> None:
    with serving(app, timeout_keep_alive=1) as port, connect(port) as sock:
        t0 = time.monotonic()
        assert closed(sock, within_s=5) and time.monotonic() - t0 < 4


def test_shutdown_closes_idle_connections_and_requests_still_arriving(app: App) -> None:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,  # type: ignore[arg-type]
            host="127.0.0.1",
            port=port,
            http=wire.FrontDoorProtocol,  # type: ignore[arg-type]
            loop="uvloop",
            lifespan="off",
            log_level="critical",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    with connect(port) as idle, connect(port) as uploading:
        idle.sendall(request("GET", "/"))
        assert read_response(idle, bytearray())[0] == 200
        uploading.sendall(request("POST", "/", b"0123456789")[:-5])
        deadline = time.monotonic() + 5
        while not any(getattr(c, "reading", None) for c in server.server_state.connections):
            assert time.monotonic() < deadline, "the half-sent request never reached the server"
            time.sleep(0.01)
        server.should_exit = True
        thread.join(5)
        assert not thread.is_alive(), "shutdown waited on a request still arriving"
        assert closed(idle) and closed(uploading)
