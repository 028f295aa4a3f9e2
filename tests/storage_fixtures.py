"""Fixtures for artifact-store tests: a GCS emulator per session and a store per backend.

Import the fixtures into a test module (``from tests.storage_fixtures import gcs_emulator, store``).
Without the ``gcp-storage-emulator`` executable the gs:// cases are skipped locally and fail
under ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from shared.storage import ArtifactStore, open_store

EMULATOR = "gcp-storage-emulator"
STORE_PREFIX = "prefix"


def _emulator_executable() -> str | None:
    found = shutil.which(EMULATOR)
    if found:
        return found
    beside_python = Path(sys.executable).with_name(EMULATOR)  # a venv used without activation
    return str(beside_python) if beside_python.is_file() else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_answering(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{EMULATOR} exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    pytest.fail(f"{EMULATOR} did not answer {url} within {timeout_s:.0f} s:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory):
    """An in-memory GCS emulator; yields its base URL with STORAGE_EMULATOR_HOST pointing at it."""
    executable = _emulator_executable()
    if executable is None:
        reason = f"{EMULATOR} is not installed (pip install gcp-storage-emulator); gs:// cases need it"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):  # CI=true: it must be there
            pytest.fail(reason + " and CI=true")
        pytest.skip(reason)

    port = _free_port()
    host = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("gcs-emulator") / "emulator.log"
    with open(log, "wb") as log_handle:
        process = subprocess.Popen(
            [executable, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory"],
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_until_answering(f"{host}/storage/v1/b?project=modelyard", process, log)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("STORAGE_EMULATOR_HOST", host)
            env.setenv("MODELYARD_GCS_CREATE_BUCKET", "1")
            yield host
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def unique_bucket() -> str:
    return f"modelyard-test-{uuid.uuid4().hex[:16]}"


@pytest.fixture(params=["file", "gs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """An empty store on each backend: ``file://<tmp>/store`` and ``gs://<new bucket>/prefix``."""
    if request.param == "file":
        return open_store((tmp_path / "store").as_uri())
    request.getfixturevalue("gcs_emulator")
    return open_store(f"gs://{unique_bucket()}/{STORE_PREFIX}")
