"""``modelyard run``: one job's stages on this machine, with no Redis server and no workers.

The producer never imports the stages, so the run happens in a child process,
``python -m worker.local JOB --json-out FILE``, which applies the job's Celery chain eagerly with
the workers' task code and a private Redis of its own. Its stdout carries one JSON line
``{"job": record}`` per change of the record, passed on to ``on_update``; its stderr (what the
stages and their libraries print) goes straight to ours; FILE says how it ended.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.errors import UserInputError

RUNNER_BAD_INPUT = 2  # worker.local's exit status for a job file or input it refused


class LocalRunFailed(Exception):
    """The local runner could not run the job (its private Redis did not start, or it crashed)."""


def run_local(job_file: str | Path, *, on_update: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run the job in a child process; its final record. UserInputError or LocalRunFailed when it did not run."""
    with tempfile.TemporaryDirectory(prefix="modelyard-run-") as folder:
        result_file = Path(folder) / "result.json"
        args = [sys.executable, "-m", "worker.local", str(Path(job_file).resolve()), "--json-out", str(result_file)]
        with subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True) as runner:
            try:
                for line in runner.stdout:
                    message = _parse(line)
                    if message is not None:
                        on_update(message)
            except KeyboardInterrupt:  # Ctrl-C: the runner, in our process group, got it too
                _stop(runner, grace=10)
                raise
            except BaseException:
                _stop(runner, grace=0)
                raise
        try:
            result = json.loads(result_file.read_text())
        except (OSError, ValueError):
            result = {}
    if "job" in result:
        return result["job"]
    error = result.get("error") or (f"the local runner exited with status {runner.returncode} "
                                    "before the job ended; its messages are above")
    if result.get("exit_code") == RUNNER_BAD_INPUT:
        raise UserInputError(error)
    raise LocalRunFailed(error)


def _parse(line: str) -> dict[str, Any] | None:
    try:
        message = json.loads(line)
    except ValueError:  # not a protocol line
        return None
    return message.get("job") if isinstance(message, dict) else None


def _stop(runner: subprocess.Popen, *, grace: float) -> None:
    try:
        runner.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        runner.terminate()  # the runner stops its private Redis on SIGTERM
        try:
            runner.wait(timeout=10)
        except subprocess.TimeoutExpired:
            runner.kill()
            runner.wait()
