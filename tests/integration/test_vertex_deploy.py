"""deploy.vertex through the real deploy stage and through the queue, against a fake Vertex AI API.

The worker of these tests is a private one (its own Redis) whose environment points Vertex AI at
the fake (``MODELYARD_VERTEX_API_ENDPOINT``); the repository is gs:// on the GCS emulator.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest

from producer import api
from shared.errors import UserInputError
from shared.jobs import JobStore
from shared.manifest import Manifest, save_manifest
from shared.redis_server import start_redis
from shared.repository import ModelRepository
from shared.settings import Settings
from shared.storage import open_store
from tests.conftest import require
from tests.models.tiny import tiny_onnx
from tests.services import Cluster
from tests.storage_fixtures import unique_bucket
from tests.vertex_fake import FakeVertex
from worker.context import StageContext

pytestmark = pytest.mark.integration
require("google.cloud.aiplatform_v1")

VERTEX = "{project: demo-project, endpoint: tiny-endpoint, machine_type: n1-standard-4, serving: modelyard}"


@pytest.fixture(scope="module")
def vertex_api():
    from pytest_httpserver import HTTPServer

    server = HTTPServer()
    server.start()
    yield FakeVertex().install(server)
    server.stop()


@pytest.fixture(scope="module")
def vertex_worker(service_env, vertex_api, tmp_path_factory) -> Settings:
    """A private Redis and one cpu worker that calls the fake; returns the producer's settings for it."""
    redis = start_redis(tmp_path_factory.mktemp("vertex-redis"))
    home = tmp_path_factory.mktemp("vertex-home")
    env = {**service_env, "MODELYARD_BROKER_URL": redis.url, "MODELYARD_HOME": str(home),
           "MODELYARD_ARTIFACT_STORE": (home / "artifacts").as_uri(), "MODELYARD_VERTEX_API_ENDPOINT": vertex_api.url}
    cluster = Cluster(env=env, folder=tmp_path_factory.mktemp("vertex-workers"))
    name = f"vertex-cpu@{socket.gethostname()}"
    cluster.start_worker("cpu", name)
    try:
        cluster.wait_online([name])
        yield Settings(broker_url=redis.url, home=home, artifact_store=env["MODELYARD_ARTIFACT_STORE"])
    finally:
        cluster.stop()
        redis.stop()


def job_file(tmp_path: Path, repository: str) -> Path:
    tiny_onnx(tmp_path / "m.onnx")
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {{name: tiny, source: ./m.onnx, format: onnx}}\n"
                   f"deploy: {{repository: {repository}, alias: production, vertex: {VERTEX}}}\n")
    return job


def test_a_job_releases_its_version_on_vertex_through_the_queue(vertex_worker, vertex_api, tmp_path):
    repository = f"gs://{unique_bucket()}/models"
    result = api.wait(api.submit(job_file(tmp_path, repository), settings=vertex_worker), timeout=300,
                      settings=vertex_worker)
    assert result["state"] == "SUCCEEDED", result.get("error")
    deploy = result["stages"]["deploy"]
    vertex = deploy["vertex"]
    assert vertex["alias"] == "production" and vertex["traffic"] == {vertex["deployed_model_id"]: 100}
    upload = vertex_api.bodies("models:upload")[-1]["model"]
    assert upload["artifactUri"] == f"{repository}/tiny/{deploy['version']}/"
    assert ModelRepository.open(repository).resolve("tiny", "production") == deploy["version"]


def test_a_failed_vertex_deploy_fails_the_job_with_the_apis_message_and_moves_no_alias(
        vertex_worker, vertex_api, tmp_path):
    repository = f"gs://{unique_bucket()}/models"
    vertex_api.fail("deployModel", 400, "Machine type n1-standard-4 is not supported for this model in us-central1.")
    result = api.wait(api.submit(job_file(tmp_path, repository), settings=vertex_worker), timeout=300,
                      settings=vertex_worker)
    assert result["state"] == "FAILED"
    assert "Machine type n1-standard-4 is not supported for this model in us-central1. (HTTP 400)" in result["error"]
    repo = ModelRepository.open(repository)
    assert repo.versions("tiny") == [1] and "production" not in repo.aliases("tiny")


def test_the_deploy_stage_reports_a_failed_operation_and_leaves_the_alias(redis_server, vertex_api, tmp_path,
                                                                          gcs_emulator):
    from worker.stages.deploy import run_deploy

    repository = f"gs://{unique_bucket()}/models"
    store = open_store((tmp_path / "artifacts").as_uri())
    jobs = JobStore.from_url(redis_server.url)
    spec = {"model": {"name": "tiny", "source": "m.onnx", "format": "onnx"},
            "deploy": {"repository": repository, "alias": "production",
                       "vertex": {"project": "demo-project", "model": "stage-tiny", "serving": "modelyard"}}}
    job_id = f"vertex-{time.time_ns()}"
    jobs.create(job_id, {"spec": spec, "artifact_store": store.uri, "source": {"digest": "s"}, "state": "RUNNING"})
    settings = Settings(vertex_api_endpoint=vertex_api.url, allowed_repositories=["gs://*"])
    ctx = StageContext(settings=settings, jobs=jobs, job_id=job_id)
    step = _converted(store, tmp_path / "model")

    vertex_api.fail("upload", 403, "Permission 'aiplatform.models.upload' denied on resource 'projects/demo-project'.")
    with pytest.raises(UserInputError, match=r"Vertex AI upload: Permission 'aiplatform\.models\.upload' denied .*"
                                             r"\(HTTP 403\); the credentials need roles/aiplatform\.user"):
        run_deploy(ctx, step.step_key, step.step_key, lineage={})
    repo = ModelRepository.open(repository)
    assert "production" not in repo.aliases("tiny")

    result = run_deploy(ctx, step.step_key, step.step_key, lineage={})  # the retry reuses the published version
    assert result["reused"] and result["vertex"]["model_version_id"] == "1"
    assert repo.resolve("tiny", "production") == result["version"] == 1


def _converted(store, folder: Path) -> Manifest:
    """A convert step's manifest (model, samples, reference) as the deploy stage reads it."""
    folder.mkdir()
    tiny_onnx(folder / "model.onnx")
    x = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    np.savez(folder / "samples.npz", x=x)
    np.savez(folder / "reference.npz", y=x @ np.arange(12, dtype=np.float32).reshape(4, 3))
    io = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
          "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}]}
    manifest = Manifest(step_key="e" * 64, stage="convert", input_digest="i", params={}, tools={},
                        files=store.put_dir(folder), info={"model_file": "model.onnx", "format": "onnx", **io})
    save_manifest(store, manifest)
    return manifest
