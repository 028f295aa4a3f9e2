"""One call into the sandbox, whatever it runs: lay out its scratch folder, run the child, read its answer.

The scratch folder (the *box*) lies beside the workdir in the stage's temporary folder: ``io``
(the request in, the answer out), ``home`` and ``tmp``. A root worker hands the box, the workdir
and a source downloaded into the stage's folder to the sandbox's uid (bwrap binds the source
read-only; a source elsewhere is only read, and must be readable by that uid). The answer is
read as untrusted input (``exchange``) by the caller's ``read``.

Two callers: ``conversion`` (a converter's ``convert``) and ``tasks`` (the other loads of a
user's model: the compress stage's teacher, the GenAI variants' model builder).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from shared.errors import TransientError, UserInputError
from shared.settings import Settings
from worker.sandbox import bubblewrap, exchange
from worker.sandbox.limits import Limits
from worker.sandbox.process import Finished, run_child

log = logging.getLogger("modelyard.sandbox")
MESSAGE_LIMIT = 4000  # characters of an error message from the child that reach the job
T = TypeVar("T")


def run_boxed(settings: Settings, *, source: Path, workdir: Path, request: dict[str, Any],
              write_inputs: Callable[[Path], None] | None, read: Callable[[Path], tuple[T, dict] | None]
              ) -> tuple[T, dict]:
    """Run the child on ``request`` (plus what ``write_inputs`` puts in ``io``); (answer, sandbox record).

    ``request`` names paths as the child sees them (``inside(source)``, ``INSIDE / "out"``); the
    limits and the uid to drop to are added here. ``read(io)`` returns (answer, the child's
    figures), or None when the child wrote no answer.
    """
    limits = Limits.from_settings(settings)
    source, workdir = Path(source).resolve(), Path(workdir).resolve()
    box = Path(tempfile.mkdtemp(prefix="sandbox-", dir=workdir.parent))
    try:
        io = _layout(box)
        privileged = os.geteuid() == 0
        uid = bubblewrap.sandbox_uid() if privileged else None
        exchange.write_json(io / exchange.REQUEST, {**request, "limits": limits.to_dict(), "drop_to_uid": uid})
        if write_inputs is not None:
            write_inputs(io)
        if uid is not None:  # the sandbox's uid owns its scratch; a private copy of the source becomes readable
            private = [source] if workdir.parent in source.parents else []
            for path in (box, workdir, *private):
                _chown_tree(path, uid)
        finished = run_child(box, settings, source=source, workdir=workdir, privileged=privileged,
                             limits=limits)
        answer, figures = _answer(io, finished, limits, read)
        return answer, {"mode": "bwrap", "seconds": round(finished.seconds, 3),
                        **{name: _number(figures.get(name)) for name in ("load_s", "cpu_s", "max_rss_mb")}}
    finally:
        shutil.rmtree(box, ignore_errors=True)


def inside(source: Path) -> Path:
    """Where the child sees ``source``."""
    return bubblewrap.INSIDE / "source" / Path(source).resolve().name


OUT = bubblewrap.INSIDE / "out"  # where the child sees the workdir


def _answer(io: Path, finished: Finished, limits: Limits, read):
    """The child's answer, or the UserInputError (or TransientError) that says why there is none."""
    if finished.timed_out:
        raise UserInputError(limits.wall_message())
    error = exchange.read_error(io)
    if error is not None:
        message = error["message"][:MESSAGE_LIMIT]  # the child's words go into the job record: bounded
        if error["kind"] == exchange.TRANSIENT:
            raise TransientError(message)
        if error["kind"] == exchange.CRASH:
            log.warning("sandboxed model load failed: %s\n%s", message, finished.log_tail)
        if error["kind"] == exchange.MEMORY:
            raise UserInputError(limits.memory_message())
        raise UserInputError(message)
    answer = read(io) if finished.returncode == 0 else None
    if answer is None:
        message = limits.ended(finished.returncode, log_tail=finished.log_tail)
        log.warning("sandboxed model load ended without a result (%s)\n%s", message, finished.log_tail)
        raise UserInputError(message)
    return answer


def _layout(box: Path) -> Path:
    for name in ("io", "home", "tmp", "source", "out"):  # source and out: mount points for bwrap
        (box / name).mkdir()
    return box / "io"


def _chown_tree(path: Path, uid: int) -> None:
    os.chown(path, uid, uid, follow_symlinks=False)
    if path.is_dir() and not path.is_symlink():
        for folder, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(Path(folder) / name, uid, uid, follow_symlinks=False)


def _number(value: object) -> float | None:
    """A figure the child reported (untrusted): a number, or None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
