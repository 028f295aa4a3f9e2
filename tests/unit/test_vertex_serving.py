"""Vertex mode of the model server: the AIP_* contract, instances in and predictions out, the 1.5 MB limit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving.errors import RequestError
from serving.vertex import (
    VERTEX_MAX_REQUEST_BYTES,
    VertexEnvironment,
    create_vertex_app,
    instances_to_feeds,
    locate_model,
    predictions,
    vertex_requested,
)
from shared.arrays import TensorInfo
from shared.errors import UserInputError
from shared.repository import ModelRepository
from tests.models.tiny import tiny_onnx

W = np.arange(12, dtype=np.float32).reshape(4, 3)
X = TensorInfo("x", "float32", ["batch", 4])
MASK = TensorInfo("mask", "int64", ["batch", 4])
Y = TensorInfo("y", "float32", ["batch", 3])
ENV = {"AIP_HTTP_PORT": "8080", "AIP_HEALTH_ROUTE": "/v1/endpoints/1/deployedModels/2",
       "AIP_PREDICT_ROUTE": "/v1/endpoints/1/deployedModels/2:predict", "AIP_MODE": "PREDICTION"}


def publish(repo: ModelRepository, tmp_path: Path, name: str = "tiny") -> int:
    version = repo.claim_version(name, {"test": True})
    manifest = {"model": name, "version": version, "model_file": "model.onnx", "format": "onnx",
                "inputs": [X.to_dict()], "outputs": [Y.to_dict()]}
    repo.publish(name, version, {"model.onnx": tiny_onnx(tmp_path / f"{name}.onnx", W)}, manifest)
    return version


@pytest.fixture
def repo(tmp_path) -> ModelRepository:
    return ModelRepository.open((tmp_path / "repo").as_uri())


@pytest.fixture
def client(repo, tmp_path):
    version = publish(repo, tmp_path)
    environment = VertexEnvironment.from_env({**ENV, "AIP_STORAGE_URI": f"{repo.uri}/tiny/{version}"})
    with TestClient(create_vertex_app(environment, cache_dir=tmp_path / "cache")) as client:
        yield client


def test_the_environment_names_port_routes_and_storage():
    environment = VertexEnvironment.from_env({**ENV, "AIP_STORAGE_URI": "gs://b/m/tiny/1"})
    assert environment == VertexEnvironment(8080, ENV["AIP_HEALTH_ROUTE"], ENV["AIP_PREDICT_ROUTE"], "gs://b/m/tiny/1")
    assert VertexEnvironment.from_env({}) == VertexEnvironment(8080, "/health", "/predict", None)
    assert vertex_requested(ENV) and not vertex_requested({})
    with pytest.raises(UserInputError, match="AIP_HTTP_PORT 'http' is not a port number"):
        VertexEnvironment.from_env({"AIP_HTTP_PORT": "http"})


def test_instances_of_a_one_input_model_are_its_rows_and_objects_name_the_inputs():
    rows = [[1, 2, 3, 4], [0, 0, 0, 1]]
    assert instances_to_feeds(rows, [X])["x"].tolist() == rows
    feeds = instances_to_feeds([{"x": r, "mask": [1, 1, 1, 1]} for r in rows], [X, MASK])
    assert feeds["x"].shape == (2, 4) and feeds["mask"].tolist() == [[1, 1, 1, 1]] * 2


@pytest.mark.parametrize("instances, inputs, message", [
    ([{"x": [1, 2, 3, 4]}], [X, MASK], r"instances\[0\] must have the model's inputs \['x', 'mask'\]; missing"),
    ([[1, 2, 3, 4]], [X, MASK], r"instances\[0\] must be an object \{input name: value\}"),
    ([[1, 2, 3, 4], [1, 2]], [X], "input 'x': the instances"),
    ([[1, 2], [3, 4]], [TensorInfo("x", "float32", [2])], "no batch axis: send one instance, not 2"),
])
def test_instances_that_do_not_fit_the_model_are_refused(instances, inputs, message):
    with pytest.raises(RequestError, match=message):
        instances_to_feeds(instances, inputs)


def test_predictions_are_the_rows_of_one_output_or_objects_of_several():
    y = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    assert predictions({"y": y}, [Y], 2) == [[1.0, 2.0], [3.0, 4.0]]
    both = predictions({"y": y, "z": np.array([[7], [8]])}, [Y, TensorInfo("z", "int64", ["batch", 1])], 2)
    assert both == [{"y": [1.0, 2.0], "z": [7]}, {"y": [3.0, 4.0], "z": [8]}]


def test_a_version_folder_is_served_on_the_vertex_routes(client):
    assert client.get(ENV["AIP_HEALTH_ROUTE"]).json() == {"ready": True}
    rows = [[1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.0]]
    response = client.post(ENV["AIP_PREDICT_ROUTE"], json={"instances": rows, "parameters": {}})
    assert response.status_code == 200, response.text
    assert np.allclose(response.json()["predictions"], np.array(rows, dtype=np.float32) @ W)
    assert client.get("/v2/models/tiny").json()["version"] == "1"  # the KServe v2 routes are there too


def test_a_body_over_vertex_limit_is_413_with_the_limit_named(client):
    body = json.dumps({"instances": [[0.0, 0.0, 0.0, 0.0]] * 80_000}).encode()
    assert len(body) > VERTEX_MAX_REQUEST_BYTES
    response = client.post(ENV["AIP_PREDICT_ROUTE"], content=body, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "over Vertex AI's online prediction limit of 1500000 bytes" in response.json()["error"]


@pytest.mark.parametrize("body, message", [
    (b"instances", "not valid JSON"),
    (b'{"inputs": []}', 'must be a JSON object {"instances": [...]}'),
    (b'{"instances": [[1, 2, 3, 4]], "parameters": [1]}', "'parameters' must be a JSON object"),
])
def test_a_malformed_request_is_400(client, body, message):
    response = client.post(ENV["AIP_PREDICT_ROUTE"], content=body)
    assert response.status_code == 400 and message in response.json()["error"]


def test_a_repository_is_served_when_it_holds_one_model_or_the_model_is_named(repo, tmp_path):
    publish(repo, tmp_path)
    assert locate_model(repo.uri, tmp_path / "s") == (repo.uri, "tiny", "production")
    publish(repo, tmp_path, "other")
    with pytest.raises(UserInputError, match="holds 2 models \\(other, tiny\\): name the one to serve"):
        locate_model(repo.uri, tmp_path / "s")
    assert locate_model(repo.uri, tmp_path / "s", model="other", ref="3")[1:] == ("other", "3")
