"""Trustworthy verdicts through real workers: side-by-side timing under load, fp32 as a candidate,
gate rows no optimizer saw, and the timing routed to a worker of the job's hardware class."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from shared.inference.hardware import cpu_class, cpu_flags
from shared.redis_server import start_redis
from shared.repository import ModelRepository
from shared.settings import get_settings
from tests.models.tiny import tiny_onnx
from tests.services import Cluster

pytestmark = [pytest.mark.integration]
HOST = socket.gethostname()
WORKER = f"cpu@{HOST}"
BURN_S = 900  # the burner's own deadline: it stops by itself even if this test process dies


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """One cpu worker (with the row-recorder test optimizer) on a private Redis and artifact store."""
    folder = tmp_path_factory.mktemp("paired")
    server = start_redis(folder / "redis")
    env = {**os.environ, "MODELYARD_BROKER_URL": server.url, "MODELYARD_ARTIFACT_STORE": (folder / "store").as_uri(),
           "MODELYARD_HOME": str(folder / "home"), "MODELYARD_PLUGIN_MODULES": "tests.plugins.row_recorder",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           # a burner and the other engineers' work on 2 cores make MiniLM runs many times slower: a wider budget
           "MODELYARD_PAIRED_MAX_SECONDS": "300"}
    cluster = Cluster(env=env, folder=folder)
    patch = pytest.MonkeyPatch()
    try:
        cluster.start_worker("cpu", WORKER)
        cluster.wait_online([WORKER])
        for key in ("MODELYARD_BROKER_URL", "MODELYARD_ARTIFACT_STORE", "MODELYARD_HOME", "MODELYARD_PLUGIN_MODULES"):
            patch.setenv(key, env[key])
        get_settings.cache_clear()
        import tests.plugins.row_recorder  # noqa: F401  (the producer validates against the same registry)

        yield SimpleNamespace(folder=folder, redis=server, cluster=cluster)
    finally:
        patch.undo()
        get_settings.cache_clear()
        cluster.stop()
        server.stop()


def run(stack, name: str, text: str) -> dict:
    from producer import api

    job = stack.folder / f"{name}.yaml"
    job.write_text(text)
    return api.wait(api.submit(job), timeout=900)


def tiny(stack, rows: int = 8, gate_rows: int = 0) -> str:
    """A tiny MatMul+Relu model and samples whose row i holds i + 1 (gate samples: 100 + i)."""
    tiny_onnx(stack.folder / "m.onnx")
    samples = np.repeat(np.arange(1, rows + 1, dtype=np.float32)[:, None], 4, axis=1)
    np.savez(stack.folder / "s.npz", x=samples)
    fields = "samples: ./s.npz"
    if gate_rows:
        np.savez(stack.folder / "g.npz", x=np.repeat(np.arange(100, 100 + gate_rows, dtype=np.float32)[:, None], 4, 1))
        fields += ", gate_samples: ./g.npz"
    return f"model: {{name: tiny, source: ./m.onnx, format: onnx, {fields}}}\n"


def table(job: dict) -> dict[str, dict]:
    return {row["variant"]: row for row in job["stages"]["select"]["table"]}


# -- fp32 is a candidate --------------------------------------------------------------------------

def test_a_tiny_model_whose_variants_are_not_faster_deploys_fp32_and_says_so(stack):
    job = run(stack, "tiny-fp32", tiny(stack) + "optimize: {variants: [int8-dynamic, fp16], gate: {cosine_min: 0.99}}\n"
              "deploy: {repository: file://./repo, alias: production}\n")

    assert job["state"] == "SUCCEEDED", job.get("error")
    message = f"no variant was faster than fp32 on {cpu_class(cpu_flags())}; deployed fp32"
    assert job["result"]["variant"] == "fp32" and job["result"]["message"] == message
    rows = table(job)
    assert rows["fp32"]["verdict"] == "selected"
    for variant in ("int8-dynamic", "fp16"):
        assert rows[variant]["verdict"].startswith(("rejected: slower than fp32", "not selected: no measurable")), \
            rows[variant]
        assert rows[variant]["rounds"] >= 5 and rows[variant]["ratio_low"] is not None
    repo = ModelRepository.open((stack.folder / "repo").as_uri())
    manifest = repo.manifest("tiny", job["stages"]["deploy"]["version"])
    assert manifest["lineage"]["variant"] == "fp32" and manifest["lineage"]["message"] == message
    assert manifest["lineage"]["hardware"]["class"] == cpu_class(cpu_flags())


def test_require_improvement_makes_the_same_job_fail_naming_what_was_tried(stack):
    job = run(stack, "tiny-strict", tiny(stack) + "optimize: {variants: [int8-dynamic, fp16], "
              "gate: {cosine_min: 0.99}, require_improvement: true}\n")

    assert job["state"] == "FAILED"
    assert job["error"].startswith(f"select: no variant was faster than fp32 on {cpu_class(cpu_flags())}: ")
    assert "int8-dynamic (" in job["error"] and "(optimize.require_improvement: true)" in job["error"]


# -- calibration data never grades itself ------------------------------------------------------------

def recorded(stack, tag: str) -> list[dict]:
    return [json.loads(entry) for entry in stack.redis.client().lrange(f"modelyard:test:rows:{tag}", 0, -1)]


def test_the_gate_measures_on_sample_rows_no_optimizer_saw(stack):
    job = run(stack, "rows", tiny(stack) + "optimize: {variants: [{id: rec, of: row-recorder, params: {tag: split}}], "
              "gate: {cosine_min: 0.9, max_abs: 0.5}}\n")

    assert job["state"] == "SUCCEEDED", job.get("error")
    [seen] = recorded(stack, "split")
    holdout = job["stages"]["optimize:rec"]["metrics"]["holdout"]
    gate_values = [index + 1.0 for index in holdout["gate_rows"]]  # row i holds i + 1
    assert holdout["gate_rows"] == [3, 7] and seen["first"] == [1.0, 2.0, 3.0, 5.0, 6.0, 7.0]
    assert not set(seen["first"]) & set(gate_values) and len(seen["first"]) + len(gate_values) == 8
    assert seen["reference"] == ["y"] and seen["reference_rows"] == [6]  # the source's outputs on those rows
    assert seen["gate"]["cosine_min"] == 0.9 and seen["gate"]["max_abs"] == 0.5
    fidelity = job["stages"]["optimize:rec"]["metrics"]["fidelity"]
    assert fidelity["outputs"]["y"]["vectors"] == 2  # the gate figure: the 2 held-out rows
    assert table(job)["rec"]["calibration_rows"] == 6 and table(job)["rec"]["gate_rows"] == 2


def test_with_gate_samples_every_sample_row_calibrates_and_the_gate_measures_only_the_gate_rows(stack):
    job = run(stack, "gate-rows", tiny(stack, rows=8, gate_rows=3) +
              "optimize: {variants: [{id: rec, of: row-recorder, params: {tag: gate-samples}}]}\n")

    assert job["state"] == "SUCCEEDED", job.get("error")
    [seen] = recorded(stack, "gate-samples")
    assert seen["first"] == [float(i) for i in range(1, 9)]
    assert job["stages"]["convert"]["metrics"]["fidelity"]["outputs"]["y"]["vectors"] == 11  # converted on all rows
    holdout = job["stages"]["optimize:rec"]["metrics"]["holdout"]
    assert holdout["gate_rows"] == [8, 9, 10] and holdout["rule"] == "the 3 rows of model.gate_samples"
    assert job["stages"]["optimize:rec"]["metrics"]["fidelity"]["outputs"]["y"]["vectors"] == 3


# -- the hardware class --------------------------------------------------------------------------

def test_optimize_target_times_the_variants_on_a_worker_of_that_class_which_workers_lists(stack):
    from producer import api, operations

    target = cpu_class(cpu_flags())
    job = run(stack, "target", tiny(stack) + f"optimize: {{variants: [fp16], target: {target}}}\n")

    assert job["state"] == "SUCCEEDED", job.get("error")
    assert job["queues"]["select"] == f"cpu.{target}"
    select = job["stages"]["select"]
    assert select["worker"] == WORKER and select["queue"] == "cpu" and select["hardware"]["class"] == target
    assert all(row["hardware_class"] == target for row in select["table"])
    [worker] = operations.workers_report(api._celery(api.broker_url()), timeout=2.0)
    assert worker["hardware_class"] == target and f"cpu.{target}" in worker["queues"]
    assert api.unserved_target(stack.folder / "target.yaml") is None
    (stack.folder / "nobody.yaml").write_text(tiny(stack) + "optimize: {variants: [fp16], target: cpu-nobody}\n")
    assert api.unserved_target(stack.folder / "nobody.yaml") == "cpu.cpu-nobody"  # the CLI warns at submit


# -- a CPU burner beside the stack ---------------------------------------------------------------

@pytest.fixture
def burner():
    """One busy-looping process per core, each stopping by itself after BURN_S seconds."""
    code = f"import time\nend = time.monotonic() + {BURN_S}\nwhile time.monotonic() < end:\n    pass\n"
    processes = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 2)]
    yield processes
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.heavy
def test_beside_a_cpu_burner_the_minilm_job_deploys_int8_whose_paired_ratio_is_below_1(stack, burner, minilm_dir):
    job = run(stack, "minilm", f"""
