"""Hardware classes from CPU flags and GPU names, the class queues workers consume, and job routing to them."""

from __future__ import annotations

import pytest

from shared.inference.hardware import (
    class_of_queue,
    class_queue,
    cpu_class,
    cpu_flags,
    cpu_model,
    describe,
    gpu_class,
    hardware_class,
    pool_of_class,
    pool_of_queue,
)
from shared.jobspec import parse_job
from shared.pipeline import plan, queue_for

EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2 fma f16c\n"
XEON = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
        "flags\t\t: fpu avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16\n")


def gpu_benefit(name: str) -> bool:
    return name in ("fp16", "trt-fp16")


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx2", "fma"}, "cpu-avx2"),
    ({"avx2", "avx_vnni"}, "cpu-avx-vnni"),
    ({"avx2", "avx512f", "avx512bw"}, "cpu-avx512"),
    ({"avx2", "avx512f", "avx512_vnni"}, "cpu-avx512-vnni"),
    ({"avx512f", "avx512_vnni", "amx_tile", "amx_int8"}, "cpu-amx"),
    ({"sse4_2"}, "cpu-generic"),
])
def test_a_cpu_class_names_its_best_int8_instruction_set(flags, expected):
    assert cpu_class(flags, "x86_64") == expected


def test_an_arm_cpu_is_cpu_arm64():
    assert cpu_class({"fp", "asimd", "asimddp"}, "aarch64") == "cpu-arm64"


def test_the_class_and_isa_come_from_proc_cpuinfo():
    assert cpu_model(EPYC) == "AMD EPYC" and hardware_class(cpuinfo=EPYC) == "cpu-avx2"
    assert "avx512_vnni" in cpu_flags(XEON) and hardware_class("CPUExecutionProvider", cpuinfo=XEON) == "cpu-amx"


def test_a_gpu_measurement_has_the_gpus_class_and_a_cpu_one_the_cpus_even_on_a_gpu_machine():
    assert gpu_class("NVIDIA H100 80GB HBM3") == "gpu-h100-80gb-hbm3"
    assert hardware_class("CUDAExecutionProvider", "NVIDIA A100-SXM4-40GB", cpuinfo=EPYC) == "gpu-a100-sxm4-40gb"
    assert hardware_class("CPUExecutionProvider", "NVIDIA A100-SXM4-40GB", cpuinfo=EPYC) == "cpu-avx2"


def test_describe_records_what_a_latency_figure_depends_on():
    record = describe(threads=2, provider="CPUExecutionProvider", gpu="NVIDIA A100", cpuinfo=XEON)

    assert record["class"] == "cpu-amx" and record["cpu"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert record["isa"] == ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
                             "amx_int8", "amx_bf16"]
    assert record["threads"] == 2 and record["cores"] >= 1 and record["gpu"] is None
    assert record["provider"] == "CPUExecutionProvider" and record["runtime"].startswith("onnxruntime")


def test_this_machine_has_a_class_matching_what_job_files_may_name():
    record = describe(threads=1, provider="CPUExecutionProvider")

    spec = parse_job(f"model: {{name: m, source: m.onnx, format: onnx}}\n"
                     f"optimize: {{variants: [int8-dynamic], target: {record['class']}}}\n")
    assert spec.optimize.target == record["class"]


def test_class_queues_name_their_pool_and_class():
    assert class_queue("cpu", "cpu-avx2") == "cpu.cpu-avx2"
    assert pool_of_queue("gpu.gpu-h100") == "gpu" and pool_of_queue("cpu") == "cpu"
    assert class_of_queue("cpu.cpu-avx512-vnni") == "cpu-avx512-vnni" and class_of_queue("cpu") is None
    assert pool_of_class("gpu-l4") == "gpu" and pool_of_class("cpu-amx") == "cpu"


# -- where the select stage (the side-by-side timing) runs -------------------------------------------

def job(optimize: str, extra: str = ""):
    return parse_job(f"model: {{name: m, source: m.onnx, format: onnx}}\noptimize: {optimize}\n{extra}")


def test_the_timing_runs_on_a_worker_of_the_target_class():
    spec = job("{variants: [int8-dynamic, fp16], target: cpu-avx512-vnni}", "device: gpu\n")
    assert queue_for(spec, "select", gpu_benefit=gpu_benefit) == "cpu.cpu-avx512-vnni"
    assert plan(spec, gpu_benefit=gpu_benefit)["select"] == "cpu.cpu-avx512-vnni"
    assert queue_for(job("{variants: [fp16], target: gpu-l4}"), "select", gpu_benefit=gpu_benefit) == "gpu.gpu-l4"


def test_without_a_target_the_timing_follows_the_gpu_variants_of_a_gpu_job_else_cpu():
    assert queue_for(job("{variants: [int8-dynamic, fp16]}", "device: gpu\n"), "select",
                     gpu_benefit=gpu_benefit) == "gpu"
    assert queue_for(job("{variants: [int8-dynamic]}", "device: gpu\n"), "select", gpu_benefit=gpu_benefit) == "cpu"
    assert queue_for(job("{variants: [fp16]}"), "select", gpu_benefit=gpu_benefit) == "cpu"
    assert queue_for(job("{variants: [int8-dynamic]}", "pools: {optimize: gpu}\n"), "select",
                     gpu_benefit=gpu_benefit) == "gpu"


@pytest.mark.parametrize("target", ["avx2", "cpu", "CPU-AVX2", "tpu-v5", "cpu-"])
def test_a_target_that_is_not_a_class_name_is_refused_naming_the_field(target):
    from shared.errors import UserInputError

    with pytest.raises(UserInputError, match="optimize.target"):
        job(f"{{variants: [int8-dynamic], target: {target}}}")
