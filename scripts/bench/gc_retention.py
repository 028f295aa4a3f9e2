"""gc_retention: what ``modelyard gc`` frees after a batch of jobs of which a few were deployed.

    python scripts/bench/gc_retention.py [--jobs 20] [--deployed 2]

Tiny ONNX models (tests/models/tiny.py: a 4→3 MatMul + Relu, each job its own weights), each job
converted and optimized (fp32 and int8-dynamic, selected by size) through the queue with one cpu
worker; ``--deployed`` of them also deploy, each as its own model, into a file:// repository. Then
every job record is aged past the retention (as if the jobs had ended 40 days ago, before records
had a TTL), and ``modelyard gc --dry-run`` and ``modelyard gc`` (grace 0 s) run as a user runs them.
Prints the store's size before and after and both reports as JSON. The figures are for tiny
models: they count objects and bytes of this scale, not of a real model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import ROOT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--deployed", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))

    from services import HOST, Stack, run_jobs, write_job

    from shared.jobs import PREFIX, JobStore
    from shared.storage import open_store
    from tests.models.tiny import tiny_onnx

    with Stack.start(extra_env={"MODELYARD_PAIRED_MAX_SECONDS": "5", "MODELYARD_BENCH_RUNS": "5",
                                "MODELYARD_ALLOWED_REPOSITORIES": '["file://*"]'}) as stack:
        worker = f"cpu1@{HOST}"
        stack.worker(worker, pool="cpu", concurrency=1, loglevel="WARNING")
        stack.wait_online([worker])
        files = []
        for index in range(args.jobs):
            model = tiny_onnx(stack.folder / "models" / f"m{index}.onnx", seed=index, relu=True)
            deploy = (f"deploy: {{repository: {(stack.folder / 'repo').as_uri()}, alias: production}}\n"
                      if index < args.deployed else "")
            files.append(write_job(stack.folder / "jobs", f"model: {{name: tiny{index}, source: {model}, "
                                   "format: onnx}\noptimize: {variants: [int8-dynamic], gate: {cosine_min: 0.5}, "
                                   f"objective: size}}\n{deploy}"))
        store_uri = stack.env["MODELYARD_ARTIFACT_STORE"]
        wall, records = run_jobs(files, store=store_uri)
        jobs = JobStore.from_url(stack.env["MODELYARD_BROKER_URL"])
        then = repr(time.time() - 40 * 86400)
        for record in records:
            jobs.redis.hset(PREFIX + record["id"], mapping={"created": then, "updated": then, "finished": then})
            jobs.redis.persist(PREFIX + record["id"])
        store = open_store(store_uri)
        before = [(o.key, o.size) for prefix in ("steps/", "checkpoints/", "blobs/", "uploads/")
                  for o in store.list_objects(prefix)]

        def gc(*options: str) -> dict:
            run = subprocess.run([sys.executable, "-m", "producer", "gc", "--json", "--grace", "0s", *options],
                                 cwd=ROOT, env=stack.env, capture_output=True, text=True, check=True)
            return json.loads(run.stdout)

        preview, report = gc("--dry-run"), gc()
        after = [o.size for prefix in ("steps/", "checkpoints/", "blobs/", "uploads/")
                 for o in store.list_objects(prefix)]
        print(json.dumps({
            "jobs": args.jobs, "deployed": args.deployed, "jobs_wall_s": round(wall, 1),
            "store_before": {"objects": len(before), "bytes": sum(size for _, size in before)},
            "store_after": {"objects": len(after), "bytes": sum(after)},
            "dry_run": preview, "gc": report,
        }, indent=1))


if __name__ == "__main__":
    main()
