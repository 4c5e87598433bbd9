"""CoalescingTransport: what is written in one turn of the loop leaves in one write."""

from __future__ import annotations

import asyncio
from typing import Any

from modelfleet.wire import CoalescingTransport


class Recorder(asyncio.Transport):
    """Stands in for the socket's transport: records each write it is handed."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0


def test_writes_of_one_turn_leave_together_and_later_turns_apart() -> None:
    async def main() -> None:
        inner = Recorder()
        t = CoalescingTransport(inner, asyncio.get_running_loop())
        t.write(b"HTTP/1.1 200 OK\r\n\r\n")
        t.write(b"")
        t.writelines([b"body", bytearray(b"!")])
        assert inner.writes == [] and t.get_write_buffer_size() == 24
        await asyncio.sleep(0)
        assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody!"]
        t.write(b"chunk 1")
        await asyncio.sleep(0)
        t.write(b"chunk 2")
        await asyncio.sleep(0)
        assert inner.writes[1:] == [b"chunk 1", b"chunk 2"]

    asyncio.run(main())


def test_close_flushes_first_and_abort_drops() -> None:
    async def main() -> None:
        inner = Recorder()
        t = CoalescingTransport(inner, asyncio.get_running_loop())
        t.write(b"last words")
        t.close()
        assert inner.writes == [b"last words"] and inner.closed
        await asyncio.sleep(0)
        assert inner.writes == [b"last words"]  # the scheduled flush finds nothing left

        inner = Recorder()
        t = CoalescingTransport(inner, asyncio.get_running_loop())
        t.write(b"never sent")
        t.abort()
        await asyncio.sleep(0)
        assert inner.writes == [] and inner.aborted

    asyncio.run(main())
