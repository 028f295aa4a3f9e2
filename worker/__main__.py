"""Start a Celery worker for one pool: ``python -m worker --pool cpu|gpu [options]``.

``modelyard worker`` replaces itself with this process. It lives in the worker package because
finding the GPUs and choosing the process count is the worker's business: the producer only
names the options. A gpu worker runs one process per visible GPU (CUDA_VISIBLE_DEVICES, else
nvidia-smi), each pinned to its GPU; --concurrency applies only where no GPU is visible
(--allow-cpu). GPU discovery runs in subprocesses, so CUDA is never initialized in the parent.

Besides its pool's queue, a worker consumes ``<pool>.<hardware class>`` (``cpu.cpu-avx2``,
``gpu.gpu-a100-sxm4-40gb``; ``shared.inference.hardware``): a job's ``optimize.target`` sends its
timing there, and ``modelyard workers`` reads each worker's class from its queues.
"""

from __future__ import annotations

import argparse
import os
import sys

from shared.inference.hardware import class_queue, cpu_class, cpu_flags, gpu_class
from worker.gpu import GPU_DEVICES_ENV, cuda_providers, gpu_name, visible_gpus

EXIT_BAD_INPUT = 2


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    parser.add_argument("--pool", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--name", default="")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--allow-cpu", action="store_true", help="let a gpu worker run without CUDA")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--recycle-after", type=int, default=20,
                        help="gpu pool: replace a worker process after this many tasks")
    parser.add_argument("--hardware-class", default="",
                        help="the class this worker advertises (default: detected, e.g. cpu-avx2)")
    return parser.parse_args(argv)


def gpu_processes(allow_cpu: bool, concurrency: int) -> int:
    """A gpu worker's process count (one per visible GPU). SystemExit(2) on a machine without CUDA,
    unless allowed."""
    gpus = visible_gpus()
    if gpus:
        concurrency = len(gpus)
        os.environ[GPU_DEVICES_ENV] = ",".join(gpus)
    else:
        os.environ.pop(GPU_DEVICES_ENV, None)
    providers = cuda_providers()
    if not providers and not allow_cpu:
        print("error: no CUDA execution provider is available to ONNX Runtime; a gpu worker needs one "
              "(install modelyard[gpu] on a machine with a GPU, or pass --allow-cpu to run on CPU)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)
    if not providers:
        print("warning: ONNX Runtime has no CUDA provider: this gpu-pool worker runs ONNX models on the CPU "
              "(--allow-cpu)", file=sys.stderr)
    if gpus:
        print(f"gpu pool: {len(gpus)} worker process(es), one per GPU ({', '.join(gpus)})", file=sys.stderr)
    return concurrency


def hardware_class(pool: str) -> str:
    """This machine's class for a worker of ``pool``: its GPU's on a gpu worker with CUDA, else its CPU's."""
    if pool == "gpu" and cuda_providers():
        name = gpu_name()
        if name:
            return gpu_class(name)
    return cpu_class(cpu_flags())


def celery_args(args: argparse.Namespace) -> list[str]:
    concurrency = gpu_processes(args.allow_cpu, args.concurrency) if args.pool == "gpu" else args.concurrency
    queues = f"{args.pool},{class_queue(args.pool, args.hardware_class or hardware_class(args.pool))}"
    command = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", queues,
               "-n", args.name or f"{args.pool}@%h", "-c", str(concurrency), f"--loglevel={args.loglevel}"]
    if args.pool == "gpu":
        command.append(f"--max-tasks-per-child={args.recycle_after}")
    return command


def main(argv: list[str] | None = None) -> None:
    command = celery_args(parse(argv))
    sys.stderr.flush()
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
