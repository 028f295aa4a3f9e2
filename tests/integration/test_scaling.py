"""Horizontal scaling: a second cpu worker takes its share of a batch of CPU-bound convert jobs.

Each job converts its own small ONNX model (one 512×512 weight applied in 32 MatMul+Tanh layers,
random weights, so no two jobs share a step key and the cache never helps) on 8×256×512 samples:
ONNX Runtime runs the model twice per job (reference outputs, then the conversion check): about
1 s per job on one core of the 2-core development machine, against a few milliseconds of queue traffic.
Workers run one process each (concurrency 1) with one inference thread (``MODELYARD_BENCH_THREADS``),
so each worker keeps one core busy.

The test has its own Redis and artifact store: the session's test cluster, if running, never sees
these jobs. It checks behaviour, not speed: with two workers of concurrency 1 and prefetch 1, both
compute converts of one batch. How much faster two workers are is measured by
``scripts/bench/scaling.py`` (a benchmark, on idle cores), never asserted here.
"""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from producer import api
from shared.redis_server import start_redis
from shared.settings import get_settings
from tests.services import Cluster

pytestmark = pytest.mark.integration

HOST = socket.gethostname()
BATCH = 8
WIDTH, DEPTH = 512, 32


def heavy_mlp(path: Path, seed: int) -> Path:
    """x[batch, sequence, 512] → 32 × (MatMul by one shared random weight, Tanh): 1 MiB on disk."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    nodes, previous = [], "x"
    for layer in range(DEPTH):
        output = "y" if layer == DEPTH - 1 else f"h{layer}"
        nodes += [helper.make_node("MatMul", [previous, "w"], [f"m{layer}"]),
                  helper.make_node("Tanh", [f"m{layer}"], [output])]
        previous = output
    graph = helper.make_graph(
        nodes, f"mlp{seed}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", WIDTH])],
        [helper.make_tensor("w", TensorProto.FLOAT, [WIDTH, WIDTH], weight.tobytes(), raw=True)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def convert_job(folder: Path, seed: int) -> Path:
    heavy_mlp(folder / f"mlp{seed}.onnx", seed)
    job = folder / f"mlp{seed}.yaml"
    job.write_text(f"model: {{name: mlp{seed}, source: ./mlp{seed}.onnx, format: onnx}}\n"
                   f"convert: {{samples: {{batch: {BATCH}, sequence: 256}}}}\n")
    return job


@pytest.fixture
def private_stack(service_env, tmp_path, monkeypatch):
    """A Redis and artifact store of this test's own; this process is their producer."""
    server = start_redis(tmp_path / "redis")
    env = {**service_env, "MODELYARD_BROKER_URL": server.url,
           "MODELYARD_ARTIFACT_STORE": (tmp_path / "artifacts").as_uri(),
           "MODELYARD_HOME": str(tmp_path / "home"), "MODELYARD_BENCH_THREADS": "1", "OMP_NUM_THREADS": "1"}
    for key in ("MODELYARD_BROKER_URL", "MODELYARD_ARTIFACT_STORE", "MODELYARD_HOME"):
        monkeypatch.setenv(key, env[key])
    get_settings.cache_clear()
    cluster = Cluster(env=env, folder=tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()
        server.stop()
        monkeypatch.undo()
        get_settings.cache_clear()


def run_batch(jobs: list[Path]) -> list[dict]:
    """Submit every job at once and wait for all of them; their job records."""
    ids = [api.submit(job) for job in jobs]
    results = [api.wait(job_id, timeout=300, poll=0.2) for job_id in ids]
    assert [r["state"] for r in results] == ["SUCCEEDED"] * len(jobs), [r.get("error") for r in results]
    assert {r["stages"]["convert"]["state"] for r in results} == {"done"}  # computed, not cached
    return results


def test_a_second_cpu_worker_computes_its_share_of_a_batch(private_stack, tmp_path):
    models = tmp_path / "jobs"
    models.mkdir()
    first = [convert_job(models, seed) for seed in range(4)]
    batch = [convert_job(models, seed) for seed in range(4, 12)]
    workers = [f"cpu1@{HOST}", f"cpu2@{HOST}"]

    private_stack.start_worker("cpu", workers[0])
    private_stack.wait_online(workers[:1])
    alone = run_batch(first)
    assert {r["stages"]["convert"]["computed_by"] for r in alone} == {workers[0]}

    private_stack.start_worker("cpu", workers[1])
    private_stack.wait_online(workers)
    shared = run_batch(batch)
    counts = {w: sum(r["stages"]["convert"]["computed_by"] == w for r in shared) for w in workers}
    print(f"\nscaling: 8 convert jobs over 2 cpu workers: {counts}")
    assert all(counts[w] >= 2 for w in workers), counts