model: {{name: minilm, source: {minilm_dir}, format: hf-transformers, task: feature-extraction}}
convert: {{to: onnx, opset: 17}}
optimize: {{variants: [int8-dynamic], gate: {{cosine_min: 0.99}}}}
deploy: {{repository: file://./minilm-repo, alias: production}}
device: cpu
""")

    assert all(process.poll() is None for process in burner), "the burner stopped before the job ended"
    assert job["state"] == "SUCCEEDED", job.get("error")
    int8 = table(job)["int8-dynamic"]
    measurement = job["stages"]["select"]["measurement"]
    print(f"\nbeside {len(burner)} burners on {job['stages']['select']['hardware']['class']} "
          f"({', '.join(job['stages']['select']['hardware']['isa'])}): int8-dynamic {int8['ratio']:.3f}x fp32 "
          f"(interval {int8['ratio_low']:.3f}-{int8['ratio_high']:.3f}, {int8['rounds']} rounds, "
          f"{measurement['seconds']:.1f} s, stopped: {measurement['stopped']}), p50 {int8['p50_ms']:.1f} ms vs "
          f"{table(job)['fp32']['p50_ms']:.1f} ms, gate cosine_min {int8['cosine_min']:.4f} "
          f"(calibration rows {int8['calibration_cosine_min']:.4f})")
    assert job["result"]["variant"] == "int8-dynamic"
    assert int8["speed"] == "faster" and int8["ratio"] < 1 and int8["ratio_high"] < 1
