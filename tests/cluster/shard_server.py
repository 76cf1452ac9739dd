"""A shard server as a lab would run it: nginx in its own network namespace, on a rate-limited link.

`ShardServer` serves a folder with nginx (Python's threaded http.server where nginx is not installed)
on `<namespace address>:8080`; the namespace's egress is shaped with `tc qdisc ... tbf` (this kernel
has no netem). `DelayProxy` adds latency: a small asyncio TCP proxy on 127.0.0.1 that forwards each
chunk after a fixed delay in each direction. The server can be stopped and started again on the
same address (an outage). Only the test-made namespace and 127.0.0.1 are used.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.cluster.netns import HostNetwork

PORT = 8080

NGINX_CONF = """daemon off; user root; worker_processes 1; pid {dir}/nginx.pid; error_log {dir}/error.log;
events {{ worker_connections 256; }}
http {{ access_log {dir}/access.log; sendfile on; keepalive_timeout 30;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fcgi;
  uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  types {{ application/json json; application/x-tar tar; image/png png; }}
  server {{ listen {addr}:{port}; root {root}; }} }}
"""


class ShardServer:
    """nginx (or http.server) serving `folder` from a namespace whose link is limited to `rate`."""

    def __init__(self, workdir: Path, folder: Path, rate: str = "1gbit") -> None:
        self.workdir, self.folder, self.rate = workdir, folder, rate
        self.net = HostNetwork(workdir / "net", ["store"])
        self.proc: subprocess.Popen | None = None
        self.kind = "nginx" if shutil.which("nginx") else "python http.server"
        self.log = workdir / ("access.log" if self.kind == "nginx" else "http.log")

    @property
    def addr(self) -> str:
        return self.net.hosts["store"].addr

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{PORT}"

    def start(self) -> ShardServer:
        if not self.net._made:
            self.net.start()
            ns = self.net.hosts["store"].netns
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate",
                            self.rate, "burst", "256kb", "latency", "50ms"], check=True, capture_output=True)
        if self.kind == "nginx":
            conf = self.workdir / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=self.workdir, addr=self.addr, port=PORT, root=self.folder))
            argv = ["nginx", "-c", str(conf), "-p", str(self.workdir)]
        else:
            argv = [sys.executable, "-m", "http.server", str(PORT), "--bind", self.addr, "--directory", str(self.folder)]
        with open(self.workdir / "server.out", "a") as out, open(self.log, "a") as err:
            self.proc = subprocess.Popen(self.net.command("store", argv), stdout=out,
                                         stderr=err if self.kind != "nginx" else out)
        self._wait_until(lambda: self._accepts(), "the shard server to accept connections")
        return self

    def stop(self) -> None:
        """Kill the server (every process in its namespace, all started here) and wait until it is gone."""
        if self.proc is None:
            return
        pids = self.net.pids("store")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.proc = None
        self._wait_until(lambda: not self.net.pids("store"), "the shard server to exit")

    def requests(self) -> list[str]:
        """Request lines seen so far (from the access log)."""
        return [line for line in self.log.read_text(errors="replace").splitlines() if "GET " in line] \
            if self.log.exists() else []

    def close(self) -> None:
        self.stop()
        self.net.close()

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.addr, PORT), timeout=0.5):
                return True
        except OSError:
            return False

    @staticmethod
    def _wait_until(ready: object, what: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.05)
        raise TimeoutError(f"timed out waiting for {what}")


class DelayProxy:
    """127.0.0.1:port -> target, every chunk forwarded `delay` seconds after it arrived (each direction)."""

    def __init__(self, host: str, port: int, delay: float) -> None:
        self.target, self.delay = (host, port), delay
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.AbstractServer | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> DelayProxy:
        self.thread.start()
        started = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._handle, "127.0.0.1", 0), self.loop)
        self.server = started.result(timeout=10)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        async def shutdown() -> None:
            if self.server is not None:
                self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:  # the server is down: the client sees its connection closed
            writer.close()
            return
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except asyncio.CancelledError:  # the proxy is closing
            writer.close()
            up_writer.close()

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not data:
                    break
                try:
                    sink.write(data)
                    await sink.drain()
                except (ConnectionError, OSError):
                    break
            sink.close()

        sender = asyncio.create_task(send())
        try:
            while data := await source.read(1 << 16):
                queue.put_nowait((loop.time() + self.delay, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((loop.time() + self.delay, b""))
        await sender
