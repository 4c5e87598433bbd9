"""The front door's upstream client: a real llama-server for what it does every day,
small asyncio servers for the faults a real one cannot be made to show on demand."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from conftest import StackFactory, free_ports
from modelfleet import upstream

JSON = {"Content-Type": "application/json"}
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


async def read_all(response: upstream.Response) -> bytes:
    return b"".join([chunk async for chunk in response.chunks()])


async def serve(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


@pytest.fixture
def backend(make_stack: StackFactory, tiny_model: Path) -> int:
    (port,) = free_ports(1)
    stack = make_stack(
        f"servers:\n  m:\n    model: {tiny_model}\n    port: {port}\n    roles: [m]\n    threads: 1\n"
        "    ctx_size: 1024\n    parallel: 2\n"
    )
    stack.start(stack.select())
    return port


def test_requests_reuse_one_kept_alive_connection(backend: int) -> None:
    async def main() -> None:
        client = upstream.Client()
        seen = set()
        for text in ("one", "two", "three"):
            body = json.dumps({"content": text}).encode()
            response = await client.request("POST", "127.0.0.1", backend, "/tokenize", JSON, body)
            assert response.status == 200
            assert (b"content-type", b"application/json; charset=utf-8") in [
                (k.lower(), v) for k, v in response.raw_headers
            ]
            assert json.loads(await read_all(response))["tokens"]
            assert response.arrived
            seen.add(id(response.conn))
            response.release()
        assert len(seen) == 1
        await client.close()

    run(main())


def test_a_stream_arrives_in_many_chunks_and_is_not_kept(backend: int) -> None:
    async def main() -> None:
        client = upstream.Client()
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "stream": True}
        response = await client.request(
            "POST", "127.0.0.1", backend, "/v1/chat/completions", JSON, json.dumps(body).encode()
        )
        assert response.status == 200
        chunks = [chunk async for chunk in response.chunks()]
        assert len(chunks) > 3
        assert b"data: [DONE]" in b"".join(chunks)
        conn = response.conn
        response.release()
        await asyncio.sleep(0.2)
        # llama-server closes a connection after a stream, whatever it advertised; it is never handed out again.
        again = await client.request("POST", "127.0.0.1", backend, "/tokenize", JSON, b'{"content": "x"}')
        assert again.conn is not conn
        again.release()
        await client.close()

    run(main())


def test_closing_a_response_mid_stream_cancels_the_generation(backend: int) -> None:
    async def main() -> None:
        client = upstream.Client()
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 900, "stream": True}
        response = await client.request(
            "POST", "127.0.0.1", backend, "/v1/chat/completions", JSON, json.dumps(body).encode()
        )
        async for _ in response.chunks():
            break
        response.close()
        probe = await client.request("GET", "127.0.0.1", backend, "/slots", {}, b"")
        for _ in range(100):
            slots = json.loads(await read_all(probe))
            probe.release()
            if not any(s["is_processing"] for s in slots):
                break
            await asyncio.sleep(0.05)
            probe = await client.request("GET", "127.0.0.1", backend, "/slots", {}, b"")
        else:
            raise AssertionError("llama-server kept generating after the connection closed")
        await client.close()

    run(main())


def test_refused_connection_is_connect_failed() -> None:
    (port,) = free_ports(1)

    async def main() -> None:
        with pytest.raises(upstream.ConnectFailed, match="cannot connect"):
            await upstream.Client().request("GET", "127.0.0.1", port, "/", {}, b"")

    run(main())


def test_a_kept_connection_dropped_before_answering_is_stale_and_not_reused() -> None:
    served = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await read_request(reader)
        served += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # the second request on this connection: drop it unanswered
        writer.close()

    async def main() -> None:
        server, port = await serve(handler)
        client = upstream.Client()
        first = await client.request("GET", "127.0.0.1", port, "/", {}, b"")
        assert await read_all(first) == b"ok"
        first.release()
        with pytest.raises(upstream.Stale, match="before a response began"):
            await client.request("GET", "127.0.0.1", port, "/", {}, b"")
        # The dropped connection is gone: the next request opens a fresh one and is answered.
        third = await client.request("GET", "127.0.0.1", port, "/", {}, b"")
        assert await read_all(third) == b"ok"
        third.release()
        assert served == 2
        server.close()
        await client.close()

    run(main())


def test_connection_close_from_the_server_is_honoured() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async def main() -> None:
        server, port = await serve(handler)
        client = upstream.Client()
        for _ in range(3):
            response = await client.request("GET", "127.0.0.1", port, "/", {}, b"")
            assert await read_all(response) == b"ok"
            response.release()
        assert connections == 3
        server.close()
        await client.close()

    run(main())


def test_silence_past_sock_read_is_a_timeout_before_and_after_the_headers() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request(reader)
        if b"/partial" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await asyncio.sleep(5)
        writer.close()

    async def main() -> None:
        server, port = await serve(handler)
        client = upstream.Client(sock_read=0.3)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(TimeoutError):
            await client.request("GET", "127.0.0.1", port, "/silent", {}, b"")
        response = await client.request("GET", "127.0.0.1", port, "/partial", {}, b"")
        got = b""
        with pytest.raises(TimeoutError, match="no data from the backend"):
            async for chunk in response.chunks():
                got += chunk
        assert got == b"abc"
        response.close()
        assert loop.time() - t0 < 3
        server.close()
        await client.close()

    run(main())


def test_malformed_and_cut_off_responses_are_broken_off() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request(reader)
        if b"/garbage" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server, port = await serve(handler)
        client = upstream.Client()
        for path, match in (("/garbage", "malformed"), ("/short", "mid-response")):
            response = await client.request("GET", "127.0.0.1", port, path, {}, b"")
            with pytest.raises(upstream.BrokenOff, match=match):
                await read_all(response)
            response.close()
        server.close()
        await client.close()

    run(main())


def test_a_body_that_runs_to_the_close_and_a_large_body_read_slowly_arrive_whole() -> None:
    big = bytes(range(256)) * 16384  # 4 MiB: past the high-water mark, so reading pauses and resumes

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request(reader)
        if b"/eof" in head:
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
        await writer.drain()
        writer.close()

    async def main() -> None:
        server, port = await serve(handler)
        client = upstream.Client()
        response = await client.request("GET", "127.0.0.1", port, "/eof", {}, b"")
        assert await read_all(response) == b"until the end"
        response.release()
        response = await client.request("GET", "127.0.0.1", port, "/big", {}, b"")
        got = bytearray()
        async for chunk in response.chunks():
            got += chunk
            await asyncio.sleep(0.001)
        assert got == big
        response.release()
        server.close()
        await client.close()

    run(main())


def test_bytes_that_are_not_http_before_the_headers_are_garbled_an_upstream_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        await writer.drain()
        await asyncio.sleep(5)
        writer.close()

    async def main() -> None:
        server, port = await serve(handler)
        client = upstream.Client()
        with pytest.raises(upstream.Garbled, match="did not answer HTTP") as caught:
            await client.request("GET", "127.0.0.1", port, "/", {}, b"")
        assert isinstance(caught.value, upstream.UpstreamError)  # retried elsewhere, its slot freed
        server.close()
        await client.close()

    run(main())


def test_a_request_http_cannot_carry_is_unsendable_and_never_sent() -> None:
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    async def main() -> None:
        server, port = await serve(handler)
        client = upstream.Client()
        for target, headers in (
            ("/caf\u20ac", {}),  # not Latin-1
            ("/a\r\nX-Injected: 1", {}),
            ("/a b", {}),
            ("/", {"Accept": "x\r\nX-Injected: 1"}),
        ):
            with pytest.raises(upstream.Unsendable):
                await client.request("GET", "127.0.0.1", port, target, headers, b"")
        assert connections == 0
        server.close()
        await client.close()

    run(main())


def test_body_begun_waits_for_the_first_body_byte_and_reports_a_cut_before_it() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request(reader)
        if b"/dies" in head:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)
        elif b"/empty" in head:
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.write(b"2\r\nok\r\n0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server, port = await serve(handler)
        client = upstream.Client()
        response = await client.request("GET", "127.0.0.1", port, "/dies", {}, b"")
        with pytest.raises(upstream.BrokenOff):
            await response.body_begun()
        response.close()
        response = await client.request("GET", "127.0.0.1", port, "/empty", {}, b"")
        await response.body_begun()
        assert response.arrived and await read_all(response) == b""
        response.close()
        response = await client.request("GET", "127.0.0.1", port, "/later", {}, b"")
        assert not response.arrived
        await response.body_begun()
        assert await read_all(response) == b"ok"
        response.close()
        server.close()
        await client.close()

    run(main())


def test_an_interim_1xx_response_is_skipped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def main() -> None:
        server, port = await serve(handler)
        client = upstream.Client()
        response = await client.request("GET", "127.0.0.1", port, "/", {}, b"")
        assert response.status == 200 and [k for k, _ in response.raw_headers] == [b"Content-Length"]
        assert await read_all(response) == b"ok"
        response.close()
        server.close()
        await client.close()

    run(main())
