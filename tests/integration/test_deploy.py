"""Deploy through the queue: gs:// repositories, racing deploys, and the smoke gate."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from producer import api
from shared.errors import UserInputError
from shared.jobs import JobStore
from shared.manifest import Manifest, save_manifest
from shared.repository import ModelRepository
from shared.settings import Settings
from shared.storage import open_store
from tests.models.tiny import tiny_onnx
from tests.storage_fixtures import unique_bucket
from worker.context import StageContext

pytestmark = pytest.mark.integration


def test_two_racing_deploys_of_one_model_get_distinct_versions_both_recorded(cluster, producer_env, tmp_path):
    jobs = []
    for index, pool in enumerate(("cpu", "gpu")):  # one deploy on each worker, at the same time
        tiny_onnx(tmp_path / f"m{index}.onnx", scale=1.0 + index)
        job = tmp_path / f"job{index}.yaml"
        job.write_text(f"model: {{name: racer, source: ./m{index}.onnx, format: onnx}}\n"
                       f"deploy: {{repository: file://./repo, alias: production}}\n"
                       f"pools: {{convert: {pool}, deploy: {pool}}}\n")
        jobs.append(job)
    ids = [api.submit(job) for job in jobs]
    results = [api.wait(job_id, timeout=300) for job_id in ids]
    assert [r["state"] for r in results] == ["SUCCEEDED", "SUCCEEDED"], [r.get("error") for r in results]
    versions = sorted(r["stages"]["deploy"]["version"] for r in results)
    assert versions == [1, 2]
    repo = ModelRepository.open((tmp_path / "repo").as_uri())
    assert repo.versions("racer") == [1, 2]
    assert {repo.manifest("racer", v)["job_id"] for v in versions} == set(ids)
    assert repo.resolve("racer", "production") in versions


def test_a_job_deploys_to_a_gs_repository(cluster, producer_env, tmp_path):
    tiny_onnx(tmp_path / "m.onnx")
    bucket = unique_bucket()
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {{name: tiny, source: ./m.onnx, format: onnx}}\n"
                   f"deploy: {{repository: gs://{bucket}/models, alias: production}}\n")
    result = api.wait(api.submit(job), timeout=300)
    assert result["state"] == "SUCCEEDED", result.get("error")
    repo = ModelRepository.open(f"gs://{bucket}/models")
    version = repo.resolve("tiny", "production")
    assert repo.store.exists(f"tiny/{version}/model.onnx")
    assert repo.store.exists("tiny/config.pbtxt")
    assert result["stages"]["deploy"]["uri"] == f"gs://{bucket}/models/tiny/{version}/"


def test_a_model_failing_the_smoke_gate_is_not_deployed_and_the_alias_stays(redis_server, tmp_path):
    from worker.stages.deploy import run_deploy

    store = open_store((tmp_path / "artifacts").as_uri())
    repo_uri = (tmp_path / "repo").as_uri()
    jobs = JobStore.from_url(redis_server.url)
    spec = {"model": {"name": "tiny", "source": "m.onnx", "format": "onnx"},
            "deploy": {"repository": repo_uri, "alias": "production"}}
    job_id = f"smoke-{time.time_ns()}"
    jobs.create(job_id, {"spec": spec, "artifact_store": store.uri, "source": {"digest": "s"}})
    ctx = StageContext(settings=Settings(), jobs=jobs, job_id=job_id)

    good = _manifest(store, tmp_path / "good", scale=1.0, reference_scale=1.0, key="a" * 64)
    bad = _manifest(store, tmp_path / "bad", scale=-1.0, reference_scale=1.0, key="b" * 64)
    first = run_deploy(ctx, good.step_key, good.step_key, lineage={})
    assert first["version"] == 1

    with pytest.raises(UserInputError, match="smoke gate failed.*production"):
        run_deploy(ctx, bad.step_key, bad.step_key, lineage={})
    repo = ModelRepository.open(repo_uri)
    assert repo.resolve("tiny", "production") == 1
    assert repo.versions("tiny") == [1]


def _manifest(store, folder: Path, *, scale: float, reference_scale: float, key: str) -> Manifest:
    folder.mkdir()
    tiny_onnx(folder / "model.onnx", scale=scale)
    samples = {"x": np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)}
    weights = np.arange(12, dtype=np.float32).reshape(4, 3) * reference_scale
    np.savez(folder / "samples.npz", **samples)
    np.savez(folder / "reference.npz", y=samples["x"] @ weights)
    io = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
          "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}]}
    manifest = Manifest(step_key=key, stage="convert", input_digest="i", params={}, tools={},
                        files=store.put_dir(folder), info={"model_file": "model.onnx", "format": "onnx", **io})
    save_manifest(store, manifest)
    return manifest


def _deploy_context(redis_server, tmp_path, repo_uri: str, settings: Settings) -> StageContext:
    store = open_store((tmp_path / "artifacts").as_uri())
    jobs = JobStore.from_url(redis_server.url)
    spec = {"model": {"name": "tiny", "source": "m.onnx", "format": "onnx"},
            "deploy": {"repository": repo_uri, "alias": "production"}}
    job_id = f"deploy-{time.time_ns()}"
    jobs.create(job_id, {"spec": spec, "artifact_store": store.uri, "source": {"digest": "s"}, "state": "RUNNING"})
    return StageContext(settings=settings, jobs=jobs, job_id=job_id)


def test_a_repository_outside_the_allowed_patterns_is_refused_by_the_worker(redis_server, tmp_path):
    from worker.stages.deploy import run_deploy

    other_team = (tmp_path / "other-team-repo").as_uri()
    ctx = _deploy_context(redis_server, tmp_path, other_team,
                          Settings(allowed_repositories=[(tmp_path / "our-repo").as_uri() + "/*", "gs://ours/*"]))
    good = _manifest(ctx.store, tmp_path / "good", scale=1.0, reference_scale=1.0, key="c" * 64)
    with pytest.raises(UserInputError, match="is not allowed on this worker: MODELYARD_ALLOWED_REPOSITORIES"):
        run_deploy(ctx, good.step_key, good.step_key, lineage={})
    assert not (tmp_path / "other-team-repo").exists()


@pytest.mark.parametrize("moment", ["after the smoke gate", "after claiming a version", "after publishing"])
def test_a_job_cancelled_during_deploy_moves_no_alias(redis_server, tmp_path, monkeypatch, moment):
    from worker.context import JobCancelled
    from worker.stages import deploy

    repo_uri = (tmp_path / "repo").as_uri()
    ctx = _deploy_context(redis_server, tmp_path, repo_uri, Settings())
    good = _manifest(ctx.store, tmp_path / "good", scale=1.0, reference_scale=1.0, key="d" * 64)

    def cancel_after(owner, name: str) -> None:
        real = getattr(owner, name)

        def wrapped(*args, **kwargs):
            result = real(*args, **kwargs)
            ctx.jobs.set_state(ctx.job_id, "CANCELLED")
            return result

        monkeypatch.setattr(owner, name, wrapped)

    owner, name = {"after the smoke gate": (deploy, "smoke_gate"),
                   "after claiming a version": (ModelRepository, "claim_version"),
                   "after publishing": (ModelRepository, "publish")}[moment]
    cancel_after(owner, name)
    with pytest.raises(JobCancelled):
        deploy.run_deploy(ctx, good.step_key, good.step_key, lineage={})
    repo = ModelRepository.open(repo_uri)
    assert "production" not in repo.aliases("tiny")
    if moment != "after publishing":
        assert repo.versions("tiny") == []
