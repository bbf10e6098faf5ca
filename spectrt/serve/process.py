"""`spectrt serve` as a child process on a free loopback port (benchmarks and tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """Starts `spectrt serve BUNDLE` and waits until /health answers; stops it on exit."""

    def __init__(self, bundle: Path, *options: str, threads: int = 1, max_queue: int | None = None,
                 startup_timeout: float = 120.0):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(Path(sys.executable).parent / "spectrt"), "serve", str(bundle), "--port", str(self.port),
                   "--threads", str(threads), "--log-level", "warning", *options]
        if max_queue is not None:
            command += ["--max-queue", str(max_queue)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "OMP_NUM_THREADS": str(threads or os.cpu_count())})
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"spectrt serve exited: {self.process.stdout.read()}")
            try:
                health = httpx.get(f"{self.url}/health", timeout=1)
                if health.status_code == 200:
                    self.model = health.json()["model"]
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"spectrt serve did not answer /health within {startup_timeout:.0f} s")

    def metrics_text(self) -> str:
        import httpx

        return httpx.get(f"{self.url}/metrics", timeout=10).text

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
