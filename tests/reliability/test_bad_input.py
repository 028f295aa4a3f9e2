"""Bad job files, bad model files and a forged pickle message (issue 5, scenarios 11, 12 and 14).

Property-based fuzzing of the job-spec parser (no exception but the validation error escapes) lives
in tests/unit/test_jobspec.py (hypothesis); here the same refusals are checked end to end against a
live Redis: exit code 2 and nothing recorded, uploaded or enqueued.
"""

from __future__ import annotations

import base64
import json
import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from producer.cli import app as cli
from tests.reliability.conftest import fault_job, report, tiny_onnx

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

GOOD_MODEL = "model: {name: m, source: ./m.onnx, format: onnx}\n"
BAD_JOB_FILES = {  # case: (job file text, the field its message must name)
    "malformed yaml": ("model: {name: m, source: [unclosed\n", "not valid YAML"),
    "unknown key": ("model: {name: m, source: ./m.onnx, format: onnx, colour: blue}\n", "model.colour"),
    "wrong type": (GOOD_MODEL + "convert: {opset: seventeen}\n", "convert.opset"),
    "unknown format": ("model: {name: m, source: ./m.onnx, format: caffe}\n", "model.format"),
    "unknown variant": (GOOD_MODEL + "optimize: {variants: [int3]}\n", "optimize.variants"),
    "missing source": ("model: {name: m, source: ./nowhere.onnx, format: onnx}\n", "model.source"),
    "negative number": (GOOD_MODEL + "convert: {samples: {batch: -1}}\n", "convert.samples.batch"),
    "absurd number": (GOOD_MODEL + "convert: {samples: {sequence: 100000000}}\n", "convert.samples.sequence"),
    "gate out of range": (GOOD_MODEL + "optimize: {variants: [fp16], gate: {cosine_min: 7}}\n",
                          "optimize.gate.cosine_min"),
    "not a mapping": ("- just\n- a list\n", "YAML mapping"),
}


def test_bad_job_files_exit_2_naming_the_field_and_enqueue_nothing(make_stack, tmp_path):
    stack = make_stack()  # Redis is up: a refusal must come from validation, not from a dead broker
    tiny_onnx(tmp_path / "m.onnx")
    outcomes = {}
    for case, (text, field) in BAD_JOB_FILES.items():
        job = tmp_path / f"{case.replace(' ', '-')}.yaml"
        job.write_text(text)
        result = CliRunner().invoke(cli, ["submit", str(job)])
        outcomes[case] = (result.exit_code, field in result.output, "Traceback" not in result.output,
                          "\n\n" not in result.output.strip(), result.output)

    client = stack.redis.client()
    recorded = client.zcard("modelyard:jobs") + sum(1 for _ in client.scan_iter("modelyard:job:*"))
    refused = sum(o[0] == 2 for o in outcomes.values())
    report("11 bad job files", submitted=len(BAD_JOB_FILES), completed=0, failed=refused, duplicated=0,
           exit_2=refused, field_named=sum(o[1] for o in outcomes.values()), jobs_recorded=recorded,
           queued=sum(stack.queue_lengths().values()))
    for case, (code, named, clean, one_paragraph, output) in outcomes.items():
        assert (code, named, clean, one_paragraph) == (2, True, True, True), f"{case}: {output}"
    assert recorded == 0
    assert stack.queue_lengths() == {"cpu": 0, "gpu": 0}
    assert not list((stack.folder / "artifacts").rglob("blobs/*/*/*"))


