"""Contract test: ``modelyard serve`` in Vertex mode, as Vertex AI starts the container.

The server runs in its own process with only the ``AIP_*`` variables Vertex AI sets (no model
name, no flags), AIP_STORAGE_URI a version folder on the GCS emulator, and is spoken to over
HTTP as Vertex AI's frontend would: health, ``{"instances"}``, and a body over the 1.5 MB limit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from shared.redis_server import free_port
from shared.repository import ModelRepository
from tests.models.tiny import tiny_onnx
from tests.services import ROOT
from tests.storage_fixtures import gcs_emulator, unique_bucket  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

W = np.arange(12, dtype=np.float32).reshape(4, 3)
HEALTH = "/v1/endpoints/123/deployedModels/456"
PREDICT = "/v1/endpoints/123/deployedModels/456:predict"


def request(url: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def vertex_server(gcs_emulator, tmp_path):
    repo = ModelRepository.open(f"gs://{unique_bucket()}/models")
    version = repo.claim_version("tiny", {"test": True})
    io = {"inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
          "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}]}
    repo.publish("tiny", version, {"model.onnx": tiny_onnx(tmp_path / "m.onnx")},
                 {"model": "tiny", "version": version, "model_file": "model.onnx", "format": "onnx", **io})
    port = free_port()
    env = {**os.environ, "AIP_MODE": "PREDICTION", "AIP_HTTP_PORT": str(port), "AIP_HEALTH_ROUTE": HEALTH,
           "AIP_PREDICT_ROUTE": PREDICT, "AIP_STORAGE_URI": f"{repo.uri}/tiny/{version}"}
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "producer", "serve"], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.2:{port}"  # another loopback address: answered only when listening on 0.0.0.0
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"serve exited with {process.returncode}:\n{log.read_text(errors='replace')}")
            try:
                if request(base + HEALTH)[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"serve did not get healthy:\n{log.read_text(errors='replace')}")
            time.sleep(0.2)
        yield base, log
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_in_vertex_mode_answers_instances_on_the_vertex_routes(vertex_server):
    base, log = vertex_server
    rows = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 1.0]]
    status, answer = request(base + PREDICT, json.dumps({"instances": rows, "parameters": {}}).encode())
    assert status == 200, answer
    assert np.allclose(answer["predictions"], np.array(rows, dtype=np.float32) @ W)
    assert f"health {HEALTH}, predict {PREDICT}" in " ".join(log.read_text().split())


def test_serve_in_vertex_mode_refuses_a_body_over_the_limit_with_413(vertex_server):
    base, _ = vertex_server
    body = json.dumps({"instances": [[0.0, 0.0, 0.0, 0.0]] * 80_000}).encode()
    status, answer = request(base + PREDICT, body)
    assert status == 413
    assert "over Vertex AI's online prediction limit of 1500000 bytes" in answer["error"]
    assert request(base + PREDICT, json.dumps({"instances": [[1.0, 0.0, 0.0, 0.0]]}).encode())[0] == 200
