"""What the crafted-model tests share: a job through the queue, a converter called directly, and the checks.

A crafted file must end FAILED in convert with a message naming the problem, leave no marker file
(its payload never ran) and put no byte of a worker file into any artifact.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from producer import api


def run_job(folder: Path, text: str, timeout: float = 300) -> dict:
    job = folder / "job.yaml"
    job.write_text(text)
    return api.wait(api.submit(job), timeout=timeout)


def assert_failed_in_convert(job: dict, *phrases: str) -> None:
    assert job["state"] == "FAILED", job
    assert job["stages"]["convert"]["state"] == "failed", job["stages"]
    for phrase in phrases:
        assert phrase in job["error"], job["error"]
    assert "Traceback" not in job["error"]


def assert_no_artifact_holds(secret: bytes) -> None:
    """No file in the producer's artifact store contains ``secret``."""
    store = Path(unquote(urlparse(os.environ["MODELYARD_ARTIFACT_STORE"]).path))
    leaked = [path for path in store.rglob("*") if path.is_file() and secret in path.read_bytes()]
    assert not leaked, leaked


def convert(fmt: str, source: Path, workdir: Path, *, samples: dict | None = None, inputs=None):
    """The registered converter called the way the convert stage calls it (no queue, no sandbox)."""
    from shared.jobspec import ConvertSpec, ModelSpec
    from shared.settings import Settings
    from worker.plugins import registry
    from worker.plugins.base import ConvertRequest

    workdir.mkdir(parents=True, exist_ok=True)
    request = ConvertRequest(source=source, model=ModelSpec(name="m", source=source.name, format=fmt, inputs=inputs),
                             convert=ConvertSpec(samples=samples or {"batch": 2}), workdir=workdir,
                             settings=Settings())
    return registry.converter(fmt).convert(request)
