"""modelyard serve in production: /metrics, the bearer token, the batch cap, the device and its fallback."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from serving import create_app
from serving.auth import TOKEN_ENV, load_token
from serving.devices import CPU, CUDA, TENSORRT, Device, tensorrt_options
from shared.errors import UserInputError
from shared.repository import ModelRepository
from tests.unit.test_serving import MASK, W1, W2, X, expected, output_of, publish_model, request_body, tiny_model

TOKEN = "s3cret-token"


@pytest.fixture
def repo(tmp_path) -> ModelRepository:
    """Versions 1 (W1) and 2 (W2) of model 'm'; production → 1."""
    repository = ModelRepository.open((tmp_path / "repo").as_uri())
    publish_model(repository, tmp_path, tiny_model(W1))
    publish_model(repository, tmp_path, tiny_model(W2))
    repository.set_alias("m", "production", 1)
    return repository


def serve(repo: ModelRepository, tmp_path, **options) -> TestClient:
    return TestClient(create_app(repo.uri, "m", "production", poll_interval=60, cache_dir=tmp_path / "cache",
                                 threads=1, **options))


def samples(client: TestClient, headers: dict | None = None) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics as {(name, labels): value}."""
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


# -- /metrics --------------------------------------------------------------------------------

def test_metrics_count_requests_latency_batches_errors_and_the_loaded_version(repo, tmp_path):
    with serve(repo, tmp_path) as client:
        for _ in range(25):
            np.testing.assert_allclose(output_of(client.post("/v2/models/m/infer", json=request_body())),
                                       expected(W1), rtol=1e-6)
        assert client.post("/v2/models/m/infer", json={"inputs": []}).status_code == 400
        assert client.post("/v2/models/m/infer", json={"inputs": []}).status_code == 400
        assert client.post("/v2/models/nope/infer", json=request_body()).status_code == 404
        assert client.get("/no/such/path").status_code == 404
        found = samples(client)
        infer = "/v2/models/{name}/infer"
        assert value(found, "modelyard_serve_requests_total", route=infer, method="POST", code="200") == 25
        assert value(found, "modelyard_serve_requests_total", route=infer, method="POST", code="400") == 2
        assert value(found, "modelyard_serve_requests_total", route=infer, method="POST", code="404") == 1
        assert value(found, "modelyard_serve_requests_total", route="unmatched", method="GET", code="404") == 1
        assert value(found, "modelyard_serve_errors_total", route=infer, kind="client") == 3
        assert value(found, "modelyard_serve_request_duration_seconds_count", route=infer) == 28
        assert value(found, "modelyard_serve_request_duration_seconds_sum", route=infer) > 0
        assert value(found, "modelyard_serve_batch_size_count") == 25
        assert value(found, "modelyard_serve_batch_size_sum") == 25 * len(X)
        assert value(found, "modelyard_serve_loaded_version", model="m", ref="production") == 1
        assert value(found, "modelyard_serve_device_info", requested="cpu", provider=CPU) == 1

        repo.set_alias("m", "production", 2)
        assert client.app.state.server.poll_once()
        found = samples(client)
        assert value(found, "modelyard_serve_loaded_version", model="m", ref="production") == 2
        assert value(found, "modelyard_serve_version_swaps", model="m", ref="production") == 1


def test_two_apps_in_one_process_keep_their_own_metrics(repo, tmp_path):
    with serve(repo, tmp_path) as first, serve(repo, tmp_path / "other") as second:
        first.post("/v2/models/m/infer", json=request_body())
        infer = "/v2/models/{name}/infer"
        assert value(samples(first), "modelyard_serve_requests_total", route=infer, method="POST", code="200") == 1
        assert value(samples(second), "modelyard_serve_requests_total", route=infer, method="POST", code="200") == 0


# -- the bearer token ------------------------------------------------------------------------

