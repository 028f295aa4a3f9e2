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
from worker.sandbox import bubblewrap, exchange, warm
from worker.sandbox.limits import Limits
from worker.sandbox.process import Finished, run_child

log = logging.getLogger("modelyard.sandbox")
MESSAGE_LIMIT = 4000  # characters of an error message from the child that reach the job
T = TypeVar("T")


def run_boxed(settings: Settings, *, source: Path, workdir: Path, request: dict[str, Any],
              write_inputs: Callable[[Path], None] | None, read: Callable[[Path], tuple[T, dict] | None]
              ) -> tuple[T, dict]:
    """Run the child on ``request`` (plus what ``write_inputs`` puts in ``io``); (answer, sandbox record).

    The request's ``source`` and ``workdir`` are set here to where the child sees them; so are the
    limits and the uid to drop to. ``read(io)`` returns (answer, the child's figures), or None when
    the child wrote no answer. A warm sandbox (``warm``) serves the call when this process has one.
    """
    source, workdir = Path(source).resolve(), Path(workdir).resolve()
    private = workdir.parent in source.parents  # the stage's own download: the sandbox's uid may own it
    box = warm.take(settings)
    try:
        if box is not None:
            return _run_warm(box, source=source, workdir=workdir, private=private, request=request,
                             write_inputs=write_inputs, read=read)
        return _run_cold(settings, source=source, workdir=workdir, private=private, request=request,
                         write_inputs=write_inputs, read=read)
    finally:
        warm.prestart(settings)  # the next call's sandbox imports the frameworks meanwhile


def _run_cold(settings: Settings, *, source: Path, workdir: Path, private: bool, request: dict[str, Any],
              write_inputs, read):
    limits = Limits.from_settings(settings)
    box = Path(tempfile.mkdtemp(prefix="sandbox-", dir=workdir.parent))
    try:
        io = _layout(box)
        privileged = os.geteuid() == 0
        uid = bubblewrap.sandbox_uid() if privileged else None
        exchange.write_json(io / exchange.REQUEST, {**request, "source": str(inside(source)), "workdir": str(OUT),
                                                    "limits": limits.to_dict(), "drop_to_uid": uid})
        if write_inputs is not None:
            write_inputs(io)
        if uid is not None:  # the sandbox's uid owns its scratch; a private copy of the source becomes readable
            for path in (box, workdir, *([source] if private else [])):
                bubblewrap.chown_tree(path, uid)
        finished = run_child(box, settings, source=source, workdir=workdir, privileged=privileged,
                             limits=limits)
        answer, figures = _answer(io, finished, limits, read)
        return answer, _record(finished, figures, warm=False)
    finally:
        shutil.rmtree(box, ignore_errors=True)


def _run_warm(box: warm.WarmBox, *, source: Path, workdir: Path, private: bool, request: dict[str, Any],
              write_inputs, read):
    try:
        inside_source = box.place(source, private)
        if write_inputs is not None:
            write_inputs(box.io())
        box.start({**request, "source": str(inside_source), "workdir": str(OUT)})
        finished = box.finish(workdir)
        answer, figures = _answer(box.io(), finished, box.limits, read)
        return answer, _record(finished, figures, warm=True)
    finally:
        box.discard()  # ended by now, unless placing the source or the inputs failed: then it is killed


def _record(finished: Finished, figures: dict, *, warm: bool) -> dict:
    return {"mode": "bwrap", "warm": warm, "seconds": round(finished.seconds, 3),
            **{name: _number(figures.get(name)) for name in ("load_s", "cpu_s", "max_rss_mb")}}


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


def _number(value: object) -> float | None:
    """A figure the child reported (untrusted): a number, or None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
