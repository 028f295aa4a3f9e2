"""scaling: jobs per minute with 1 and with 2 cpu workers.

    python scripts/bench/scaling.py [--quick] [--jobs N] [--reps R] [--threads T]

N distinct convert jobs (8; quick 4): all-MiniLM-L6-v2 to ONNX with the conversion check, each
with its own ``convert.samples.seed``, so each has its own step key. Each repetition submits all
N at once into a fresh artifact store (nothing cached) and waits for the last; once with one
cpu worker consuming (the second told to stop consuming, staying warm), once with both, in
alternating order. Workers have concurrency 1 and ``--threads`` intra-op threads each (default 1,
so two workers fit two cores). Jobs/min = N / (first submit .. last job done). Target: 2 workers
≥ 1.6x the jobs/min of 1.
"""

from __future__ import annotations

import common
from common import Stat


def main() -> None:
    parser = common.parser(__doc__, reps=(5, 2), threads=1)
    parser.add_argument("--jobs", type=int, default=None, help="convert jobs per repetition (8; quick 4)")
    parser.add_argument("--batch", type=int, default=None, help="sample batch (8; quick 4)")
    parser.add_argument("--sequence", type=int, default=None, help="sample sequence length (128; quick 64)")
    args = common.resolve(parser.parse_args(), jobs=(8, 4), batch=(8, 4), sequence=(128, 64))
    common.pin_threads(args.threads)
    report = common.Report("scaling", args)

    from services import HOST, Stack, fresh_store, job_yaml, minilm_dir, run_jobs, write_job

    source = minilm_dir()
    rates: dict[int, list[float]] = {1: [], 2: []}
    walls: dict[int, list[float]] = {1: [], 2: []}
    spread: dict[int, list[dict]] = {1: [], 2: []}
    with Stack.start() as stack:
        workers = [f"cpu1@{HOST}", f"cpu2@{HOST}"]
        for name in workers:
            stack.worker(name, pool="cpu", concurrency=1)
        stack.wait_online(workers)

        def jobs(count: int, first_seed: int = 0):
            return [write_job(stack.folder / "jobs", job_yaml(source=source, variants=None, repository=None,
                                                              batch=args.batch, sequence=args.sequence,
                                                              seed=first_seed + i))
                    for i in range(count)]

        def run(count_workers: int, files) -> tuple[float, list[dict]]:
            if count_workers == 1:
                stack.consume(workers[1], False)
            try:
                return run_jobs(files, store=fresh_store(stack))
            finally:
                if count_workers == 1:
                    stack.consume(workers[1], True)

        report.log("warm-up (untimed): one convert job on each worker alone")
        stack.consume(workers[0], False)
        run_jobs(jobs(1, 1000), store=fresh_store(stack))
        stack.consume(workers[0], True)
        run(1, jobs(1, 1001))
        for rep in range(args.reps):
            for count in ((1, 2) if rep % 2 == 0 else (2, 1)):
                wall, records = run(count, jobs(args.jobs))
                per_worker: dict[str, int] = {}
                for record in records:
                    worker = record["stages"]["convert"]["worker"]
                    per_worker[worker] = per_worker.get(worker, 0) + 1
                rates[count].append(args.jobs / wall * 60)
                walls[count].append(wall)
                spread[count].append(per_worker)
                report.log(f"rep {rep + 1}/{args.reps}, {count} worker(s): {wall:.1f} s, "
                           f"{args.jobs / wall * 60:.1f} jobs/min, jobs per worker {per_worker}")

    report.table(["cpu workers", "jobs", "wall s, median (min–max)", "jobs/min, median (min–max)"])
    for count in (1, 2):
        report.row(count, args.jobs, Stat(walls[count]).show(1), Stat(rates[count]).show(2))
    report.ratio("jobs/min, 2 workers / 1 worker", Stat(rates[2]).median / Stat(rates[1]).median, ">= 1.6")
    report.notes.append(f"convert-only MiniLM jobs, samples {args.batch}x{args.sequence}, workers of concurrency 1 "
                        f"with {args.threads} thread(s) each")
    report.data = {"jobs_per_min": rates, "wall_s": walls, "jobs_per_worker": spread}
    report.finish()


if __name__ == "__main__":
    main()
