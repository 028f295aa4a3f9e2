"""queue: what modelyard's Celery settings and job bookkeeping cost per message.

    python scripts/bench/queue_throughput.py [--quick] [--messages N] [--reps R]
                                             [--workers W] [--concurrency C] [--loglevel L]

N no-op stage messages (2,000; quick 300) through modelyard's Celery app with its real
settings (acks_late, prefetch 1, JSON, routed to the cpu queue, Redis result backend, task
events off until a monitor turns them on, as with no Flower running, and the job bookkeeping
that ``StageTask.run_stage`` does around every stage), against
a bare Celery app with Celery's defaults; same Redis server (db 0 and db 1), same worker count
and concurrency, same log level, both workers running throughout, sides alternating per
repetition. Throughput = N / (first message sent .. last message done); see
``scripts/bench/queue_app.py`` for the two apps. Target: modelyard ≥ 0.8x bare.

(The file is not called ``queue.py``: in this folder that name would shadow the standard
library's ``queue`` module for every script here, and ``import torch`` fails.)
"""

from __future__ import annotations

import time
import uuid

import common
from common import Stat

QUEUE_APP = "scripts.bench.queue_app"
STAGES_PER_JOB = 8


def run_side(stack, side: str, messages: int, timeout: float) -> dict:
    """Send the messages, wait until the workers counted all of them done; timings in seconds."""
    run = uuid.uuid4().hex[:12]
    key = f"bench:done:{run}"
    if side == "modelyard":
        from producer.api import _celery  # the producer's app: make_celery + no result subscription
        from shared.jobs import JobStore

        app = _celery(stack.url(0))
        jobs = JobStore.from_url(stack.url(0))
        # Like real jobs: each message is a distinct (job, stage) pair, a job has STAGES_PER_JOB
        # stages, and the stage names (metric labels) repeat across jobs. Jobs are made untimed.
        for j in range(-(-messages // STAGES_PER_JOB)):
            jobs.create(f"bench{run}-{j}", {"model": "bench", "spec": {}})
        client = jobs.redis

        def send(i: int) -> None:
            job_id, stage = f"bench{run}-{i // STAGES_PER_JOB}", f"noop:{i % STAGES_PER_JOB}"
            app.send_task("bench.noop_stage", kwargs={"job_id": job_id, "model": "bench", "stage": stage, "run": run},
                          queue="cpu")
    else:
        import redis
        from celery import Celery

        app = Celery("bare", broker=stack.url(1), set_as_current=False)
        client = redis.Redis.from_url(stack.url(1))

        def send(i: int) -> None:
            app.send_task("bench.noop", kwargs={"run": run})

    started = time.perf_counter()
    for i in range(messages):
        send(i)
    sent = time.perf_counter() - started
    deadline = time.monotonic() + timeout
    while int(client.get(key) or 0) < messages:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{side}: only {int(client.get(key) or 0)} of {messages} messages done "
                               f"after {timeout:.0f} s")
        time.sleep(0.005)
    wall = time.perf_counter() - started
    if side == "modelyard":
        done, states = 0, set()
        for j in range(-(-messages // STAGES_PER_JOB)):
            record = jobs.get(f"bench{run}-{j}")
            done += sum(1 for s in record["stages"].values() if s.get("state") == "done")
            states.add(record["state"])
            jobs.delete(f"bench{run}-{j}")
        if done != messages or states != {"RUNNING"}:
            raise RuntimeError(f"job bookkeeping incomplete: {done} of {messages} stages done, states {states}")
    return {"wall_s": wall, "send_s": sent, "per_s": messages / wall}


def main() -> None:
    parser = common.parser(__doc__, reps=(5, 5), threads=1)
    parser.add_argument("--messages", type=int, default=None, help="messages per repetition (2000; quick 300)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes per side")
    parser.add_argument("--concurrency", type=int, default=2, help="prefork children per worker")
    parser.add_argument("--loglevel", default="WARNING", help="worker log level, both sides")
    args = common.resolve(parser.parse_args(), messages=(2000, 300))
    common.pin_threads(args.threads)
    report = common.Report("queue", args)

    from services import HOST, Stack

    with Stack.start() as stack:
        stack.env["BENCH_BARE_BROKER_URL"] = stack.url(1)
        names = {"modelyard": [f"mybench{i}@{HOST}" for i in range(args.workers)],
                 "bare": [f"barebench{i}@{HOST}" for i in range(args.workers)]}
        for name in names["modelyard"]:
            stack.celery_worker(name, QUEUE_APP, queue="cpu", concurrency=args.concurrency,
                                loglevel=args.loglevel, events=False)  # as `modelyard worker` runs it
        for name in names["bare"]:
            stack.celery_worker(name, f"{QUEUE_APP}:bare", queue="celery", concurrency=args.concurrency,
                                loglevel=args.loglevel, events=False)
        from celery import Celery

        stack.wait_online(names["modelyard"])
        stack.wait_online(names["bare"], app=Celery("bare", broker=stack.url(1), set_as_current=False))
        report.log(f"{args.workers} worker(s) x concurrency {args.concurrency} per side online")

        timeout = 60 + args.messages / 20
        for side in ("modelyard", "bare"):  # warm-up: children started, connections made
            run_side(stack, side, min(100, args.messages), timeout)
        results: dict[str, list[dict]] = {"modelyard": [], "bare": []}
        for rep in range(args.reps):
            for side in (("modelyard", "bare") if rep % 2 == 0 else ("bare", "modelyard")):
                result = run_side(stack, side, args.messages, timeout)
                results[side].append(result)
                report.log(f"rep {rep + 1}/{args.reps} {side:9s} {result['per_s']:7.0f} msg/s "
                           f"(sent in {result['send_s']:.2f} s, done in {result['wall_s']:.2f} s)")

    throughput = {side: Stat([r["per_s"] for r in rows]) for side, rows in results.items()}
    wall = {side: Stat([r["wall_s"] for r in rows]) for side, rows in results.items()}
    send = {side: Stat([r["send_s"] * 1e6 / args.messages for r in rows]) for side, rows in results.items()}
    report.table(["side", "messages", "throughput msg/s, median (min–max)", "wall s", "enqueue µs/msg"])
    for side, label in (("bare", "bare Celery, defaults"), ("modelyard", "modelyard app + StageTask bookkeeping")):
        report.row(label, args.messages, throughput[side].show(0), wall[side].show(2), send[side].show(0))
    ratio = throughput["modelyard"].median / throughput["bare"].median
    report.ratio("queue throughput, modelyard / bare", ratio, ">= 0.8")
    report.notes.append(f"{args.workers} worker(s) per side, concurrency {args.concurrency}, log level "
                        f"{args.loglevel}; {args.reps} repetitions of {args.messages} messages, sides alternating")
    report.data = {"results": results, "throughput": {k: v.to_dict() for k, v in throughput.items()}}
    report.finish()


if __name__ == "__main__":
    main()
