"""The gpu pool with real worker processes on a machine without a GPU: one pinned process per
visible GPU, --allow-cpu consuming the gpu queue, a TensorRT variant refused as an error row."""

from __future__ import annotations

import json
import os
import socket
from types import SimpleNamespace

import pytest

from shared.redis_server import start_redis
from shared.settings import get_settings
from tests.models.tiny import tiny_onnx
from tests.services import Cluster
from worker.gpu import CPU

HOST = socket.gethostname()


@pytest.fixture(scope="module")
def gpu_job(tmp_path_factory):
    """A cpu worker and a gpu worker (--allow-cpu) that sees CUDA_VISIBLE_DEVICES=3,5, and one job through them."""
    folder = tmp_path_factory.mktemp("gpu-pool")
    server = start_redis(folder / "redis")
    env = {**os.environ, "MODELYARD_BROKER_URL": server.url, "MODELYARD_ARTIFACT_STORE": (folder / "store").as_uri(),
           "MODELYARD_HOME": str(folder / "home"), "MODELYARD_PLUGIN_MODULES": "tests.plugins.gpu_probe",
           "MODELYARD_BENCH_RUNS": "3", "HF_HUB_OFFLINE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cluster = Cluster(env=env, folder=folder)
    patch = pytest.MonkeyPatch()
    try:
        cluster.start_worker("cpu", f"cpu@{HOST}")
        gpu_worker = cluster.start_worker("gpu", f"gpu@{HOST}", extra_env={"CUDA_VISIBLE_DEVICES": "3,5"})
        cluster.wait_online([f"cpu@{HOST}", f"gpu@{HOST}"])
        for key in ("MODELYARD_BROKER_URL", "MODELYARD_ARTIFACT_STORE", "MODELYARD_HOME", "MODELYARD_PLUGIN_MODULES"):
            patch.setenv(key, env[key])
        get_settings.cache_clear()
        import tests.plugins.gpu_probe  # noqa: F401  (the producer validates against the same registry)
        from producer import api
        from tests.plugins.gpu_probe import PROBES

        tiny_onnx(folder / "m.onnx")
        probes = ", ".join(f"{{id: probe-{i}, of: gpu-probe}}" for i in range(4))
        (folder / "job.yaml").write_text(
            "model: {name: tiny, source: ./m.onnx, format: onnx}\n"
            f"optimize: {{variants: [fp16, trt-fp16, {probes}], gate: {{cosine_min: 0.9}}}}\n"
            "device: gpu\n")
        job = api.wait(api.submit(folder / "job.yaml"), timeout=600)
        records = [json.loads(r) for r in server.client().lrange(PROBES, 0, -1)]
        yield SimpleNamespace(job=job, probes=records, log=gpu_worker.log_text)
    finally:
        patch.undo()
        get_settings.cache_clear()
        cluster.stop()
        server.stop()


@pytest.mark.integration
def test_a_gpu_worker_runs_one_process_per_visible_gpu_each_pinned_to_its_own(gpu_job):
    assert gpu_job.job["state"] == "SUCCEEDED", gpu_job.job.get("error")
    devices_by_pid: dict[int, set] = {}
    for probe in gpu_job.probes:
        devices_by_pid.setdefault(probe["pid"], set()).add(probe["cuda_visible_devices"])
    assert sorted(d for devices in devices_by_pid.values() for d in devices) == ["3", "5"]
    assert all(len(devices) == 1 for devices in devices_by_pid.values())
    assert "gpu pool: 2 worker process(es), one per GPU (3, 5)" in gpu_job.log()


@pytest.mark.integration
def test_an_allow_cpu_gpu_worker_consumes_the_gpu_queue_and_records_the_cpu_provider(gpu_job):
    stage = gpu_job.job["stages"]["optimize:fp16"]
    assert (stage["worker"], stage["queue"]) == (f"gpu@{HOST}", "gpu")
    assert stage["metrics"]["provider"] == CPU
    assert "gpu" not in stage["metrics"]


@pytest.mark.integration
def test_a_trt_variant_on_a_worker_without_tensorrt_is_an_error_row_not_a_failed_job(gpu_job):
    assert gpu_job.job["state"] == "SUCCEEDED"
    rows = {row["variant"]: row for row in gpu_job.job["stages"]["select"]["table"]}
    assert rows["trt-fp16"]["verdict"].startswith(
        f"error: TensorRT execution provider not available on worker gpu@{HOST}; available: ")
