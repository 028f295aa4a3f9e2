"""The gpu pool: GPU discovery, one worker process per GPU, and the execution providers a stage uses.

Nothing here initializes CUDA in the calling process. GPUs are listed from
``CUDA_VISIBLE_DEVICES`` or by ``nvidia-smi -L`` in a subprocess; ONNX Runtime's providers are
asked in a subprocess too. ``modelyard worker --pool gpu`` starts one prefork child per GPU and
puts the list in ``MODELYARD_GPU_DEVICES``; each child sets its own ``CUDA_VISIBLE_DEVICES``
from its pool index in ``worker_process_init``, before any task can touch CUDA. A child
replaced after ``--recycle-after`` tasks gets the index, hence the GPU, of the one it replaces.

Provider choice for a stage (``choose_providers``): TensorRT variants run under the TensorRT
execution provider with an engine cache in the variant's output folder (stored as an artifact
beside the model); other stages on a gpu-pool worker with CUDA run under CUDA; everything else,
including a gpu-pool worker started with ``--allow-cpu`` on a machine without CUDA, runs on the
CPU and says so in the ``provider`` it records.

Torch fallback (``torch_cuda_figures``): where ONNX Runtime has no CUDA provider but PyTorch
sees a GPU, a gpu-benefiting variant of a Hugging Face model also gets the *source model* timed
in PyTorch on that GPU, in float32 and float16. That is an estimate of what the GPU gives a
half-precision model, not a measurement of the ONNX variant itself.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.signals import worker_process_init

from shared.errors import UserInputError

TENSORRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
CUDA_PROVIDERS = (TENSORRT, CUDA)
GPU_DEVICES_ENV = "MODELYARD_GPU_DEVICES"  # set by `modelyard worker --pool gpu` for its children
ENGINE_CACHE = "trt_cache"  # TensorRT engine cache folder, beside the variant's model file
CALIBRATION_TABLE = "calibration.flatbuffers"  # TensorRT INT8 ranges, inside ENGINE_CACHE
TORCH_FALLBACK_MEASURES = ("the source model in PyTorch on CUDA (float32 and float16, warm-up runs, "
                           "torch.cuda.synchronize() after each run): an estimate for this GPU, "
                           "not the ONNX variant")

ProviderSpec = str | tuple[str, dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# Discovery, in subprocesses.

def available_providers() -> list[str]:
    """ONNX Runtime's execution providers, asked in a child process (so CUDA is not touched here)."""
    code = "import onnxruntime, json; print(json.dumps(onnxruntime.get_available_providers()))"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return []


def cuda_providers() -> list[str]:
    return [p for p in available_providers() if p in CUDA_PROVIDERS]


def parse_visible_devices(value: str) -> list[str]:
    """CUDA_VISIBLE_DEVICES as CUDA reads it: entries up to the first empty or negative one."""
    devices = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry or entry.startswith("-"):
            break
        devices.append(entry)
    return devices


_SMI_LINE = re.compile(r"^GPU (\d+):")


def parse_nvidia_smi_list(text: str) -> list[str]:
    """GPU indices from ``nvidia-smi -L`` ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-…)")."""
    return [m.group(1) for line in text.splitlines() if (m := _SMI_LINE.match(line.strip()))]


