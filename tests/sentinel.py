"""A private Redis Sentinel group for the tests: a master, its replicas and sentinels, each its own process.

All of them are the same ``redis-server`` binary (``shared.redis_server``; ``--sentinel`` for the
sentinels), on loopback and free ports, with a password on the data nodes and another on the
sentinels. Sentinel timings are short (``down-after-milliseconds`` 1000) so that a failover takes
seconds, not the production default of half a minute.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from shared.redis_server import RedisServer, free_port, redis_executable, start_redis, stop_process

MASTER_NAME = "modelyard"


@dataclass
class SentinelProcess:
    process: subprocess.Popen
    port: int
    folder: Path

    def stop(self) -> None:
        stop_process(self.process)


@dataclass
class SentinelGroup:
    folder: Path
    master: RedisServer
    replicas: list[RedisServer]
    sentinel_password: str
    sentinels: list[SentinelProcess] = field(default_factory=list)
    master_name: str = MASTER_NAME

    @property
    def password(self) -> str:
        return self.master.password

    @property
    def url(self) -> str:
        """The broker URL in modelyard's sentinel form (shared/broker.py)."""
        first, *others = (f"127.0.0.1:{s.port}" for s in self.sentinels)
        hosts = f"sentinel://:{self.password}@{first}" + "".join(f";sentinel://{h}" for h in others)
        return f"{hosts}/0?master_name={self.master_name}&sentinel_password={self.sentinel_password}"

    def servers(self) -> list[RedisServer]:
        return [self.master, *self.replicas]

    def sentinel_client(self, sentinel: SentinelProcess) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=sentinel.port, password=self.sentinel_password,
                           socket_timeout=2, socket_connect_timeout=2, retry=None, decode_responses=True)

    def master_port(self) -> int | None:
        """The master's port as most sentinels report it now (None while they do not agree)."""
        ports: list[int] = []
        for sentinel in self.sentinels:
            try:
                address = self.sentinel_client(sentinel).sentinel_get_master_addr_by_name(self.master_name)
            except redis.RedisError:
                continue
            if address:
                ports.append(int(address[1]))
        best = max(set(ports), key=ports.count, default=None)
        return best if best is not None and ports.count(best) > len(self.sentinels) // 2 else None

    def ready(self) -> bool:
        """Every replica synced and every sentinel sees the master, the replicas and the other sentinels."""
        for sentinel in self.sentinels:
            try:
                state = self.sentinel_client(sentinel).sentinel_master(self.master_name)
            except redis.RedisError:
                return False
            if (int(state.get("num-slaves", 0)) < len(self.replicas)
                    or int(state.get("num-other-sentinels", 0)) < len(self.sentinels) - 1
                    or "s_down" in str(state.get("flags", ""))):
                return False
        for replica in self.replicas:
            try:
                info = replica.client().info("replication")
            except redis.RedisError:
                return False
            if info.get("master_link_status") != "up":
                return False
        return True

    def kill_master(self) -> int:
        """SIGKILL the current master (no AOF flush, no goodbye to the replicas); returns its port."""
        port = self.master_port()
        victim = next(s for s in self.servers() if s.port == port)
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(10)
        return victim.port

    def kill_sentinel(self, index: int) -> None:
        """SIGKILL one sentinel (as when the host it shares with the master is lost)."""
        process = self.sentinels[index].process
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers():
            server.stop()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not after {timeout} s")
        time.sleep(interval)


def start_sentinel_group(folder: Path, *, replicas: int = 1, sentinels: int = 3, quorum: int = 2,
                         down_after_ms: int = 1000, failover_timeout_ms: int = 3000,
                         timeout: float = 60) -> SentinelGroup:
    """Start a master, ``replicas`` replicas and ``sentinels`` sentinels; return once the group is ready."""
    password = secrets.token_urlsafe(18)
    # Every data node may become a replica (the old master, restarted, too): each needs masterauth.
    auth = (f"masterauth {password}",)
    master = start_redis(folder / "master", password=password, extra_config=auth)
    group = SentinelGroup(folder=folder, master=master, replicas=[], sentinel_password=secrets.token_urlsafe(18))
    try:
        for n in range(replicas):
            group.replicas.append(start_redis(
                folder / f"replica{n}", password=password,
                extra_config=(*auth, f"replicaof 127.0.0.1 {master.port}", "replica-priority 100"),
            ))
        for n in range(sentinels):
            group.sentinels.append(_start_sentinel(folder / f"sentinel{n}", group, quorum=quorum,
                                                   down_after_ms=down_after_ms,
                                                   failover_timeout_ms=failover_timeout_ms))
        wait_until(group.ready, timeout, "sentinel group ready", interval=0.2)
    except BaseException:
        group.stop()
        raise
    return group


def _start_sentinel(folder: Path, group: SentinelGroup, *, quorum: int, down_after_ms: int,
                    failover_timeout_ms: int) -> SentinelProcess:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "sentinel.conf"  # sentinels rewrite their config file: it must be writable
    config.touch(mode=0o600)
    name = group.master_name
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {folder}\nlogfile {folder / 'sentinel.log'}\n"
        f"requirepass {group.sentinel_password}\nsentinel sentinel-pass {group.sentinel_password}\n"
        f"sentinel monitor {name} 127.0.0.1 {group.master.port} {quorum}\n"
        f"sentinel auth-pass {name} {group.password}\n"
        f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
        f"sentinel failover-timeout {name} {failover_timeout_ms}\n"
        f"sentinel parallel-syncs {name} 1\n"
    )
    process = subprocess.Popen([redis_executable(), str(config), "--sentinel"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sentinel = SentinelProcess(process=process, port=port, folder=folder)

    def answers() -> bool:
        if process.poll() is not None:
            log = folder / "sentinel.log"
            raise RuntimeError(f"sentinel on port {port} exited: {log.read_text()[-2000:] if log.exists() else ''}")
        try:
            return bool(group.sentinel_client(sentinel).ping())
        except redis.RedisError:
            return False

    try:
        wait_until(answers, 10, f"sentinel on port {port}")
    except BaseException:
        sentinel.stop()
        raise
    return sentinel
