"""The limits of one sandboxed load, which the child sets on itself, and the words for a limit that was hit.

The child applies them as its first act, before it reads anything the user sent: it is then an
unprivileged user (uid 65534 when the worker runs as root, the worker's own uid otherwise) in a
user namespace of its own, without capabilities in the worker's namespace, so the kernel
enforces every rlimit, RLIMIT_NPROC included (root with CAP_SYS_RESOURCE or CAP_SYS_ADMIN would
ignore it). Since Linux 5.14 the process count is kept per user namespace: each sandbox counts
its own processes and threads, and concurrent sandboxes of one uid do not share the budget
(measured: two fork bombs with a limit of 64 each forked 62 at the same time).

Memory is RLIMIT_DATA, not RLIMIT_AS: it counts the private writable memory a process maps
(the heap, anonymous mmaps), not address space merely reserved, which TensorFlow, PyTorch and
glibc's per-thread arenas reserve in gigabytes. All rlimits are per process; the process limit
bounds how many such processes a load can hold, and leaving the sandbox's pid namespace ends
them all.
"""

from __future__ import annotations

import resource
import signal
from dataclasses import asdict, dataclass

from shared.errors import one_line
from shared.settings import Settings

MB = 2**20
CPU_GRACE_S = 5  # SIGXCPU at the soft limit, SIGKILL this much later if the process ignores it

MEMORY_WORDS = ("memoryerror", "bad_alloc", "cannot allocate memory", "not enough memory", "out of memory",
                "failed to allocate")
PROCESS_WORDS = ("can't start new thread", "resource temporarily unavailable", "pthread_create")
FILE_WORDS = ("file too large", "errno 27")


@dataclass(frozen=True)
class Limits:
    memory_mb: int
    cpu_s: int
    file_mb: int
    procs: int
    wall_s: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(memory_mb=settings.sandbox_memory_mb, cpu_s=settings.sandbox_cpu_s,
                   file_mb=settings.sandbox_file_mb, procs=settings.sandbox_procs, wall_s=settings.sandbox_wall_s)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def apply(self) -> None:
        """Set this process's rlimits (inherited by everything it starts). Only ever lowers them."""
        _lower(resource.RLIMIT_DATA, self.memory_mb * MB)
        _lower(resource.RLIMIT_CPU, self.cpu_s, self.cpu_s + CPU_GRACE_S)
        _lower(resource.RLIMIT_FSIZE, self.file_mb * MB)
        _lower(resource.RLIMIT_NPROC, self.procs)
        _lower(resource.RLIMIT_CORE, 0)

    # --- what the job is told ------------------------------------------------------------------

    def memory_message(self) -> str:
        return (f"model load ran out of memory in the sandbox (limit {self.memory_mb} MB per process, "
                "MODELYARD_SANDBOX_MEMORY_MB)")

    def cpu_message(self) -> str:
        return f"model load exceeded its CPU time limit in the sandbox ({self.cpu_s} s, MODELYARD_SANDBOX_CPU_S)"

    def wall_message(self) -> str:
        return (f"model load did not finish within {self.wall_s} s in the sandbox and was stopped "
                "(MODELYARD_SANDBOX_WALL_S)")

    def file_message(self) -> str:
        return (f"model load tried to write a file over {self.file_mb} MB in the sandbox "
                "(MODELYARD_SANDBOX_FILE_MB)")

    def procs_message(self) -> str:
        return (f"model load tried to run more than {self.procs} processes and threads in the sandbox "
                "(MODELYARD_SANDBOX_PROCS)")

    def classify(self, text: str) -> str | None:
        """The limit an error text points at (a MemoryError, EAGAIN from fork, EFBIG), as the job's message."""
        lowered = text.lower()
        if any(word in lowered for word in MEMORY_WORDS):
            return self.memory_message()
        if any(word in lowered for word in PROCESS_WORDS):
            return self.procs_message()
        if any(word in lowered for word in FILE_WORDS):
            return self.file_message()
        return None

    def ended(self, returncode: int, *, log_tail: str) -> str:
        """The message for a child that left no result: killed by a signal, or exited with an error."""
        if returncode > 128:
            number = returncode - 128
            if number == signal.SIGXCPU:
                return self.cpu_message()
            if number == signal.SIGXFSZ:
                return self.file_message()
            by_limit = self.classify(log_tail)
            if by_limit:
                return by_limit
            if number == signal.SIGKILL:  # the CPU limit's hard stop, or the kernel's OOM killer
                return (f"model load was killed in the sandbox (SIGKILL): it ran past its CPU time limit "
                        f"({self.cpu_s} s, MODELYARD_SANDBOX_CPU_S) or the machine ran out of memory")
            name = _signal_name(number)
            detail = f": {one_line(_last_line(log_tail))}" if log_tail.strip() else ""
            return f"model load crashed in the sandbox (killed by {name}){detail}"
        by_limit = self.classify(log_tail)
        if by_limit:
            return by_limit
        detail = one_line(_last_line(log_tail)) if log_tail.strip() else "no output"
        return f"model load ended in the sandbox without a result (exit status {returncode}): {detail}"


def _lower(kind: int, soft: int, hard: int | None = None) -> None:
    hard = soft if hard is None else hard
    _, old_hard = resource.getrlimit(kind)
    if old_hard != resource.RLIM_INFINITY:
        hard = min(hard, old_hard)
    soft = min(soft, hard)
    resource.setrlimit(kind, (soft, hard))


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