def visible_gpus(environ: Mapping[str, str] | None = None, *, smi: str = "nvidia-smi") -> list[str]:
    """The GPUs this machine shows the worker: CUDA_VISIBLE_DEVICES if set, else ``nvidia-smi -L``."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return parse_visible_devices(environ["CUDA_VISIBLE_DEVICES"])
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=True)
    except (subprocess.SubprocessError, OSError):
        return []
    return parse_nvidia_smi_list(out.stdout)


@functools.lru_cache(maxsize=1)
def gpu_name() -> str | None:
    """The name of the GPU this process uses (the first visible one), from nvidia-smi."""
    visible = parse_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
    command = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", visible[0] if visible else "0"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    names = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return names[0] if names else None


# ---------------------------------------------------------------------------------------------
# One prefork child per GPU.

def pin_child_to_gpu(index: int, environ: MutableMapping[str, str] | None = None) -> str | None:
    """Give the pool child with this index one GPU of ``MODELYARD_GPU_DEVICES``; None when unset."""
    environ = os.environ if environ is None else environ
    devices = [d.strip() for d in environ.get(GPU_DEVICES_ENV, "").split(",") if d.strip()]
    if not devices:
        return None
    device = devices[index % len(devices)]
    environ["CUDA_VISIBLE_DEVICES"] = device
    environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # the same numbering as nvidia-smi
    return device


@worker_process_init.connect(weak=False)
def _pin_worker_process(**_: Any) -> None:
    from billiard.process import current_process

    pin_child_to_gpu(getattr(current_process(), "index", 0) or 0)


# ---------------------------------------------------------------------------------------------
# Execution providers.

def tensorrt_missing(worker: str, available: Sequence[str]) -> UserInputError:
    return UserInputError(
        f"TensorRT execution provider not available on worker {worker or 'this worker'}; "
        f"available: {', '.join(available) or 'none'} (TensorRT variants need onnxruntime-gpu built "
        "with TensorRT, and TensorRT installed)"
    )


def choose_providers(pool: str, available: Sequence[str], *, tensorrt: str | None = None,
                     engine_cache: Path | None = None, worker: str = "") -> list[ProviderSpec]:
    """ONNX Runtime providers for a stage, best first. ``tensorrt``: None, "fp16" or "int8"."""
    if tensorrt:
        if TENSORRT not in available:
            raise tensorrt_missing(worker, available)
        if engine_cache is None:
            raise ValueError("a TensorRT session needs an engine cache folder")
        options: dict[str, Any] = {
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(engine_cache),
            "trt_fp16_enable": True,
            "trt_int8_enable": tensorrt == "int8",
        }
        if tensorrt == "int8" and (Path(engine_cache) / CALIBRATION_TABLE).is_file():
            options["trt_int8_calibration_table_name"] = CALIBRATION_TABLE
        return [(TENSORRT, options), *([CUDA] if CUDA in available else []), CPU]
    if pool == "gpu" and CUDA in available:
        return [CUDA, CPU]
    return [CPU]


def provider_names(providers: Sequence[ProviderSpec]) -> list[str]:
    return [p[0] if isinstance(p, tuple) else p for p in providers]


@dataclass(frozen=True)
class Execution:
    """How one optimize variant runs on this worker: its providers, and the facts that key its cache."""

    pool: str
    available: tuple[str, ...]
    tensorrt: str | None
    gpu_benefit: bool
    worker: str

    @classmethod
    def plan(cls, pool: str, optimizers: Sequence[Any], worker: str) -> Execution:
        """Raises UserInputError for a TensorRT variant on a worker without TensorRT."""
        import onnxruntime

        tensorrt = next((o.tensorrt for o in optimizers if getattr(o, "tensorrt", None)), None)
        execution = cls(pool=pool, available=tuple(onnxruntime.get_available_providers()), tensorrt=tensorrt,
                        gpu_benefit=any(o.gpu_benefit for o in optimizers), worker=worker)
        execution.providers(Path("."))  # refuse early, before the variant is computed
        return execution

    def providers(self, engine_cache: Path) -> list[ProviderSpec]:
        return choose_providers(self.pool, self.available, tensorrt=self.tensorrt, engine_cache=engine_cache,
                                worker=self.worker)

    @property
    def on_gpu(self) -> bool:
        return provider_names(self.providers(Path(".")))[0] in CUDA_PROVIDERS

    @property
    def torch_fallback(self) -> bool:
        """A gpu-benefiting variant on a gpu-pool worker whose ONNX Runtime has no CUDA: try PyTorch."""
        return self.pool == "gpu" and self.gpu_benefit and not self.on_gpu

    def key_params(self) -> dict[str, Any]:
        """What makes a gpu-pool measurement differ from another machine's (empty on the cpu pool)."""
        if self.pool != "gpu":
            return {}
        return {"execution": {"providers": provider_names(self.providers(Path("."))),
                              "gpu": gpu_name() if self.on_gpu or self.torch_fallback else None,
                              "torch_cuda": self.torch_fallback and torch_cuda_available()}}


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


# ---------------------------------------------------------------------------------------------
# Torch fallback: the source model timed in PyTorch on CUDA.

def torch_cuda_figures(source: Path, task: str | None, samples: dict, reference: dict, *,
                       runs: int, warmup: int, device: str = "cuda") -> dict:
    """p50/p95 and cosine vs the reference of a Hugging Face model folder in PyTorch on CUDA.

    ``device="cpu"`` exists for the tests, which have no GPU.
    """
    import numpy as np
    import torch

    from shared.inference.fidelity import compare
    from worker.support.sentence_pooling import pooling_of
    from worker.support.transformers_models import TASKS, load_model, task_output

    task = task if task in TASKS else "feature-extraction"
    output_name = TASKS[task][1]
    pooling = pooling_of(Path(source), str(source)) if task == "sentence-embedding" else None
    model = load_model(Path(source), task, str(source)).to(device)
    feeds = {name: torch.from_numpy(np.ascontiguousarray(value)).to(device) for name, value in samples.items()}
    figures: dict[str, Any] = {"measures": TORCH_FALLBACK_MEASURES,
                               "gpu": torch.cuda.get_device_name(0) if device == "cuda" else device,
                               "torch": torch.__version__}
    for label, dtype in (("float32", torch.float32), ("float16", torch.float16)):
        model = model.to(dtype)
        times = []
        with torch.inference_mode():
            for index in range(max(warmup, 1) + runs):
                start = time.perf_counter()
                out = task_output(model, feeds, task, pooling)
                if device == "cuda":
                    torch.cuda.synchronize()  # kernels are asynchronous: wait for them before reading the clock
                if index >= max(warmup, 1):
                    times.append((time.perf_counter() - start) * 1000.0)
        fidelity = compare(reference, {output_name: out.float().cpu().numpy()})
        figures[label] = {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)),
                          "runs": runs, "cosine_min": fidelity["cosine_min"]}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return figures
