"""Releasing repository versions on Vertex AI, against a local fake of its REST API.

The real ``google-cloud-aiplatform`` clients (REST transport, anonymous credentials for the
fake's http:// endpoint) talk to ``tests.vertex_fake.FakeVertex``; the repository is a gs://
one on the GCS emulator. The tests assert on the bodies the fake received.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from producer.cli import app
from shared.errors import TransientError, UserInputError
from shared.jobspec import JobSpec, parse_job
from shared.repository import ModelRepository
from shared.settings import Settings, get_settings
from tests.conftest import require
from tests.storage_fixtures import gcs_emulator, unique_bucket  # noqa: F401  (fixture)
from tests.vertex_fake import FakeVertex

require("google.cloud.aiplatform_v1")
from shared.vertex_release import deploy_version, follow_alias, read_record  # noqa: E402

IO = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
      "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}]}
VERTEX = "{project: demo-project, region: us-central1, endpoint: tiny-endpoint, machine_type: n1-standard-8, " \
         "accelerator_type: NVIDIA_L4, min_replicas: 1, max_replicas: 3, %s}"
MODELYARD = "serving: modelyard"


@pytest.fixture
def fake(httpserver) -> FakeVertex:
    return FakeVertex().install(httpserver)


@pytest.fixture
def repo(gcs_emulator) -> ModelRepository:
    return ModelRepository.open(f"gs://{unique_bucket()}/models")


def settings(fake: FakeVertex, **extra) -> Settings:
    return Settings(vertex_api_endpoint=fake.url, **extra)


def spec(repo: ModelRepository, extra: str = MODELYARD):
    return parse_job(f"model: {{name: tiny, source: m.onnx, format: onnx}}\n"
                     f"deploy: {{repository: {repo.uri}, vertex: {VERTEX % extra}}}\n")


def publish(repo: ModelRepository, tmp_path: Path, model: str = "tiny") -> int:
    version = repo.claim_version(model, {"test": True})
    (tmp_path / "model.onnx").write_bytes(b"not served here")
    repo.publish(model, version, {"model.onnx": tmp_path / "model.onnx"},
                 {"model": model, "version": version, "model_file": "model.onnx", "format": "onnx", **IO})
    return version


def release(repo, tmp_path, fake, extra: str = MODELYARD, **options) -> tuple[int, dict]:
    version = publish(repo, tmp_path)
    result = deploy_version(repo, "tiny", version, spec(repo, extra), settings=settings(fake, **options), job_id="j")
    repo.set_alias("tiny", "production", version)  # what the deploy stage does next
    return version, result


def test_a_first_release_uploads_a_new_registry_model_and_deploys_it_to_a_new_endpoint(repo, tmp_path, fake):
    version, result = release(repo, tmp_path, fake)

    [upload] = fake.bodies("models:upload")
    model = upload["model"]
    assert upload["modelId"] == "tiny" and "parentModel" not in upload
    assert model["artifactUri"] == f"{repo.uri}/tiny/{version}/"
    assert model["containerSpec"] == {"imageUri": "us-central1-docker.pkg.dev/demo-project/modelyard/modelyard:0.1.0",
                                      "command": ["modelyard", "serve", "--vertex"]}
    assert model["versionAliases"] == ["production"]
    assert model["labels"]["modelyard-version"] == str(version)
    assert fake.bodies("/endpoints") == [{"displayName": "tiny-endpoint"}]

    [deploy] = fake.bodies(":deployModel")
    resources = deploy["deployedModel"]["dedicatedResources"]
    assert deploy["deployedModel"]["model"] == f"{fake.parent}/models/tiny@1"
    assert resources["machineSpec"]["machineType"] == "n1-standard-8"
    assert _accelerator(resources["machineSpec"]["acceleratorType"]) == "NVIDIA_L4"
    assert resources["machineSpec"]["acceleratorCount"] == 1
    assert (resources["minReplicaCount"], resources["maxReplicaCount"]) == (1, 3)
    assert deploy["trafficSplit"] == {"0": 100}

    assert result["traffic"] == {result["deployed_model_id"]: 100}
    assert read_record(repo, "tiny", version)["deployed_model_id"] == result["deployed_model_id"]


def test_a_second_version_is_a_new_version_of_the_same_model_and_takes_the_alias(repo, tmp_path, fake):
    _, first = release(repo, tmp_path, fake)
    _, second = release(repo, tmp_path, fake)

    upload = fake.bodies("models:upload")[-1]
    assert upload["parentModel"] == f"{fake.parent}/models/tiny" and "modelId" not in upload
    assert upload["model"]["versionAliases"] == ["production"]
    aliases = {v["versionId"]: v["versionAliases"] for v in fake.models["tiny"]}
    assert aliases == {"1": ["default"], "2": ["production"]}
    assert second["traffic"] == {second["deployed_model_id"]: 100}
    assert second["undeployed"] == []  # the first is what production held before: kept for a rollback

    _, third = release(repo, tmp_path, fake)
    assert third["undeployed"] == [first["deployed_model_id"]]  # idle, and not the one before


def test_a_canary_takes_its_share_and_the_others_keep_the_rest(repo, tmp_path, fake):
    _, first = release(repo, tmp_path, fake)
    _, canary = release(repo, tmp_path, fake, extra=MODELYARD + ", traffic_percentage: 10")
    assert fake.bodies(":deployModel")[-1]["trafficSplit"] == {"0": 10, first["deployed_model_id"]: 90}
    assert canary["traffic"] == {canary["deployed_model_id"]: 10, first["deployed_model_id"]: 90}


def test_a_retried_release_uploads_and_deploys_nothing_twice(repo, tmp_path, fake):
    version, first = release(repo, tmp_path, fake)
    again = deploy_version(repo, "tiny", version, spec(repo), settings=settings(fake), job_id="j")
    assert len(fake.bodies("models:upload")) == 1 and len(fake.bodies(":deployModel")) == 1
    assert again["deployed_model_id"] == first["deployed_model_id"]


def test_a_deploy_still_running_at_the_timeout_is_waited_for_by_the_retry(repo, tmp_path, fake):
    version = publish(repo, tmp_path)
    fake.stall("deployModel", 3)
    with pytest.raises(TransientError, match="still running after 0.2 s.*a retry waits for the same operation"):
        deploy_version(repo, "tiny", version, spec(repo), settings=settings(fake, vertex_operation_timeout_s=0.2),
                       job_id="j")
    result = deploy_version(repo, "tiny", version, spec(repo), settings=settings(fake), job_id="j")
    assert len(fake.bodies(":deployModel")) == 1
    assert result["traffic"] == {result["deployed_model_id"]: 100}


def test_a_failed_operation_is_the_users_error_with_the_apis_message_and_a_fixed_retry_starts_anew(
        repo, tmp_path, fake):
    version = publish(repo, tmp_path)
    fake.fail("upload", 400, "Container image us-central1-docker.pkg.dev/x is not in Artifact Registry.")
    with pytest.raises(UserInputError, match=r"Vertex AI upload: Container image .* is not in Artifact Registry\. "
                                             r"\(HTTP 400\)"):
        deploy_version(repo, "tiny", version, spec(repo), settings=settings(fake), job_id="j")
    deploy_version(repo, "tiny", version, spec(repo), settings=settings(fake), job_id="j")
    assert len(fake.bodies("models:upload")) == 2  # the failed operation is not waited for again


def test_an_unavailable_api_is_transient(repo, tmp_path, fake):
    version = publish(repo, tmp_path)
    fake.fail("deployModel", 503, "The service is currently unavailable.")
    with pytest.raises(TransientError, match=r"The service is currently unavailable\. \(HTTP 503\)"):
        deploy_version(repo, "tiny", version, spec(repo), settings=settings(fake), job_id="j")


def test_an_unknown_accelerator_is_refused_before_any_call(repo, tmp_path, fake):
    version = publish(repo, tmp_path)
    job = spec(repo).model_dump()
    job["deploy"]["vertex"]["accelerator_type"] = "NVIDIA_X"
    with pytest.raises(UserInputError, match="'NVIDIA_X' is not a Vertex AI accelerator type.*NVIDIA_L4"):
        deploy_version(repo, "tiny", version, JobSpec.model_validate(job), settings=settings(fake), job_id="j")
    assert fake.requests == []


def test_triton_reads_the_repository_root_and_is_pinned_to_the_version(repo, tmp_path, fake):
    version = publish(repo, tmp_path)
    deploy_version(repo, "tiny", version, spec(repo, "serving: triton"), settings=settings(fake), job_id="j")
    model = fake.bodies("models:upload")[0]["model"]
    assert model["artifactUri"] == f"{repo.uri}/"
    assert model["containerSpec"]["command"] == ["tritonserver"]
    assert model["containerSpec"]["args"] == [
        "--model-repository=$(AIP_STORAGE_URI)", "--model-control-mode=explicit", "--load-model=tiny",
        "--vertex-ai-default-model=tiny", f"--model-config-name=version-{version}"]
    pinned = repo.store._read_bytes(f"tiny/configs/version-{version}.pbtxt")[0]
    assert pinned == repo.store._read_bytes(f"tiny/{version}/config.pbtxt")[0]
    assert f"versions: [ {version} ]" in pinned.decode()


def test_promote_and_rollback_move_the_vertex_alias_and_the_traffic(repo, tmp_path, fake):
    v1, first = release(repo, tmp_path, fake)
    v2, second = release(repo, tmp_path, fake)
    fake.requests.clear()

    current, previous = repo.rollback("tiny", "production")
    moved = follow_alias(repo, "tiny", "production", previous, settings=settings(fake), previous=current)
    assert moved["traffic"] == {first["deployed_model_id"]: 100}
    assert fake.calls(skip_reads=True) == [
        'POST models/tiny@1:mergeVersionAliases {"versionAliases": ["production"]}',
        f'PATCH endpoints/{_id(first["endpoint"])}?updateMask=trafficSplit '
        f'{{"trafficSplit": {{"{first["deployed_model_id"]}": 100}}}}',
    ]
    assert {v["versionId"]: v["versionAliases"] for v in fake.models["tiny"]} == \
        {"1": ["default", "production"], "2": []}

    repo.set_alias("tiny", "production", v2, reason="promote")
    follow_alias(repo, "tiny", "production", v2, settings=settings(fake), previous=v1)
    assert fake.calls(skip_reads=True)[-2:] == [
        'POST models/tiny@2:mergeVersionAliases {"versionAliases": ["production"]}',
        f'PATCH endpoints/{_id(second["endpoint"])}?updateMask=trafficSplit '
        f'{{"trafficSplit": {{"{second["deployed_model_id"]}": 100}}}}',
    ]


def test_rolling_back_to_an_undeployed_version_deploys_it_again(repo, tmp_path, fake):
    v1, _ = release(repo, tmp_path, fake)
    release(repo, tmp_path, fake)
    _, third = release(repo, tmp_path, fake)  # undeploys version 1: idle, not the one before
    moved = follow_alias(repo, "tiny", "production", v1, settings=settings(fake), previous=3)
    assert fake.bodies(":deployModel")[-1]["trafficSplit"] == {"0": 100}
    assert fake.bodies(":deployModel")[-1]["deployedModel"]["model"] == f"{fake.parent}/models/tiny@1"
    assert moved["traffic"] == {read_record(repo, "tiny", v1)["deployed_model_id"]: 100}
    assert moved["deployed_model_id"] != third["deployed_model_id"]


def test_promoting_a_version_never_released_on_vertex_warns_that_the_endpoint_did_not_move(repo, tmp_path, fake):
    v1, first = release(repo, tmp_path, fake)
    v2 = publish(repo, tmp_path)
    moved = follow_alias(repo, "tiny", "production", v2, settings=settings(fake), previous=v1)
    assert moved == {"warning": f"version {v2} was never deployed to Vertex AI: endpoint {first['endpoint']} still "
                                f"serves version {v1} (deploy it with a job that has deploy.vertex)"}
    assert follow_alias(repo, "tiny", "staging", v2, settings=settings(fake)) is None


def test_the_cli_moves_vertex_with_the_alias_and_prints_the_requests_of_deploy_promote_rollback(
        repo, tmp_path, fake, monkeypatch):
    """The closing note's sequence: two deploys, a rollback, a promote, as the fake received them."""
    monkeypatch.setenv("MODELYARD_VERTEX_API_ENDPOINT", fake.url)
    get_settings.cache_clear()
    try:
        _, first = release(repo, tmp_path, fake)
        v2, second = release(repo, tmp_path, fake)
        deploys = len(fake.requests)
        runner = CliRunner()
        rolled = runner.invoke(app, ["rollback", "tiny", "--repository", repo.uri])
        rolled_back = len(fake.requests)
        assert rolled.exit_code == 0, rolled.output
        assert "rolled back to version 1" in rolled.output and "Vertex AI production → " in rolled.output
        promoted = runner.invoke(app, ["promote", "tiny", str(v2), "--repository", repo.uri])
        assert promoted.exit_code == 0, promoted.output
        assert f"models/tiny@2, endpoint {second['endpoint']}: 100% of traffic" in promoted.output
    finally:
        get_settings.cache_clear()
    lines = fake.calls()
    print("\n-- two deploy jobs (v1, then v2) --", *lines[:deploys], "-- modelyard rollback tiny --",
          *lines[deploys:rolled_back], f"-- modelyard promote tiny {v2} --", *lines[rolled_back:], sep="\n")
    assert fake.calls(skip_reads=True)[-4:] == [
        'POST models/tiny@1:mergeVersionAliases {"versionAliases": ["production"]}',
        f'PATCH endpoints/{_id(second["endpoint"])}?updateMask=trafficSplit '
        f'{{"trafficSplit": {{"{first["deployed_model_id"]}": 100}}}}',
        'POST models/tiny@2:mergeVersionAliases {"versionAliases": ["production"]}',
        f'PATCH endpoints/{_id(second["endpoint"])}?updateMask=trafficSplit '
        f'{{"trafficSplit": {{"{second["deployed_model_id"]}": 100}}}}',
    ]


def test_a_vertex_failure_after_the_repository_moved_says_so_and_how_to_retry(repo, tmp_path, fake, monkeypatch):
    monkeypatch.setenv("MODELYARD_VERTEX_API_ENDPOINT", fake.url)
    get_settings.cache_clear()
    try:
        release(repo, tmp_path, fake)
        release(repo, tmp_path, fake)
        fake.fail("mergeVersionAliases", 403, "Permission 'aiplatform.models.update' denied on resource.")
        result = CliRunner().invoke(app, ["rollback", "tiny", "--repository", repo.uri])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "production moved in the repository, not on Vertex AI" in message
    assert "Permission 'aiplatform.models.update' denied on resource. (HTTP 403)" in message
    assert "roles/aiplatform.user" in message
    assert "Run 'modelyard promote tiny 1 --alias production' to try Vertex AI again." in message


def _accelerator(value) -> str:
    from google.cloud import aiplatform_v1

    return aiplatform_v1.AcceleratorType(value).name if isinstance(value, int) else value


def _id(resource: str) -> str:
    return resource.rsplit("/", 1)[-1]
