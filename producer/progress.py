"""A job's progress as one line per change, for output that is not a terminal (a CI log, a pipe).

A terminal gets a live table that redraws; a log gets nothing from redrawing, and a job can run
for an hour. ``ProgressLines`` remembers what it last saw of each stage and, given the newest
job record, returns a line for each stage whose state changed::

    12:03:04 job 3f2a… RUNNING (model minilm)
    12:03:04 convert running on cpu1@host
    12:03:09 convert done 5.2 s
    12:03:12 optimize:int8-dynamic done 3.1 s
    12:03:13 select done: int8-dynamic
    12:03:14 deploy done 0.8 s: minilm version 3 as 'production'
    12:03:14 job 3f2a… SUCCEEDED in 10.2 s

Times are the stage's own (started, finished) when the record has them.
"""

from __future__ import annotations

import time

from producer.render import stage_rows
from shared.jobs import STAGE_FAILED, STAGE_RUNNING, TERMINAL


def clock(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts if ts else time.time()))


class ProgressLines:
    def __init__(self) -> None:
        self._stages: dict[str, tuple] = {}
        self._job_state: str | None = None

    def changes(self, job: dict) -> list[str]:
        """Lines for what changed since the previous record this saw (everything, the first time)."""
        job_lines = [job_line(job)] if job["state"] != self._job_state else []
        self._job_state = job["state"]
        stage_lines = []
        for name, stage in stage_rows(job):
            state = stage.get("state")
            if state is None:  # planned, not started
                continue
            progress = stage.get("progress") or {}
            seen = (state, progress.get("epoch"))
            if self._stages.get(name) != seen:
                self._stages[name] = seen
                stage_lines.append(stage_line(name, stage))
        if job["state"] in TERMINAL:  # the job's end after its last stages, its start before its first
            return stage_lines + job_lines
        return job_lines + stage_lines


def stage_line(name: str, stage: dict) -> str:
    state = stage["state"]
    started, finished = stage.get("started"), stage.get("finished")
    if state == STAGE_RUNNING:
        progress = stage.get("progress") or {}
        if progress.get("epochs"):  # a training stage (compress) reports its epochs
            return (f"{clock(None)} {name} epoch {progress['epoch']}/{progress['epochs']}"
                    + (f" loss {progress['loss']:.4f}" if progress.get("loss") is not None else ""))
        attempt = stage.get("attempt") or 1
        return (f"{clock(started)} {name} running on {stage.get('worker', '?')}"
                + (f" (attempt {attempt})" if attempt > 1 else ""))
    line = f"{clock(finished)} {name} {state}"
    if started and finished:
        line += f" {finished - started:.1f} s"
    if state == STAGE_FAILED and stage.get("message"):
        line += f": {stage['message']}"
    elif name == "select" and stage.get("selected"):
        line += f": {stage['selected']}"
    elif name == "deploy" and stage.get("version"):
        line += f": {stage.get('model', '')} version {stage['version']} as '{stage.get('alias', '')}'"
    return line


def job_line(job: dict) -> str:
    state = job["state"]
    line = f"{clock(job.get('finished') or job.get('updated'))} job {job['id']} {state}"
    if state in ("QUEUED", "RUNNING"):
        return line + f" (model {job.get('model', '?')})"
    if job.get("finished") and job.get("created"):
        line += f" in {job['finished'] - job['created']:.1f} s"
    if job.get("error"):
        line += f": {job['error']}"
    return line
