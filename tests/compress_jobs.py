"""Run the compress stage outside Celery: a job record in the test Redis, the source in a file store.

``record_job`` records a job with ``producer.api.record``, as ``producer.api.submit`` does before
enqueueing (upload the source and the distillation data, record the job), so a test can call
``run_compress`` in this process or in a subprocess it can kill. ``python -m tests.compress_jobs
JOB_ID`` runs the stage for a recorded job (broker and store from the MODELYARD_* environment);
``--pause-after-epoch N`` stops it dead (sleeps) right after epoch N's checkpoint is stored, so a
test can ``kill -9`` it there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from producer import api
from shared.jobs import JobStore
from shared.jobspec import parse_job
from shared.settings import Settings
from shared.storage import open_store


def record_job(*, redis_url: str, store_uri: str, job_text: str, source: Path, data: Path | None) -> str:
    return api.record(JobStore.from_url(redis_url), open_store(store_uri), parse_job(job_text), source,
                      distill_path=data)


def context(job_id: str, settings: Settings | None = None):
    from worker.context import StageContext

    settings = settings or Settings()
    return StageContext(settings=settings, jobs=JobStore.from_url(settings.broker_url), job_id=job_id,
                        worker="test", queue="cpu")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job_id")
    parser.add_argument("--pause-after-epoch", type=int, default=0)
    args = parser.parse_args()
    from worker.stages import compress

    if args.pause_after_epoch:
        save = compress.Checkpoints.save

        def save_then_pause(self, checkpoint) -> None:
            save(self, checkpoint)
            if checkpoint.epoch == args.pause_after_epoch:
                print(f"checkpointed epoch {checkpoint.epoch}; pausing", flush=True)
                time.sleep(3600)

        compress.Checkpoints.save = save_then_pause
    manifest, cached = compress.run_compress(context(args.job_id))
    print(json.dumps({"step_key": manifest.step_key, "cached": cached, "metrics": manifest.metrics}), flush=True)


if __name__ == "__main__":
    main()
