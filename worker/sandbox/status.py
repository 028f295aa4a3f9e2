"""Whether this worker can sandbox model loads, found by running a trivial sandboxed child.

The worker checks at start (``worker.sandbox.startup``) and a process that did not (a solo
worker, a script) checks before its first load. A check that worked is kept for the life of
the process; a failed one is repeated after ``RECHECK_S``, so that a fix (bubblewrap installed)
takes effect without a restart. While the sandbox does not work and ``MODELYARD_SANDBOX`` is not
``off``, every untrusted load fails with a message naming the setting and what is missing: a
model is never loaded unsandboxed because the sandbox broke.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shared.errors import UserInputError, one_line
from shared.settings import Settings
from worker.sandbox import bubblewrap
from worker.sandbox.limits import Limits

RECHECK_S = 60.0
PROBE_WALL_S = 60
INSTALL_HINT = "bubblewrap is not installed (no bwrap on PATH; Debian/Ubuntu: apt-get install bubblewrap)"


@dataclass(frozen=True)
class SandboxStatus:
    mode: str  # "bwrap" or "off"
    problem: str | None = None  # why the sandbox does not work here; None when it does (or is off)
    seconds: float = 0.0  # what the check took

    @property
    def works(self) -> bool:
        return self.problem is None


_checked: tuple[float, SandboxStatus] | None = None


def sandbox_status(settings: Settings) -> SandboxStatus:
    """This process's sandbox status: checked once when it works, again after RECHECK_S when it does not."""
    global _checked
    if settings.sandbox == "off":
        return SandboxStatus(mode="off")
    if _checked is not None:
        at, status = _checked
        if status.works or time.monotonic() - at < RECHECK_S:
            return status
    started = time.monotonic()
    status = SandboxStatus(mode="bwrap", problem=probe(settings), seconds=round(time.monotonic() - started, 3))
    _checked = (time.monotonic(), status)
    return status


def require_sandbox(settings: Settings) -> None:
    """UserInputError unless untrusted loads can run sandboxed (or the operator turned the sandbox off)."""
    status = sandbox_status(settings)
    if not status.works:
        raise UserInputError(
            f"this worker loads models only in a sandbox (MODELYARD_SANDBOX=bwrap) and the sandbox does not work "
            f"here: {status.problem}. Fix that, or set MODELYARD_SANDBOX=off on the worker to load models "
            "unsandboxed (not recommended)"
        )


def probe(settings: Settings) -> str | None:
    """Run a trivial sandboxed child: None if it worked, else what went wrong."""
    from worker.sandbox.process import run_child

    if shutil.which(bubblewrap.BWRAP) is None:
        return INSTALL_HINT
    limits = Limits.from_settings(settings.model_copy(update={"sandbox_wall_s": PROBE_WALL_S}))
    privileged = os.geteuid() == 0
    uid = bubblewrap.sandbox_uid() if privileged else None
    with tempfile.TemporaryDirectory(prefix="modelyard-sandbox-check-") as tmp:
        box, source, workdir = Path(tmp) / "box", Path(tmp) / "source", Path(tmp) / "out"
        for folder in (box / "io", box / "home", box / "tmp", box / "source", box / "out", source, workdir):
            folder.mkdir(parents=True)
        (box / "io" / "request.json").write_text(json.dumps({"limits": limits.to_dict(), "drop_to_uid": uid}))
        if uid is not None:
            for folder in (box, box / "io", box / "io" / "request.json", box / "home", box / "tmp", workdir, source):
                os.chown(folder, uid, uid)
        try:
            finished = run_child(box, settings, source=source, workdir=workdir, privileged=privileged,
                                 limits=limits, probe=True)
        except OSError as exc:
            return f"bubblewrap could not be started: {one_line(exc)}"
        try:
            answer = json.loads((box / "io" / "result.json").read_text())
        except (OSError, ValueError):
            answer = {}
    if finished.returncode != 0 or answer.get("probe") != "ok":
        detail = one_line(finished.log_tail) or f"exit status {finished.returncode}"
        return f"bubblewrap cannot start a sandbox here: {detail}"
    if answer.get("uid") == 0:
        return "the sandboxed child still ran as root"
    return None


def forget() -> None:
    """Drop the remembered check (tests; a worker after its operator fixed the sandbox)."""
    global _checked
    _checked = None
