"""``modelyard gc`` beside real workers: deployed versions keep their lineage, old undeployed steps go.

The module runs its own worker on its own Redis database and artifact store, so that sweeping
"everything old" cannot touch what other test modules' jobs stored.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from producer import api
from shared.jobs import PREFIX, JobStore
from shared.manifest import manifest_key
from shared.repository import ModelRepository
from shared.settings import get_settings
from shared.storage import open_store
from shared.storage.base import blob_key
from tests.models.tiny import tiny_onnx
from tests.services import ROOT, Cluster

pytestmark = pytest.mark.integration

DB = 4  # the Redis database (broker and job records) of this module's worker
OLD = 40 * 86400.0


@pytest.fixture(scope="module")
def gc_env(service_env, tmp_path_factory):
    home = tmp_path_factory.mktemp("gc-home")
    env = {**service_env, "MODELYARD_BROKER_URL": service_env["MODELYARD_BROKER_URL"].rsplit("/", 1)[0] + f"/{DB}",
           "MODELYARD_ARTIFACT_STORE": (home / "artifacts").as_uri(), "MODELYARD_HOME": str(home),
           "MODELYARD_PAIRED_MAX_SECONDS": "5"}
    JobStore.from_url(env["MODELYARD_BROKER_URL"]).redis.flushdb()
    cluster = Cluster(env=env, folder=tmp_path_factory.mktemp("gc-workers"))
    name = f"gc-cpu@{socket.gethostname()}"
    cluster.start_worker("cpu", name)
    patch = pytest.MonkeyPatch()
    for key in ("MODELYARD_BROKER_URL", "MODELYARD_ARTIFACT_STORE", "MODELYARD_HOME", "MODELYARD_PAIRED_MAX_SECONDS"):
        patch.setenv(key, env[key])
    get_settings.cache_clear()
    try:
        cluster.wait_online([name])
        yield env
    finally:
        cluster.stop()
        patch.undo()
        get_settings.cache_clear()


def run_job(folder: Path, name: str, seed: int, *, deploy: bool) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    tiny_onnx(folder / f"{name}.onnx", seed=seed, relu=True)
    job = folder / f"{name}.yaml"
    job.write_text(f"model: {{name: {name}, source: ./{name}.onnx, format: onnx}}\n"
                   "optimize: {variants: [int8-dynamic], gate: {cosine_min: 0.5}, objective: size}\n"
                   + ("deploy: {repository: file://./repo, alias: production}\n" if deploy else ""))
    result = api.wait(api.submit(job), timeout=300)
    assert result["state"] == "SUCCEEDED", result.get("error")
    return result


def make_old(jobs: JobStore, job_id: str) -> None:
    """As if the job had finished 40 days ago, before finished records had a TTL."""
    then = repr(time.time() - OLD)
    jobs.redis.hset(PREFIX + job_id, mapping={"created": then, "updated": then, "finished": then})
    jobs.redis.persist(PREFIX + job_id)


def step_objects(store, key: str) -> list[str]:
    manifest = store.read_json(manifest_key(key))
    return [manifest_key(key), *(blob_key(f["digest"], f.get("area", "blobs")) for f in manifest["files"])]


def modelyard_gc(env: dict, *args: str) -> dict:
    run = subprocess.run([sys.executable, "-m", "producer", "gc", "--json", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_gc_keeps_deployed_lineage_and_leased_steps_and_sweeps_old_undeployed_jobs(gc_env, tmp_path):
    deployed = run_job(tmp_path, "alpha", 1, deploy=True)
    old_a, old_b = run_job(tmp_path, "beta", 2, deploy=False), run_job(tmp_path, "gamma", 3, deploy=False)
    jobs = JobStore.from_url(gc_env["MODELYARD_BROKER_URL"])
    store = open_store(gc_env["MODELYARD_ARTIFACT_STORE"])
    for job in (deployed, old_a, old_b):
        make_old(jobs, job["id"])
    gamma_convert = old_b["stages"]["convert"]["step_key"]
    lease = jobs.redis.lock(f"modelyard:lease:{gamma_convert}", timeout=120)  # as a worker computing it holds it
    assert lease.acquire(blocking=False)
    beta_steps = [s["step_key"] for s in old_a["stages"].values() if s.get("step_key")]
    beta_objects = {key for step in beta_steps for key in step_objects(store, step)}
    kept_steps = [gamma_convert, *(s["step_key"] for s in deployed["stages"].values() if s.get("step_key"))]
    shared = {key for step in kept_steps for key in step_objects(store, step)}  # e.g. identical samples
    before = store.list("")

    preview = modelyard_gc(gc_env, "--dry-run", "--grace", "0s")
    assert store.list("") == before
    assert preview["would_delete"]["objects"] > 0 and preview["jobs"]["records_dropped"] == 3

    try:
        report = modelyard_gc(gc_env, "--grace", "0s")
    finally:
        lease.release()

    assert report["deleted"] == preview["would_delete"]
    assert report["deployed_versions"] == 1 and report["leased_steps"] == 1
    # the old undeployed job's steps and source are gone, and so is its record
    assert {manifest_key(step) for step in beta_steps} <= beta_objects - shared
    assert not any(store.exists(key) for key in beta_objects - shared)
    assert all(store.exists(key) for key in beta_objects & shared)
    assert not store.exists(blob_key(old_a["source"]["files"][0]["digest"], "uploads"))
    assert not any(jobs.exists(job["id"]) for job in (deployed, old_a, old_b))  # old records: dropped
    # the step under a live lease stays whole
    assert all(store.exists(key) for key in step_objects(store, gamma_convert))
    # the deployed version's lineage (convert, every variant) and its source upload stay
    repo = ModelRepository.open((tmp_path / "repo").as_uri())
    version = repo.resolve("alpha", "production")
    lineage = repo.manifest("alpha", version)["lineage"]
    assert {"convert", "optimize:fp32", "optimize:int8-dynamic"} <= set(lineage["stages"])
    for stage in lineage["stages"].values():
        if stage.get("step_key"):
            assert all(store.exists(key) for key in step_objects(store, stage["step_key"]))
    assert [store.exists(blob_key(f["digest"], f["area"])) for f in lineage["uploads"]] == [True]
    # and the deployed version still loads and answers
    import onnxruntime

    model = repo.store.get_object(f"alpha/{version}/model.onnx", tmp_path / "served" / "model.onnx")
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((2, 4), np.float32)})[0].shape == (2, 3)

    # resubmitted, the deployed job finds its steps in the cache; the swept one computes again
    again = run_job(tmp_path, "alpha", 1, deploy=True)
    assert again["stages"]["convert"]["state"] == "cached"
    assert again["stages"]["deploy"]["version"] == version
    rerun = run_job(tmp_path, "beta", 2, deploy=False)
    assert rerun["stages"]["convert"]["state"] == "done"
