"""Progress for logs: one line per stage state change, nothing when nothing changed."""

from __future__ import annotations

import time

from producer.progress import ProgressLines, stage_line

NOW = time.time()


def job(state: str = "RUNNING", **stages: dict) -> dict:
    return {"id": "j", "model": "m", "state": state, "created": NOW, "queues": {"convert": "cpu", "deploy": "cpu"},
            "stages": stages}


def test_the_first_record_gives_the_job_then_its_started_stages_and_planned_ones_are_silent():
    lines = ProgressLines().changes(job(convert={"state": "running", "worker": "cpu1@h", "started": NOW}))
    assert [line[9:] for line in lines] == ["job j RUNNING (model m)", "convert running on cpu1@h"]


def test_an_unchanged_record_gives_no_line_and_each_change_one():
    progress = ProgressLines()
    running = {"state": "running", "worker": "w", "started": NOW}
    progress.changes(job(convert=running))
    assert progress.changes(job(convert=running)) == []
    done = {**running, "state": "done", "finished": NOW + 3.14}
    assert [line[9:] for line in progress.changes(job(convert=done))] == ["convert done 3.1 s"]


def test_a_variant_the_selection_and_the_deploy_say_what_they_did():
    assert stage_line("optimize:int8-dynamic", {"state": "cached", "started": NOW, "finished": NOW + 0.04})[9:] == \
        "optimize:int8-dynamic cached 0.0 s"
    assert stage_line("select", {"state": "done", "selected": "fp16"})[9:] == "select done: fp16"
    deploy = {"state": "done", "started": NOW, "finished": NOW + 1, "model": "m", "version": 3, "alias": "production"}
    assert stage_line("deploy", deploy)[9:] == "deploy done 1.0 s: m version 3 as 'production'"
    assert stage_line("convert", {"state": "running", "worker": "w", "attempt": 2})[9:] == \
        "convert running on w (attempt 2)"


def test_training_reports_each_epoch_once():
    progress = ProgressLines()
    first = {"state": "running", "worker": "w", "progress": {"epoch": 1, "epochs": 2, "step": 1, "steps": 9,
                                                               "loss": 0.5}}
    assert progress.changes(job(compress=first))[-1][9:] == "compress epoch 1/2 loss 0.5000"
    later = {**first, "progress": {**first["progress"], "step": 5, "loss": 0.25}}
    assert progress.changes(job(compress=later)) == []


def test_the_end_of_the_job_gives_its_duration_and_error():
    progress = ProgressLines()
    progress.changes(job())
    lines = progress.changes({**job("FAILED"), "finished": NOW + 12.5, "error": "convert: bad model"})
    assert [line[9:] for line in lines] == ["job j FAILED in 12.5 s: convert: bad model"]
