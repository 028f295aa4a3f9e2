"""What a latency figure was measured on: CPU model and ISA, cores, threads, GPU, runtime and provider.

A latency ratio holds for one kind of machine only: ONNX Runtime picks its INT8 kernels by CPUID,
so the same INT8 model runs at ~0.7x FP32 on an AVX2-only EPYC and ~0.45x on an AVX-512 VNNI
Xeon. Every measurement therefore carries ``describe()``'s record, and its short ``class``
(``hardware_class``) names the kind of machine in job files (``optimize.target``), queue names
(workers consume ``<pool>.<class>``) and reports:

* ``gpu-<name>`` when the measurement ran under a CUDA or TensorRT provider (``gpu-a100-sxm4-40gb``);
* else the CPU's best INT8 path: ``cpu-amx``, ``cpu-avx512-vnni``, ``cpu-avx512``, ``cpu-avx-vnni``,
  ``cpu-avx2``, ``cpu-arm64``, or ``cpu-generic``.

Reads ``/proc/cpuinfo`` (Linux); elsewhere the ISA list is empty and the class ``cpu-generic``.
A worker advertises its class by consuming ``<pool>.<class>`` (``class_queue``) beside its pool.
"""

from __future__ import annotations

import functools
import os
import platform
import re
from importlib import metadata
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "sve")
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
RUNTIMES = {"LiteRT-CPU": ("ai-edge-litert",)}  # else ONNX Runtime, under whichever distribution is installed
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return CPUINFO.read_text(errors="replace")
    except OSError:
        return ""


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's marketing name ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8480+")."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    found = re.search(r"^(model name|Model|Hardware)\s*:\s*(.+)$", text, flags=re.MULTILINE)
    return found.group(2).strip() if found else (platform.processor() or platform.machine() or "unknown")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """Every flag of the first CPU (``flags`` on x86, ``Features`` on ARM)."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    found = re.search(r"^(flags|Features)\s*:\s*(.*)$", text, flags=re.MULTILINE)
    return set(found.group(2).split()) if found else set()


def cpu_class(flags: set[str], machine: str | None = None) -> str:
    """The CPU's class from its flags: its best INT8 instruction set."""
    machine = (machine or platform.machine()).lower()
    if flags & {"amx_int8", "amx_tile"}:
        return "cpu-amx"
    if "avx512_vnni" in flags:
        return "cpu-avx512-vnni"
    if "avx512f" in flags:
        return "cpu-avx512"
    if "avx_vnni" in flags:
        return "cpu-avx-vnni"
    if "avx2" in flags:
        return "cpu-avx2"
    if machine in ("aarch64", "arm64") or "asimd" in flags:
        return "cpu-arm64"
    return "cpu-generic"


def gpu_class(name: str) -> str:
    """``gpu-`` and the GPU's name as a queue-safe slug, less the vendor: "NVIDIA H100 80GB" -> gpu-h100-80gb."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    slug = re.sub(r"^(nvidia|amd)-", "", slug)[:60].strip("-")
    return f"gpu-{slug or 'unknown'}"


def hardware_class(provider: str | None = None, gpu: str | None = None, *, cpuinfo: str | None = None) -> str:
    """The class a measurement under ``provider`` belongs to: the GPU's when a GPU provider ran it, else the CPU's."""
    if provider in GPU_PROVIDERS and gpu:
        return gpu_class(gpu)
    return cpu_class(cpu_flags(cpuinfo))


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask), which a container can make fewer than the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def runtime_version(provider: str | None) -> dict[str, str]:
    """The inference runtime's distribution and version, from package metadata (nothing is imported)."""
    for name in RUNTIMES.get(provider or "", ORT_DISTRIBUTIONS):
        try:
            return {"runtime": name, "version": metadata.version(name)}
        except metadata.PackageNotFoundError:
            continue
    return {"runtime": "unknown", "version": "unknown"}


def describe(*, threads: int, provider: str | None, gpu: str | None = None, cpuinfo: str | None = None) -> dict:
    """Everything a latency figure depends on, as plain data; ``class`` is its short name."""
    flags = cpu_flags(cpuinfo)
    on_gpu = provider in GPU_PROVIDERS
    return {
        "class": hardware_class(provider, gpu, cpuinfo=cpuinfo),
        "cpu": cpu_model(cpuinfo),
        "isa": [flag for flag in ISA_FLAGS if flag in flags],
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "gpu": gpu if on_gpu else None,
        "provider": provider,
        **runtime_version(provider),
    }


# -- queues: a worker of pool P and class C also consumes "P.C" ---------------------------------

def class_queue(pool: str, hardware: str) -> str:
    """The queue a worker of ``pool`` and class ``hardware`` consumes beside its pool's: ``cpu.cpu-avx2``."""
    return f"{pool}.{hardware}"


def pool_of_queue(queue: str) -> str:
    """The pool a queue belongs to: ``cpu.cpu-avx2`` -> ``cpu``; a pool queue is its own."""
    return queue.split(".", 1)[0]


def class_of_queue(queue: str) -> str | None:
    """The hardware class a class queue names (``cpu.cpu-avx2`` -> ``cpu-avx2``); None for a pool queue."""
    pool, _, hardware = queue.partition(".")
    return hardware or None


def pool_of_class(hardware: str) -> str:
    """The pool whose workers can have a class: gpu for ``gpu-…``, else cpu."""
    return "gpu" if hardware.startswith("gpu-") else "cpu"