def test_a_token_guards_every_route_but_the_health_probes(repo, tmp_path):
    good = {"Authorization": f"Bearer {TOKEN}"}
    with serve(repo, tmp_path, token=TOKEN) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        for method, path in (("GET", "/v2"), ("GET", "/v2/models/m"), ("GET", "/v2/models/m/ready"),
                             ("POST", "/v2/models/m/infer"), ("GET", "/metrics")):
            response = client.request(method, path, json=request_body() if method == "POST" else None)
            assert response.status_code == 401, path
            assert "bearer token" in response.json()["error"]
            assert response.headers["www-authenticate"].startswith("Bearer")
        wrong = client.post("/v2/models/m/infer", json=request_body(), headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"] == "the bearer token is not valid"
        np.testing.assert_allclose(output_of(client.post("/v2/models/m/infer", json=request_body(), headers=good)),
                                   expected(W1), rtol=1e-6)
        assert value(samples(client, good), "modelyard_serve_requests_total", route="/v2/models/{name}/infer",
                     method="POST", code="401") == 2


def test_the_token_comes_from_a_file_or_the_environment(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    assert load_token(token_file, environ={}) == TOKEN
    assert load_token(None, environ={TOKEN_ENV: TOKEN}) == TOKEN
    assert load_token(None, environ={TOKEN_ENV: " "}) is None and load_token(None, environ={}) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UserInputError, match="is empty"):
        load_token(tmp_path / "empty")
    with pytest.raises(UserInputError, match="cannot read it"):
        load_token(tmp_path / "missing")


# -- the batch cap ---------------------------------------------------------------------------

def test_a_batch_over_the_cap_is_refused_before_any_inference(repo, tmp_path):
    with serve(repo, tmp_path, max_batch_size=1) as client:
        response = client.post("/v2/models/m/infer", json=request_body())
        assert response.status_code == 400
        assert response.json()["error"] == ("input 'x' has a batch of 2 rows, over this model's max_batch_size 1: "
                                            "send at most 1 rows per request")
        # declared shapes are checked before any data is decoded: a huge batch costs nothing
        huge = {"inputs": [{"name": "x", "shape": [10**9, 4], "datatype": "FP32", "parameters":
                            {"binary_data_size": 16}}]}
        assert "max_batch_size 1" in client.post("/v2/models/m/infer", json=huge).json()["error"]
        assert value(samples(client), "modelyard_serve_batch_size_count") == 0
        one = request_body(x=X[:1], mask=MASK[:1])
        np.testing.assert_allclose(output_of(client.post("/v2/models/m/infer", json=one)),
                                   expected(W1, X[:1], MASK[:1]), rtol=1e-6)
        assert client.get("/v2/models/m").json()["max_batch_size"] == 1


def test_the_cap_defaults_to_the_versions_triton_config(repo, tmp_path):
    rows = 65  # the deployed config's max_batch_size is 64
    with serve(repo, tmp_path) as client:
        assert client.get("/v2/models/m").json()["max_batch_size"] == 64
        big = request_body(x=np.ones((rows, 4), np.float32), mask=np.ones((rows, 4), np.int64))
        response = client.post("/v2/models/m/infer", json=big)
        assert response.status_code == 400 and "max_batch_size 64" in response.json()["error"]


# -- the device --------------------------------------------------------------------------------

def test_cuda_and_tensorrt_fall_back_to_the_cpu_here_and_say_why():
    device = Device.choose("tensorrt", probe=lambda provider: f"{provider} is missing")
    assert device.providers == (CPU,) and set(device.fallbacks) == {TENSORRT, CUDA}
    assert device.describe().startswith("device tensorrt: running on CPUExecutionProvider; "
                                        "TensorrtExecutionProvider not used: TensorrtExecutionProvider is missing")
    real = Device.choose("cuda")  # this machine's real ONNX Runtime: tried by creating a session
    if CUDA not in real.providers:
        assert real.providers == (CPU,) and real.fallbacks[CUDA]
    with pytest.raises(UserInputError, match="the fallback is refused"):
        Device.choose("tensorrt", strict=True, probe=lambda provider: "no GPU")
    with pytest.raises(UserInputError, match="not one of cpu, cuda, tensorrt"):
        Device.choose("tpu")


def test_a_server_asked_for_tensorrt_reports_the_fallback(repo, tmp_path):
    device = Device.choose("tensorrt", probe=lambda provider: "not on this machine")
    with serve(repo, tmp_path, device=device) as client:
        meta = client.get("/v2/models/m").json()
        assert meta["provider"] == CPU and meta["device"]["requested"] == "tensorrt"
        assert meta["device"]["fallbacks"] == {TENSORRT: "not on this machine", CUDA: "not on this machine"}
        assert value(samples(client), "modelyard_serve_device_info", requested="tensorrt", provider=CPU) == 1
        np.testing.assert_allclose(output_of(client.post("/v2/models/m/infer", json=request_body())),
                                   expected(W1), rtol=1e-6)


def test_tensorrt_versions_load_with_their_precision_and_engine_cache(tmp_path):
    device = Device.choose("tensorrt", probe=lambda provider: None)
    assert device.providers == (TENSORRT, CUDA, CPU)
    (tmp_path / "trt_cache").mkdir()
    (tmp_path / "trt_cache" / "calibration.flatbuffers").write_bytes(b"ranges")
    manifest = {"triton": {"tensorrt": {"precision": "INT8", "engine_cache": "/mnt/models/m/3/trt_cache",
                                        "calibration_table": "calibration.flatbuffers"}}}
    (trt, options), cuda, cpu = device.providers_for(manifest, tmp_path)
    assert (trt, cuda, cpu) == (TENSORRT, CUDA, CPU)
    assert options == {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path / "trt_cache"),
                       "trt_fp16_enable": True, "trt_int8_enable": True,
                       "trt_int8_calibration_table_name": "calibration.flatbuffers"}
    assert tensorrt_options({}, tmp_path)["trt_fp16_enable"] is False  # a plain ONNX version: FP32 engine
    assert Device.choose("cuda", probe=lambda provider: None).providers_for(manifest, tmp_path) == [CUDA, CPU]


