"""A fake backend for faults a real llama-server can't show on demand. It answers
/health, and by path:

* ``/garbage``: bytes that are not HTTP, then it closes the connection;
* ``/echo...``: the request line it received, as JSON;
* ``POST /v1/chat/completions``: the first such request across every instance that
  shares MARKER gets the SSE headers and then a closed connection, no body; later ones
  get a short stream naming this instance's port.

Usage: scripted.py PORT MARKER
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT = int(sys.argv[1])
MARKER = sys.argv[2]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _json(self, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _any(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/health":
            self._json({"status": "ok"})
        elif self.path.startswith("/garbage"):
            self.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n")
            self.close_connection = True
        elif self.path.startswith("/echo"):
            self._json({"request_line": self.requestline, "port": PORT})
        elif self.command == "POST" and self.path == "/v1/chat/completions":
            self._chat()
        else:
            self.send_error(404)

    def _chat(self) -> None:
        try:
            fd = os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            first = False
        else:
            os.write(fd, str(PORT).encode())
            os.close(fd)
            first = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if first:  # headers, then the connection closes before any body byte
            self.wfile.flush()
            self.close_connection = True
            return
        for event in (json.dumps({"port": PORT, "choices": [{"delta": {"content": "hi"}}]}), "[DONE]"):
            data = f"data: {event}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.write(b"0\r\n\r\n")

    do_GET = do_POST = do_PUT = do_DELETE = _any

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
