"""The gpu pool on a machine without a GPU: provider choice and refusal, routing, GPU discovery,
pinning by pool index, and a parent that never imports CUDA-initializing code. Real worker
processes: tests/integration/test_gpu_pool.py; the torch fallback: tests/heavy."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from producer.api import queue_for
from shared.errors import UserInputError
from shared.jobspec import parse_job
from tests.models.tiny import tiny_onnx
from tests.services import ROOT
from worker import gpu
from worker.gpu import CPU, CUDA, TENSORRT, choose_providers

TINY_WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10

HOST = socket.gethostname()
ALL = [TENSORRT, CUDA, CPU]
FRAMEWORKS = ("torch", "onnxruntime", "tensorflow", "jax", "cupy", "tensorrt", "pycuda")


# --- provider selection ------------------------------------------------------------------------

def test_a_gpu_pool_stage_with_cuda_runs_under_cuda_then_cpu():
    assert choose_providers("gpu", ALL) == [CUDA, CPU]


def test_a_cpu_pool_stage_runs_on_the_cpu_even_where_cuda_is_available():
    assert choose_providers("cpu", ALL) == [CPU]


def test_a_gpu_pool_stage_without_cuda_runs_on_the_cpu():
    assert choose_providers("gpu", [CPU]) == [CPU]


def test_a_tensorrt_fp16_variant_gets_an_engine_cache_in_its_folder_and_fp16_only(tmp_path):
    providers = choose_providers("gpu", ALL, tensorrt="fp16", engine_cache=tmp_path / "trt_cache")
    name, options = providers[0]
    assert name == TENSORRT
    assert options == {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path / "trt_cache"),
                       "trt_fp16_enable": True, "trt_int8_enable": False}
    assert providers[1:] == [CUDA, CPU]


def test_a_tensorrt_int8_variant_reads_the_calibration_table_beside_its_engines(tmp_path):
    (tmp_path / gpu.CALIBRATION_TABLE).write_bytes(b"table")
    _, options = choose_providers("gpu", ALL, tensorrt="int8", engine_cache=tmp_path)[0]
    assert options["trt_int8_enable"] is True
    assert options["trt_int8_calibration_table_name"] == gpu.CALIBRATION_TABLE


def test_a_tensorrt_variant_without_tensorrt_is_refused_naming_the_worker_and_the_providers(tmp_path):
    with pytest.raises(UserInputError) as caught:
        choose_providers("gpu", [CUDA, CPU], tensorrt="fp16", engine_cache=tmp_path, worker="gpu@box")
    assert str(caught.value).startswith("TensorRT execution provider not available on worker gpu@box; "
                                        "available: CUDAExecutionProvider, CPUExecutionProvider")


def test_planning_a_trt_variant_on_this_worker_is_refused_before_any_work():
    from worker.plugins import registry

    with pytest.raises(UserInputError, match="TensorRT execution provider not available on worker gpu@here"):
        gpu.Execution.plan("gpu", [registry.optimizer("trt-int8")], "gpu@here")


def test_the_trt_fp16_plugin_refuses_on_a_worker_without_tensorrt(tmp_path):
    from worker.plugins import registry
    from worker.plugins.base import OptimizeRequest

    model = tiny_onnx(tmp_path / "model.onnx", TINY_WEIGHTS, relu=True)
    request = OptimizeRequest(model=model, workdir=tmp_path / "out",
                              samples={"x": np.ones((2, 4), np.float32)}, task=None, inputs=[], outputs=[])
    with pytest.raises(UserInputError, match="TensorRT execution provider not available"):
        registry.optimizer("trt-fp16").optimize(request)


def test_trt_int8_calibration_writes_the_table_tensorrt_reads(tmp_path):
    from worker.support.tensorrt import write_calibration

    model = tiny_onnx(tmp_path / "model.onnx", TINY_WEIGHTS, relu=True)
    cache = tmp_path / "trt_cache"
    cache.mkdir()
    table = write_calibration(model, {"x": np.random.default_rng(0).random((4, 4), np.float32)}, cache)
    assert table == cache / gpu.CALIBRATION_TABLE and table.stat().st_size > 0
    assert set(json.loads((cache / "calibration.json").read_text())["data"]) >= {"x", "m", "y"}


def test_a_gpu_pool_variant_key_names_its_providers_and_a_cpu_pool_key_adds_nothing():
    execution = gpu.Execution(pool="gpu", available=(CPU,), tensorrt=None, gpu_benefit=False, worker="w")
    assert execution.key_params() == {"execution": {"providers": [CPU], "gpu": None, "torch_cuda": False}}
    assert gpu.Execution(pool="cpu", available=(CPU,), tensorrt=None, gpu_benefit=True, worker="w").key_params() == {}


# --- routing ----------------------------------------------------------------------------------

def spec(extra: str):
    return parse_job("model: {name: m, source: m.onnx, format: onnx}\n"
                     "optimize: {variants: [fp16, int8-dynamic, trt-fp16, graph+fp16]}\n" + extra)


def test_device_gpu_sends_gpu_benefiting_variants_to_gpu_and_the_rest_to_cpu():
    job = spec("device: gpu\n")
    routes = {v: queue_for(job, "optimize", v) for v in ("fp32", "fp16", "int8-dynamic", "trt-fp16", "graph+fp16")}
    assert routes == {"fp32": "cpu", "fp16": "gpu", "int8-dynamic": "cpu", "trt-fp16": "gpu", "graph+fp16": "gpu"}
    assert queue_for(job, "convert") == "cpu"


def test_device_cpu_keeps_every_variant_on_the_cpu_pool():
    job = spec("device: cpu\n")
    assert {queue_for(job, "optimize", v) for v in ("fp32", "fp16", "trt-fp16")} == {"cpu"}


def test_a_pinned_stage_goes_to_its_pool_whatever_the_variant():
    job = spec("device: gpu\npools: {optimize: gpu, convert: gpu}\n")
    assert [queue_for(job, "optimize", v) for v in ("fp32", "int8-dynamic")] == ["gpu", "gpu"]
    assert queue_for(job, "convert") == "gpu"


# --- discovery and pinning --------------------------------------------------------------------

def test_cuda_visible_devices_lists_the_gpus_up_to_the_first_invalid_entry():
    assert gpu.visible_gpus({"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3", "5"]
    assert gpu.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert gpu.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,2"}) == ["0"]


def test_without_cuda_visible_devices_the_gpus_come_from_nvidia_smi_in_a_subprocess(tmp_path):
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n[ \"$1\" = -L ] || exit 2\n"
                   "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa)'\n"
                   "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)'\n")
    smi.chmod(0o755)
    assert gpu.visible_gpus({}, smi=str(smi)) == ["0", "1"]


def test_no_nvidia_smi_means_no_gpus():
    assert gpu.visible_gpus({}, smi="/nonexistent/nvidia-smi") == []


def test_each_pool_child_is_pinned_to_one_gpu_by_its_index():
    environ = {gpu.GPU_DEVICES_ENV: "3,5"}
    assert [gpu.pin_child_to_gpu(i, dict(environ)) for i in (0, 1, 2)] == ["3", "5", "3"]
    gpu.pin_child_to_gpu(1, environ)
    assert environ["CUDA_VISIBLE_DEVICES"] == "5" and environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_a_worker_without_gpu_devices_leaves_cuda_visible_devices_alone():
    environ = {"CUDA_VISIBLE_DEVICES": "7"}
    assert gpu.pin_child_to_gpu(1, environ) is None
    assert environ == {"CUDA_VISIBLE_DEVICES": "7"}


def test_the_worker_process_init_signal_pins_the_child_from_its_billiard_index(monkeypatch):
    import billiard.process
    from celery.signals import worker_process_init

    monkeypatch.setenv(gpu.GPU_DEVICES_ENV, "3,5")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(billiard.process, "current_process", lambda: SimpleNamespace(index=1))
    worker_process_init.send(sender=None)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"


def test_importing_the_worker_loads_no_cuda_initializing_framework():
    code = ("import sys, json, worker.app, worker.tasks, worker.plugins, worker.gpu, producer.cli\n"
            f"print(json.dumps([m for m in {FRAMEWORKS!r} if m in sys.modules]))")
    env = {**os.environ, "MODELYARD_BROKER_URL": "redis://127.0.0.1:1/0"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_gpu_discovery_asks_onnx_runtime_in_a_subprocess_and_loads_nothing_here():
    code = ("import sys, json, worker.gpu as g\n"
            "print(json.dumps([g.available_providers(), g.visible_gpus(), 'onnxruntime' in sys.modules]))")
    env = {**os.environ, "MODELYARD_BROKER_URL": "redis://127.0.0.1:1/0"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    providers, _gpus, imported = json.loads(out.stdout.splitlines()[-1])
    assert CPU in providers and imported is False


def test_a_gpu_worker_without_cuda_refuses_to_start_unless_allowed_on_cpu(monkeypatch, capsys):
    from worker import __main__ as start

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(start, "cuda_providers", list)  # this machine has none either way
    with pytest.raises(SystemExit) as refused:
        start.celery_args(start.parse(["--pool", "gpu"]))
    assert refused.value.code == 2
    assert "no CUDA execution provider is available to ONNX Runtime" in capsys.readouterr().err
    args = start.celery_args(start.parse(["--pool", "gpu", "--allow-cpu", "--concurrency", "2"]))
    assert args[args.index("-Q") + 1].split(",")[0] == "gpu" and args[args.index("-c") + 1] == "2"
    assert args[args.index("-Q") + 1].split(",")[1].startswith("gpu.cpu-")  # no CUDA: its CPU class
    assert "this gpu-pool worker runs ONNX models on the CPU (--allow-cpu)" in capsys.readouterr().err