# -- what the server advertises ----------------------------------------------------------------

def test_no_model_repository_extension_is_advertised_or_served(repo, tmp_path):
    with serve(repo, tmp_path) as client:
        assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
        assert client.post("/v2/repository/index", json={}).status_code == 404
        assert client.post("/v2/repository/models/m/load", json={}).status_code == 404


# -- the command line --------------------------------------------------------------------------

def test_serve_passes_device_token_and_batch_cap(repo, tmp_path, monkeypatch):
    import serving
    from producer.cli import app

    calls = []
    monkeypatch.setattr(serving, "serve", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    result = CliRunner().invoke(app, ["serve", "m", "-r", repo.uri, "--device", "tensorrt", "--strict-device",
                                      "--token-file", str(token_file), "--max-batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert "bearer token required" in result.output and TOKEN not in result.output
    (kwargs,) = calls
    assert kwargs["device"] == "tensorrt" and kwargs["strict_device"] is True
    assert kwargs["token"] == TOKEN and kwargs["max_batch_size"] == 8

    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert CliRunner().invoke(app, ["serve", "m", "-r", repo.uri]).exit_code == 0
    assert calls[-1]["token"] == "from-env" and calls[-1]["device"] == "cpu" and calls[-1]["max_batch_size"] is None


@pytest.mark.parametrize("args, message", [
    (("--device", "gpu"), "--device 'gpu' is not one of cpu, cuda, tensorrt"),
    (("--token-file", "/nonexistent/token"), "cannot read it"),
    (("--max-batch-size", "0"), "Invalid value"),
])
def test_serve_refuses_bad_options_with_exit_2(repo, args, message):
    from producer.cli import app

    result = CliRunner().invoke(app, ["serve", "m", "-r", repo.uri, *args], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_the_gpu_images_start_check_refuses_a_device_that_does_not_load_and_runs_the_command_otherwise():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]

    def check(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "serving.device_check", *args], cwd=root, capture_output=True,
                              text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "MODELYARD_REQUIRE_DEVICE": ""})

    ran = check("--require", "cpu", "--", "echo", "started")
    assert ran.returncode == 0 and ran.stdout.strip() == "started"
    assert "running on CPUExecutionProvider" in ran.stderr
    if CUDA not in Device.choose("cuda").providers:  # this machine: no CUDA
        refused = check("--require", "cuda", "--", "echo", "started")
        assert refused.returncode == 3 and refused.stdout == ""
        assert "CUDAExecutionProvider not used" in refused.stderr and "MODELYARD_REQUIRE_DEVICE=" in refused.stderr
