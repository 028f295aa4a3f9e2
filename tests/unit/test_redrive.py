"""Which stage a stalled job resumes at, and the chain that resumes it (worker.redrive, shared.pipeline)."""

from __future__ import annotations

from shared.celery_app import make_celery
from shared.jobspec import parse_job
from shared.pipeline import plan, resume_chain
from shared.settings import Settings
from worker.redrive import next_stage

SPEC = parse_job("model: {name: m, source: ./m.onnx, format: onnx}\n"
                 "optimize: {variants: [int8-dynamic]}\ndeploy: {repository: file:///tmp/r}\n")
QUEUES = plan(SPEC, gpu_benefit=lambda _name: False)
NOW = 10_000.0


def record(stages: dict, updated: float = NOW - 600) -> dict:
    return {"queues": QUEUES, "stages": stages, "created": updated - 5, "updated": updated}


def test_a_job_whose_next_stage_never_started_resumes_there_with_the_previous_stages_output():
    converted = {"state": "done", "output": {"convert_key": "c", "model_key": "c", "variant": None}}
    assert next_stage(record({}), NOW, 300) == ("convert", None)
    assert next_stage(record({"convert": converted}), NOW, 300) == ("optimize", converted["output"])
    variants = {"optimize:fp32": {"state": "done"}, "optimize:int8-dynamic": {"state": "cached"}}
    assert next_stage(record({"convert": converted, **variants}), NOW, 300) == ("optimize", converted["output"])
    chosen = {"model_key": "v", "convert_key": "c", "variant": "int8-dynamic"}
    assert next_stage(record({"convert": converted, **variants, "select": {"state": "done", "output": chosen}}),
                      NOW, 300) == ("deploy", chosen)


def test_without_optimize_deploy_resumes_with_the_converted_model():
    spec = parse_job("model: {name: m, source: ./m.onnx, format: onnx}\ndeploy: {repository: file:///tmp/r}\n")
    queues = plan(spec, gpu_benefit=lambda _name: False)
    converted = {"state": "cached", "output": {"convert_key": "c", "model_key": "c", "variant": None}}
    assert next_stage({**record({"convert": converted}), "queues": queues}, NOW, 300) == ("deploy", converted["output"])


def test_a_running_stage_a_recent_record_or_a_record_without_outputs_is_left_alone():
    assert next_stage(record({"convert": {"state": "running"}}), NOW, 300) is None
    assert next_stage(record({}, updated=NOW - 100), NOW, 300) is None
    assert next_stage(record({"convert": {"state": "done"}}), NOW, 300) is None  # written before outputs were kept
    redriven = {**record({}), "redriven_at": NOW - 10}
    assert next_stage(redriven, NOW, 300) is None


def test_resume_chain_starts_at_the_stage_with_its_input():
    app = make_celery(Settings(), broker_url="redis://127.0.0.1:1/0")
    deploy = resume_chain(app, SPEC, "j1", QUEUES, "deploy", {"model_key": "v"})
    assert deploy.task == "modelyard.deploy" and deploy.args == ({"model_key": "v"},)
    assert deploy.options["queue"] == "cpu" and deploy.kwargs["job_id"] == "j1"
    rest = resume_chain(app, SPEC, "j1", QUEUES, "optimize", {"convert_key": "c"})
    [chord_] = rest.tasks  # Celery folds the deploy after the chord into the chord's body
    assert [t.kwargs["variant"] for t in chord_.tasks] == ["fp32", "int8-dynamic"]
    assert all(t.args == ({"convert_key": "c"},) for t in chord_.tasks)
    assert [t.task for t in chord_.body.tasks] == ["modelyard.select", "modelyard.deploy"]
    whole = resume_chain(app, SPEC, "j1", QUEUES, "convert")
    assert [t.task for t in whole.tasks][0] == "modelyard.convert" and whole.tasks[0].args == ()
