"""A real threaded HTTP file server whose answers can fail on purpose, for the shard-download tests.

It serves a folder (GET, optional `Range: bytes=N-` answered with 206 like nginx), records every
request, and applies per-path fault plans: a list consumed one request at a time, each entry
"503" (answer Service Unavailable), "cut" (send the headers and half the body, then drop the
connection), "404", or "ok". Only 127.0.0.1 is used.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Plan:
    folder: Path
    ranges: bool = True  # answer Range requests with 206 (nginx does; Python's http.server does not)
    faults: dict[str, list[str]] = field(default_factory=dict)  # path -> outcomes of its next requests
    always: dict[str, str] = field(default_factory=dict)  # path -> outcome of every request
    log: list[tuple[str, str]] = field(default_factory=list)  # (path, Range header or "")
    lock: threading.Lock = field(default_factory=threading.Lock)

    def outcome(self, path: str) -> str:
        with self.lock:
            self.log.append((path, ""))
            if path in self.always:
                return self.always[path]
            queue = self.faults.get(path)
            return queue.pop(0) if queue else "ok"

    def gets(self, path: str) -> int:
        return sum(1 for p, _ in self.log if p == path)


def _handler(plan: Plan) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            outcome = plan.outcome(self.path)
            with plan.lock:
                plan.log[-1] = (self.path, self.headers.get("Range", ""))
            file = plan.folder / self.path.lstrip("/")
            if outcome == "404" or not file.is_file():
                self.send_error(404)
                return
            if outcome == "503":
                self.send_error(503)
                return
            data = file.read_bytes()
            start = 0
            header = self.headers.get("Range", "")
            if plan.ranges and header.startswith("bytes=") and header.endswith("-"):
                start = int(header[6:-1])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if outcome == "cut":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.connection.shutdown(2)  # the server went away mid-download
                return
            self.wfile.write(body)

    return Handler


@contextmanager
def serve(plan: Plan) -> Iterator[str]:
    """Serve `plan.folder` on 127.0.0.1 (a free port) until the block ends; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(plan))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))

