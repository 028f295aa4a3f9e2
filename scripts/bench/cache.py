"""cache: resubmitting the identical job costs almost nothing.

    python scripts/bench/cache.py [--quick] [--reps R] [--threads T]

The MiniLM job of ``pipeline.py`` (convert, variants ``graph``, ``int8-dynamic``, ``fp16``,
selection, deploy into a file:// repository) through the queue with one cpu worker. Each
repetition submits it into a fresh artifact store (cold: every step computed) and then submits
the same job file again (warm: every step's manifest exists, the deploy finds its version).
Wall time from ``submit`` to the terminal state, polled every 50 ms; the worker is warmed up by
one untimed job first. Target: warm ≤ 5% of cold.
"""

from __future__ import annotations

import os
import time

import common
from common import Stat


def main() -> None:
    parser = common.parser(__doc__, reps=(5, 2), threads=1)
    parser.add_argument("--batch", type=int, default=None, help="sample batch (8; quick 4)")
    parser.add_argument("--sequence", type=int, default=None, help="sample sequence length (128; quick 64)")
    parser.add_argument("--bench-runs", type=int, default=None, help="MODELYARD_BENCH_RUNS (20; quick 5)")
    args = common.resolve(parser.parse_args(), batch=(8, 4), sequence=(128, 64), bench_runs=(20, 5))
    common.pin_threads(args.threads)
    os.environ["MODELYARD_BENCH_RUNS"] = str(args.bench_runs)
    report = common.Report("cache", args)

    from services import HOST, Stack, fresh_store, job_yaml, minilm_dir, run_jobs, write_job

    source = minilm_dir()
    cold, warm, checks = [], [], []
    with Stack.start() as stack:
        worker = f"cpu1@{HOST}"
        stack.worker(worker, pool="cpu", concurrency=1)
        stack.wait_online([worker])

        def job_file():
            repository = stack.folder / f"repo-{time.monotonic_ns()}"
            return write_job(stack.folder / "jobs", job_yaml(
                source=source, variants=["graph", "int8-dynamic", "fp16"], repository=repository,
                batch=args.batch, sequence=args.sequence))

        report.log("warm-up (untimed): one job")
        run_jobs([job_file()], store=fresh_store(stack))
        for rep in range(args.reps):
            path, store = job_file(), fresh_store(stack)
            cold_s, _ = run_jobs([path], store=store)
            warm_s, (record,) = run_jobs([path], store=store)
            states = {name: s.get("state") for name, s in record["stages"].items()}
            computed = [name for name, state in states.items() if name.startswith(("convert", "optimize"))
                        and state != "cached"]
            reused = record["stages"]["deploy"].get("reused")
            if computed or not reused:
                raise RuntimeError(f"the resubmitted job computed {computed or 'a new deploy version'}")
            cold.append(cold_s)
            warm.append(warm_s)
            checks.append(states)
            report.log(f"rep {rep + 1}/{args.reps}: cold {cold_s:.1f} s, warm {warm_s:.2f} s "
                       f"({warm_s / cold_s:.1%})")

    cold_stat, warm_stat = Stat(cold), Stat(warm)
    ratios = Stat([w / c for w, c in zip(warm, cold)])
    report.table(["run", "wall s, median (min–max)", "runs"])
    report.row("cold (fresh artifact store)", cold_stat.show(2), len(cold))
    report.row("warm (identical job resubmitted)", warm_stat.show(2), len(warm))
    report.ratio("warm/cold wall", warm_stat.median / cold_stat.median, "<= 0.05",
                 f"per repetition {ratios.show(3)}")
    report.notes.append(f"samples {args.batch}x{args.sequence}, MODELYARD_BENCH_RUNS={args.bench_runs}, "
                        f"1 cpu worker, concurrency 1, {args.threads} thread(s); warm runs: every convert/optimize "
                        "stage 'cached', deploy reused its version")
    report.data = {"cold_s": cold, "warm_s": warm, "warm_stage_states": checks}
    report.finish()


if __name__ == "__main__":
    main()