def huge_dimension_onnx(path: Path) -> Path:
    """A valid model whose fixed input shape is 65536^3 floats (1 PiB): its samples cannot exist."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "huge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [65536, 65536, 65536])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [65536, 65536, 65536])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def bad_models(folder: Path) -> dict[str, Path]:
    valid = tiny_onnx(folder / "valid.onnx").read_bytes()
    files = {
        "truncated": valid[: len(valid) // 2],
        "zero-byte": b"",
        "random bytes": np.random.default_rng(0).bytes(4096),
    }
    models = {}
    for case, data in files.items():
        models[case] = folder / f"{case.replace(' ', '-')}.onnx"
        models[case].write_bytes(data)
    np.savez(folder / "arrays.npz", x=np.zeros(3))  # a zip archive, declared as ONNX
    models["wrong format"] = (folder / "arrays.npz").rename(folder / "wrong-format.onnx")
    models["huge dimension"] = huge_dimension_onnx(folder / "huge-dimension.onnx")
    return models


def test_bad_model_files_fail_their_jobs_with_a_message_and_the_worker_keeps_serving(make_stack, tmp_path):
    stack = make_stack()
    worker = stack.start_worker("cpu", "cpu1")
    job_ids = {}
    for case, model in bad_models(tmp_path).items():
        job = tmp_path / f"{model.stem}.yaml"
        job.write_text(f"model: {{name: {model.stem}, source: ./{model.name}, format: onnx}}\n")
        job_ids[case] = stack.submit(job)
    good = stack.submit(fault_job(tmp_path, "after", seed=3))
    results = stack.wait_all([*job_ids.values(), good], timeout=180)

    failed = {case: results[job_id] for case, job_id in job_ids.items()}
    report("12 bad model files", submitted=len(job_ids) + 1, completed=int(results[good]["state"] == "SUCCEEDED"),
           failed=sum(r["state"] == "FAILED" for r in failed.values()), duplicated=0,
           worker_alive=int(worker.process.poll() is None))
    for case, result in failed.items():
        assert result["state"] == "FAILED", f"{case}: {result['state']}"
        assert result["error"].startswith("convert: ") and len(result["error"]) > 20, f"{case}: {result['error']}"
        assert "Traceback" not in result["error"]
    assert results[good]["state"] == "SUCCEEDED", results[good].get("error")
    assert worker.process.poll() is None


class _Marker:
    """Unpickling this creates a file: proof that a pickle payload was (or was not) ever loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def forged_pickle_message(marker: Path) -> dict:
    """A Celery protocol-2 task message for modelyard.convert whose body is a pickle, as kombu lays it in Redis."""
    task_id = str(uuid.uuid4())
    body = pickle.dumps(((), {"job_id": "forged", "model": "forged", "payload": _Marker(marker)}, {}))
    return {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "binary",
        "content-type": "application/x-python-serialize",
        "headers": {"lang": "py", "task": "modelyard.convert", "id": task_id, "root_id": task_id,
                    "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
                    "timelimit": [None, None], "argsrepr": "()", "kwargsrepr": "{}", "origin": "attacker"},
        "properties": {"correlation_id": task_id, "reply_to": "", "delivery_mode": 2, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
                       "delivery_info": {"exchange": "", "routing_key": "cpu"}},
    }


def test_a_pickle_message_pushed_into_the_queue_is_discarded_unloaded_and_the_worker_serves_on(
    make_stack, tmp_path
):
    stack = make_stack()
    worker = stack.start_worker("cpu", "cpu1")
    marker = tmp_path / "unpickled"
    client = stack.redis.client()
    client.lpush("cpu", json.dumps(forged_pickle_message(marker)))

    served = stack.wait(stack.submit(fault_job(tmp_path, "after-pickle")), timeout=60)

    log = worker.log_text()
    report("14 pickle message injected", submitted=2, completed=int(served["state"] == "SUCCEEDED"), failed=0,
           duplicated=0, discarded=int("ContentDisallowed" in log or "disallowed" in log.lower()),
           payload_loaded=int(marker.exists()), queue_left=sum(stack.queue_lengths().values()),
           unacked_left=client.hlen("unacked"))
    assert not marker.exists()
    assert served["state"] == "SUCCEEDED", served.get("error")
    assert worker.process.poll() is None
    assert stack.queue_lengths() == {"cpu": 0, "gpu": 0} and client.hlen("unacked") == 0
    assert "application/x-python-serialize" in log  # the worker says what it refused
