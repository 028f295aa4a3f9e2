"""Host-level faults for tests/reliability/test_chaos.py: a TCP proxy that can hang, a memory cgroup, a tiny tmpfs.

``TcpProxy`` sits between workers and a server (Redis, the GCS emulator). ``hang()`` stops it
forwarding bytes in either direction without closing anything, as a network partition does: the
clients' connections stay open and silent. ``heal()`` lets new connections through again; the
connections that lived through the partition stay black-holed, as after a NAT or conntrack entry
expired: only a client's own timeout frees it from them. (TCP keepalive cannot notice that here:
the proxy's kernel answers the probes.) ``hang_on(pattern)`` hangs the moment a client sends bytes
containing the pattern, before they reach the server; ``sever()`` closes every connection.

``memory_cgroup`` and ``tmpfs`` need root; they raise ``Unavailable`` (the tests skip) elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
CGROUP_V2 = Path("/sys/fs/cgroup")


class Unavailable(RuntimeError):
    """This machine cannot inject the fault (not root, no cgroup controller, no mount)."""


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.upstream: socket.socket | None = None
        self.black_holed = False  # lived through a partition: never forwards again
        self.closed = False
        self.tail = b""  # the last client bytes, for a pattern split across reads

    def close(self) -> None:
        self.closed = True
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


class TcpProxy:
    """Forward 127.0.0.1:<port> to upstream; see the module docstring for the faults it injects."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Condition()
        self._links: list[_Link] = []
        self._hung = False
        self._pattern: bytes | None = None
        self.triggered = threading.Event()
        self._stopped = False
        threading.Thread(target=self._accept, name=f"proxy-{self.port}", daemon=True).start()

    # -- what a test does ---------------------------------------------------------------
    def hang(self) -> None:
        with self._lock:
            self._hung = True

    def hang_on(self, pattern: bytes) -> None:
        """Hang everything when a client next sends bytes containing pattern (they are held back)."""
        with self._lock:
            self._pattern = pattern
            self.triggered.clear()

    def heal(self) -> None:
        """New connections forward again; every connection opened before now stays silent for good."""
        with self._lock:
            for link in self._links:
                link.black_holed = True
            self._hung = False
            self._lock.notify_all()

    def sever(self) -> None:
        """Close every connection, as a server that went away does (clients see a reset or EOF)."""
        with self._lock:
            links, self._links = self._links, []
            self._lock.notify_all()
        for link in links:
            link.close()

    def connections(self) -> int:
        with self._lock:
            return sum(not link.closed for link in self._links)

    def close(self) -> None:
        self._stopped = True
        self._listener.close()
        self.sever()

    # -- the forwarding ------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            link = _Link(client)
            with self._lock:
                self._links.append(link)
            threading.Thread(target=self._connect, args=(link,), daemon=True).start()

    def _connect(self, link: _Link) -> None:
        try:
            link.upstream = socket.create_connection(self.upstream, timeout=5)
            link.upstream.settimeout(None)
        except OSError:  # the server is down: the client sees its connection closed
            link.close()
            return
        threading.Thread(target=self._pump, args=(link, link.client, link.upstream, True), daemon=True).start()
        self._pump(link, link.upstream, link.client, False)

    def _pump(self, link: _Link, source: socket.socket, dest: socket.socket, from_client: bool) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            with self._lock:
                if from_client and self._pattern is not None and self._pattern in link.tail + data:
                    self._pattern = None
                    self._hung = True
                    self.triggered.set()
                if from_client:
                    link.tail = (link.tail + data)[-256:]
                while self._hung and not link.closed and not link.black_holed:
                    self._lock.wait(0.5)  # partitioned: hold the bytes, keep the connection open
                if link.closed:
                    return
                silent = link.black_holed
            if silent:
                if not data:
                    link.close()
                    return
                continue  # black-holed: what the client sends is lost, nothing comes back
            if not data:
                link.close()
                return
            try:
                dest.sendall(data)
            except OSError:
                link.close()
                return


# -- memory cgroup -----------------------------------------------------------------------
def _v2_controllers() -> list[str]:
    controllers = CGROUP_V2 / "cgroup.controllers"  # present only on a cgroup v2 (unified) mount
    return controllers.read_text().split() if controllers.is_file() else []


@contextlib.contextmanager
def memory_cgroup(limit_mb: int) -> Iterator[tuple[list[str], str, Callable[[], int]]]:
    """A memory cgroup limited to limit_mb, with no swap to fall back on.

    Yields (command prefix that starts a process inside it, "cgroup v1" | "cgroup v2", a function
    returning how many times the kernel's OOM killer ran in it). Raises Unavailable without a
    writable memory controller.
    """
    if os.geteuid() != 0:
        raise Unavailable("memory cgroups need root")
    name = f"modelyard-chaos-{uuid.uuid4().hex[:8]}"
    limit = str(limit_mb * 2**20)
    if (CGROUP_V1_MEMORY / "memory.limit_in_bytes").is_file():
        kind, group = "cgroup v1", CGROUP_V1_MEMORY / name
        try:
            group.mkdir()
            (group / "memory.limit_in_bytes").write_text(limit)
            if (group / "memory.memsw.limit_in_bytes").is_file():
                (group / "memory.memsw.limit_in_bytes").write_text(limit)
        except OSError as exc:
            raise Unavailable(f"{CGROUP_V1_MEMORY} is not writable: {exc}") from None

        def oom_kills() -> int:
            for line in (group / "memory.oom_control").read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
            return -1  # a kernel before 4.13 does not count them
    elif "memory" in _v2_controllers():
        kind, group = "cgroup v2", CGROUP_V2 / name
        try:
            group.mkdir()
            (group / "memory.max").write_text(limit)
            (group / "memory.swap.max").write_text("0")
        except OSError as exc:
            raise Unavailable(f"{CGROUP_V2} does not let this process make a memory cgroup: {exc}") from None

        def oom_kills() -> int:
            for line in (group / "memory.events").read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
            return -1
    else:
        raise Unavailable("no memory cgroup controller is mounted under /sys/fs/cgroup")
    # The shell joins the group, then execs the worker: everything it forks is inside from its first page.
    prefix = ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group)]
    try:
        yield prefix, kind, oom_kills
    finally:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                group.rmdir()  # fails while a process is still inside
                break
            except OSError:
                time.sleep(0.2)


# -- a small disk ------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(folder: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of size_mb mounted on folder (created); unmounted afterwards. Unavailable without root."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        raise Unavailable("mounting a tmpfs needs root and mount(8)")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=1777", "tmpfs", str(folder)],
                             check=False, capture_output=True, text=True)
    if mounted.returncode != 0:
        raise Unavailable(f"mount -t tmpfs failed: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


def fill(folder: Path, leave_mb: float) -> Path:
    """Write a file into folder until only about leave_mb is free on its filesystem (another tenant's data)."""
    filler = folder / "filler.bin"
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    size = max(0, free - int(leave_mb * 2**20))
    with open(filler, "wb") as out:
        out.write(b"\xff" * size)
    return filler


def free_mb(folder: Path) -> float:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize / 2**20
