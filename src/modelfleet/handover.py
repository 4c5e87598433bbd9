"""Handing the front door's listening socket to its successor, so a reload refuses no connection.

A front door serves on a listening socket it binds itself, and offers it on a control
socket (a Linux abstract unix socket named after the state dir and port, so it needs no
file and fits any path length). A new front door of the same stack starting on the same
port first asks for it:

1. it connects and says ``TAKE``; the old one sends the socket (``SCM_RIGHTS``): from now
   on both accept from the same queue, so no connection waits on a socket about to close;
2. it starts serving, adopts the running instances, and says ``READY``;
3. the old one stops accepting and shuts down gracefully: requests in flight finish,
   queued ones move on, and it exits.

Only a peer of the same user may take the socket (``SO_PEERCRED``). If the new one dies
before ``READY``, the old one simply keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("modelfleet.handover")

TAKE, READY = b"TAKE\n", b"READY\n"
TIMEOUT_S = 10.0


def control_name(state_dir: Path, port: int) -> str:
    """The abstract socket name of the front door of ``state_dir`` on ``port``."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:16]
    return f"\0modelfleet-frontdoor-{digest}-{port}"


def listen(host: str, port: int) -> socket.socket:
    """The front door's listening socket (what uvicorn would bind), made here so it can be handed on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


class Predecessor:
    """The front door this one takes over from: told when this one is ready."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn

    def ready(self) -> None:
        try:
            self.conn.sendall(READY)
            self.conn.recv(16)  # its goodbye (or EOF): it has stopped accepting
        except OSError as exc:
            log.warning("the previous front door went away during the handover: %s", exc)
        finally:
            self.conn.close()


def take(state_dir: Path, port: int) -> tuple[socket.socket, Predecessor] | None:
    """The listening socket of a running front door of this stack, or None if there is none."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(TIMEOUT_S)
    try:
        conn.connect(control_name(state_dir, port))
        conn.sendall(TAKE)
        _, fds, _, _ = socket.recv_fds(conn, 16, 1)
    except OSError:
        conn.close()
        return None
    if not fds:
        conn.close()
        return None
    sock = socket.socket(fileno=fds[0])
    sock.set_inheritable(False)
    log.info("took over the listening socket on port %d from the running front door", port)
    return sock, Predecessor(conn)


async def offer(
    state_dir: Path, port: int, listener: socket.socket, on_taken: Callable[[], None]
) -> asyncio.AbstractServer | None:
    """Serve the control socket: hand ``listener`` to a successor, call ``on_taken`` once it is ready."""

    holder: list[asyncio.AbstractServer] = []

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The event loop's wrapper allows no sendmsg: talk over a duplicate of its descriptor.
        sock = socket.socket(fileno=os.dup(writer.get_extra_info("socket").fileno()))
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid != os.getuid():
                log.warning("refused a handover to uid %d", uid)
                return
            if await asyncio.wait_for(reader.readline(), TIMEOUT_S) != TAKE:
                return
            socket.send_fds(sock, [b"FD"], [listener.fileno()])
            if await reader.readline() != READY:
                log.warning("a successor took the listening socket but did not get ready; still serving")
                return
            log.info("the new front door is ready: handing over and shutting down")
            for server in holder:
                server.close()  # the name is the successor's to offer now
            on_taken()
            writer.write(b"BYE\n")
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            log.warning("handover failed: %s", exc)
        finally:
            sock.close()
            writer.close()

    try:
        holder.append(await asyncio.start_unix_server(client, path=control_name(state_dir, port)))
        return holder[0]
    except OSError as exc:  # another front door of this stack holds the name: it will hand over, not us
        log.warning("no handover socket (%s); a reload will restart this front door the slow way", exc)
        return None


async def close(server: asyncio.AbstractServer | None) -> None:
    if server is not None:
        server.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
