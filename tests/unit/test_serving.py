"""The inference server: KServe v2 / Triton REST, alias hot swap, bad requests, tritonclient."""

from __future__ import annotations

import gzip
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving import create_app
from shared.errors import UserInputError
from shared.redis_server import free_port
from shared.repository import ModelRepository
from tests.storage_fixtures import gcs_emulator, unique_bucket  # noqa: F401  (fixture)

IO = {
    "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]},
               {"name": "mask", "dtype": "int64", "shape": ["batch", 4]}],
    "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}],
}
W1 = np.arange(12, dtype=np.float32).reshape(4, 3)
W2 = -2 * W1 + 1
X = np.array([[1, 2, 3, 4], [0.5, -1, 0, 2]], dtype=np.float32)
MASK = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], dtype=np.int64)


def expected(weights: np.ndarray, x: np.ndarray = X, mask: np.ndarray = MASK) -> np.ndarray:
    return (x * mask.astype(np.float32)) @ weights


def tiny_model(weights: np.ndarray) -> bytes:
    """y = (x * float(mask)) @ W, with a symbolic batch axis."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["x", "maskf"], ["xm"]),
         helper.make_node("MatMul", ["xm", "W"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def publish_model(repo: ModelRepository, tmp: Path, content: bytes, name: str = "m") -> int:
    version = repo.claim_version(name, {"test": True})
    path = tmp / f"upload-{name}-{version}.onnx"
    path.write_bytes(content)
    manifest = {"model": name, "version": version, "model_file": "model.onnx", "format": "onnx", **IO}
    repo.publish(name, version, {"model.onnx": path}, manifest)
    return version


@pytest.fixture
def repo(tmp_path) -> ModelRepository:
    """Versions 1 (W1) and 2 (W2) of model 'm'; production → 1."""
    repository = ModelRepository.open((tmp_path / "repo").as_uri())
    assert publish_model(repository, tmp_path, tiny_model(W1)) == 1
    assert publish_model(repository, tmp_path, tiny_model(W2)) == 2
    repository.set_alias("m", "production", 1)
    return repository


@pytest.fixture
def client(repo, tmp_path):
    app = create_app(repo.uri, "m", "production", poll_interval=60, cache_dir=tmp_path / "cache",
                     threads=1, max_body_bytes=4096)
    with TestClient(app) as test_client:
        yield test_client


def request_body(x=X, mask=MASK, **extra) -> dict:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.tolist()},
                       {"name": "mask", "shape": list(mask.shape), "datatype": "INT64", "data": mask.ravel().tolist()}],
            **extra}


def output_of(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    assert out["name"] == "y" and out["datatype"] == "FP32"
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


# -- health and metadata -------------------------------------------------------------------

def test_health_and_metadata(client):
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/m/ready").status_code == 200
    assert client.get("/v2/models/m/versions/2/ready").status_code == 200
    assert client.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    meta = client.get("/v2/models/m").json()
    assert meta["name"] == "m" and meta["versions"] == ["1", "2"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]},
                              {"name": "mask", "datatype": "INT64", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]
    assert meta["version"] == "1" and meta["serving_version"] == "1" and meta["last_error"] is None
    assert client.get("/v2/models/m/versions/2").json()["version"] == "2"


# -- inference -----------------------------------------------------------------------------

def test_infer_returns_the_model_outputs_for_nested_and_flat_data(client):
    response = client.post("/v2/models/m/infer", json=request_body(id="req-7", outputs=[{"name": "y"}]))
    np.testing.assert_allclose(output_of(response), expected(W1), rtol=1e-6)
    assert response.json()["model_name"] == "m" and response.json()["model_version"] == "1"
    assert response.json()["id"] == "req-7"
    flat = request_body()
    flat["inputs"][0]["data"] = X.ravel().tolist()
    np.testing.assert_allclose(output_of(client.post("/v2/models/m/infer", json=flat)), expected(W1), rtol=1e-6)


def test_version_specific_infer(client):
    for version, weights in (("2", W2), ("1", W1), ("2", W2)):
        response = client.post(f"/v2/models/m/versions/{version}/infer", json=request_body())
        np.testing.assert_allclose(output_of(response), expected(weights), rtol=1e-6)
        assert response.json()["model_version"] == version
    # the served version did not change
    assert client.post("/v2/models/m/infer", json=request_body()).json()["model_version"] == "1"


def test_binary_tensor_extension_and_gzip(client):
    header = request_body()
    for tensor, array in zip(header["inputs"], (X, MASK), strict=True):
        del tensor["data"]
        tensor["parameters"] = {"binary_data_size": array.nbytes}
    header["outputs"] = [{"name": "y", "parameters": {"binary_data": True}}]
    head = json.dumps(header).encode()
    body = head + X.tobytes() + MASK.tobytes()
    response = client.post("/v2/models/m/infer", content=body,
                           headers={"Inference-Header-Content-Length": str(len(head))})
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    meta = json.loads(response.content[:length])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 2 * 3 * 4
    result = np.frombuffer(response.content[length:], dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(result, expected(W1), rtol=1e-6)

    packed = gzip.compress(json.dumps(request_body()).encode())
    response = client.post("/v2/models/m/infer", content=packed, headers={"Content-Encoding": "gzip"})
    np.testing.assert_allclose(output_of(response), expected(W1), rtol=1e-6)


def _with(**changes):
    """A good request body with one input's fields changed (None deletes the field)."""
    body = request_body()
    for key, value in changes.items():
        index, field = key.split("__")
        tensor = body["inputs"][int(index)]
        if value is None:
            tensor.pop(field)
        else:
            tensor[field] = value
    return json.dumps(body).encode()


GOOD = json.dumps(request_body()).encode()
SHORT_BINARY = _with(**{"0__data": None, "0__parameters": {"binary_data_size": 32}})
BAD_REQUESTS = [
    # (id, method, path, body, headers, status, fragment of the error message)
    ("unknown model", "POST", "/v2/models/nope/infer", GOOD, {}, 404, "unknown model 'nope'"),
    ("unknown model metadata", "GET", "/v2/models/nope", None, {}, 404, "unknown model"),
    ("unknown version", "POST", "/v2/models/m/versions/9/infer", GOOD, {}, 404, "has no version 9"),
    ("non-numeric version", "POST", "/v2/models/m/versions/abc/infer", GOOD, {}, 400, "positive integer"),
    ("wrong input name", "POST", "/v2/models/m/infer", _with(**{"0__name": "z"}), {}, 400, "unexpected input 'z'"),
    ("missing input", "POST", "/v2/models/m/infer",
     json.dumps({"inputs": request_body()["inputs"][:1]}).encode(), {}, 400, "missing input(s) mask"),
    ("no inputs", "POST", "/v2/models/m/infer", b'{"inputs": []}', {}, 400, "'inputs' list"),
    ("input twice", "POST", "/v2/models/m/infer",
     json.dumps({"inputs": request_body()["inputs"] * 2}).encode(), {}, 400, "given twice"),
    ("wrong fixed dim", "POST", "/v2/models/m/infer",
     _with(**{"0__shape": [1, 8], "0__data": list(range(8))}), {}, 400, "the model expects [-1, 4]"),
    ("wrong rank", "POST", "/v2/models/m/infer", _with(**{"0__shape": [8]}), {}, 400, "has shape [8]"),
    ("negative dim", "POST", "/v2/models/m/infer", _with(**{"0__shape": [-2, 4]}), {}, 400, "non-negative"),
    ("wrong datatype", "POST", "/v2/models/m/infer", _with(**{"0__datatype": "FP64"}), {}, 400, "expects FP32"),
    ("data length", "POST", "/v2/models/m/infer", _with(**{"0__data": [1.0, 2.0, 3.0]}), {}, 400,
     "has 3 data elements, shape [2, 4] needs 8"),
    ("ragged data", "POST", "/v2/models/m/infer", _with(**{"0__data": [[1, 2, 3, 4], [1, 2]]}), {}, 400, "ragged"),
    ("strings as numbers", "POST", "/v2/models/m/infer", _with(**{"0__data": ["1"] * 8}), {}, 400,
     "must be numbers"),
    ("floats for INT64", "POST", "/v2/models/m/infer", _with(**{"1__data": [0.5] * 8}), {}, 400,
     "must be integers"),
    ("INT64 overflow", "POST", "/v2/models/m/infer", _with(**{"1__data": [2**70] * 8}), {}, 400, "integers"),
    ("no data", "POST", "/v2/models/m/infer", _with(**{"0__data": None}), {}, 400, "has no 'data'"),
    ("malformed JSON", "POST", "/v2/models/m/infer", b'{"inputs": [', {}, 400, "not valid JSON"),
    ("not UTF-8", "POST", "/v2/models/m/infer", b"\xff\xfe\xfd", {}, 400, "not valid JSON"),
    ("JSON not an object", "POST", "/v2/models/m/infer", b"[1, 2]", {}, 400, "JSON object"),
    ("body over the limit", "POST", "/v2/models/m/infer", b"{" + b" " * 5000 + b"}", {}, 400, "4096-byte limit"),
    ("unknown output", "POST", "/v2/models/m/infer",
     json.dumps(request_body(outputs=[{"name": "logits"}])).encode(), {}, 400, "unknown output 'logits'"),
    ("binary size past the body", "POST", "/v2/models/m/infer", SHORT_BINARY + b"\0" * 16,
     {"Inference-Header-Content-Length": str(len(SHORT_BINARY))}, 400, "does not fit the 16 bytes"),
    ("binary bytes left over", "POST", "/v2/models/m/infer", GOOD + b"\0" * 16,
     {"Inference-Header-Content-Length": str(len(GOOD))}, 400, "16 bytes of binary tensor data, the inputs use 0"),
    ("bad header length", "POST", "/v2/models/m/infer", GOOD, {"Inference-Header-Content-Length": "99999"}, 400,
     "Inference-Header-Content-Length"),
    ("bad gzip", "POST", "/v2/models/m/infer", b"not gzip", {"Content-Encoding": "gzip"}, 400, "does not decompress"),
    ("unknown encoding", "POST", "/v2/models/m/infer", GOOD, {"Content-Encoding": "br"}, 400, "not supported"),
    ("gzip bomb", "POST", "/v2/models/m/infer", gzip.compress(b" " * 100_000), {"Content-Encoding": "gzip"}, 400,
     "over the 4096-byte limit"),
    ("wrong method", "GET", "/v2/models/m/infer", None, {}, 405, "Method Not Allowed"),
    ("unknown path", "GET", "/v2/nothing", None, {}, 404, "Not Found"),
]


def test_binary_data_that_does_not_match_the_shape_is_refused(client):
    header = request_body()
    del header["inputs"][0]["data"]
    header["inputs"][0]["parameters"] = {"binary_data_size": 12}
    head = json.dumps(header).encode()
    response = client.post("/v2/models/m/infer", content=head + b"\0" * 12,
                           headers={"Inference-Header-Content-Length": str(len(head))})
    assert response.status_code == 400 and "needs 32" in response.json()["error"]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_every_bad_request_gets_a_4xx_with_a_message_and_the_server_still_answers(client, case):
    _, method, path, body, headers, status, fragment = case
    response = client.request(method, path, content=body, headers=headers)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]
    np.testing.assert_allclose(output_of(client.post("/v2/models/m/infer", json=request_body())), expected(W1),
                               rtol=1e-6)


# -- versions: failed loads, fixed versions --------------------------------------------------

def test_a_version_that_fails_to_load_keeps_the_old_one_serving(client, repo, tmp_path):
    server = client.app.state.server
    broken = publish_model(repo, tmp_path, b"this is not an onnx model")
    repo.set_alias("m", "production", broken)
    assert server.poll_once() is False
    meta = client.get("/v2/models/m").json()
    assert meta["serving_version"] == "1"
    assert meta["last_error"]["version"] == broken and "cannot load model file" in meta["last_error"]["error"]
    response = client.post("/v2/models/m/infer", json=request_body())
    np.testing.assert_allclose(output_of(response), expected(W1), rtol=1e-6)
    assert response.json()["model_version"] == "1"
    refused = client.post(f"/v2/models/m/versions/{broken}/infer", json=request_body())
    assert refused.status_code == 503 and "cannot load model file" in refused.json()["error"]
    assert server.poll_once() is False  # backs off instead of downloading it again at once

    repo.set_alias("m", "production", 2)  # a good version clears the error
    assert server.poll_once() is True
    meta = client.get("/v2/models/m").json()
    assert meta["serving_version"] == "2" and meta["last_error"] is None
    np.testing.assert_allclose(output_of(client.post("/v2/models/m/infer", json=request_body())), expected(W2),
                               rtol=1e-6)


def test_a_fixed_version_is_served_and_a_missing_alias_is_refused(repo, tmp_path):
    with TestClient(create_app(repo.uri, "m", "2", poll_interval=0.05)) as fixed:
        server = fixed.app.state.server
        assert not server.alias.polling  # a fixed version is never polled
        np.testing.assert_allclose(output_of(fixed.post("/v2/models/m/infer", json=request_body())), expected(W2),
                                   rtol=1e-6)
        cache = server.cache_dir
        assert (cache / "m" / "2" / "model.onnx").is_file()
    assert not cache.exists()  # its own temporary cache is removed on shutdown
    with pytest.raises(UserInputError, match="no alias 'staging'"):
        create_app(repo.uri, "m", "staging")


def test_serves_from_a_gs_repository_and_follows_its_alias(gcs_emulator, tmp_path):
    repo = ModelRepository.open(f"gs://{unique_bucket()}/models")
    publish_model(repo, tmp_path, tiny_model(W1))
    publish_model(repo, tmp_path, tiny_model(W2))
    repo.set_alias("m", "production", 1)
    with TestClient(create_app(repo.uri, "m", poll_interval=60, threads=1)) as client:
        np.testing.assert_allclose(output_of(client.post("/v2/models/m/infer", json=request_body())), expected(W1),
                                   rtol=1e-6)
        repo.set_alias("m", "production", 2)
        assert client.app.state.server.poll_once() is True
        response = client.post("/v2/models/m/infer", json=request_body())
        np.testing.assert_allclose(output_of(response), expected(W2), rtol=1e-6)
        assert response.json()["model_version"] == "2"


# -- a real server: hot swap under load, tritonclient ---------------------------------------

class LiveServer:
    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_hot_swap_under_load_drops_no_request(repo, tmp_path):
    import http.client

    app = create_app(repo.uri, "m", "production", poll_interval=0.2, cache_dir=tmp_path / "cache", threads=1)
    body = json.dumps(request_body()).encode()
    want = {"1": expected(W1), "2": expected(W2)}
    failures: list[str] = []
    seen: list[list[str]] = [[], []]
    stop = threading.Event()

    def client_loop(log: list[str]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
        while not stop.is_set():
            try:
                conn.request("POST", "/v2/models/m/infer", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                if response.status != 200:
                    failures.append(f"HTTP {response.status}: {payload[:200]!r}")
                    continue
                result = json.loads(payload)
                version = result["model_version"]
                data = np.array(result["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)
                if not np.allclose(data, want[version], rtol=1e-6):
                    failures.append(f"version {version} answered another version's numbers")
                log.append(version)
            except Exception as exc:  # any failure counts
                failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
        conn.close()

    with LiveServer(app) as live:
        clients = [threading.Thread(target=client_loop, args=(log,)) for log in seen]
        for thread in clients:
            thread.start()
        time.sleep(2.0)
        repo.set_alias("m", "production", 2)
        time.sleep(3.0)
        stop.set()
        for thread in clients:
            thread.join(timeout=15)
        server = app.state.server
        assert server.alias.swaps == 1 and server.current.version == 2

    print(f"hot swap: {sum(map(len, seen))} requests, versions per client: "
          f"{[(log.count('1'), log.count('2')) for log in seen]}, failures: {len(failures)}")
    assert failures == []
    for log in seen:
        assert log and log[0] == "1" and log[-1] == "2"
        switch = log.index("2")
        assert set(log[:switch]) == {"1"} and set(log[switch:]) == {"2"}  # one switch, never back
    assert sum(map(len, seen)) > 20


def test_tritonclient_can_call_our_server(repo, tmp_path):
    try:
        import tritonclient.http as triton
        from tritonclient.utils import InferenceServerException
    except ImportError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"tritonclient[http] is not installed ({exc}); pip install 'tritonclient[http]'")

    app = create_app(repo.uri, "m", "production", poll_interval=60, threads=1)
    with LiveServer(app) as live:
        client = triton.InferenceServerClient(url=live.url)
        try:
            assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("m")
            meta = client.get_model_metadata("m")
            assert meta["platform"] == "onnxruntime_onnx" and meta["inputs"][0]["shape"] == [-1, 4]
            for binary in (True, False):
                inputs = [triton.InferInput("x", list(X.shape), "FP32"),
                          triton.InferInput("mask", list(MASK.shape), "INT64")]
                inputs[0].set_data_from_numpy(X, binary_data=binary)
                inputs[1].set_data_from_numpy(MASK, binary_data=binary)
                outputs = [triton.InferRequestedOutput("y", binary_data=binary)]
                result = client.infer("m", inputs, outputs=outputs)
                np.testing.assert_allclose(result.as_numpy("y"), expected(W1), rtol=1e-6)
                result = client.infer("m", inputs, model_version="2")  # no outputs named: all, binary
                np.testing.assert_allclose(result.as_numpy("y"), expected(W2), rtol=1e-6)
                assert result.get_response()["model_version"] == "2"
            bad = triton.InferInput("x", [1, 5], "FP32")
            bad.set_data_from_numpy(np.zeros((1, 5), np.float32))
            with pytest.raises(InferenceServerException, match=r"the model expects \[-1, 4\]"):
                client.infer("m", [bad, inputs[1]])
        finally:
            client.close()


def test_json_floats_round_trip_exactly_and_non_finite_values_still_encode():
    from serving.tensors import float_text

    rng = np.random.default_rng(1)
    for dtype, exponents in ((np.float32, 30), (np.float16, 4)):
        values = (rng.standard_normal(5000) * 10.0 ** rng.integers(-exponents, exponents, 5000)).astype(dtype)
        decoded = np.array(json.loads(float_text(values)), dtype=dtype)
        assert np.array_equal(decoded, values)
    assert float_text(np.array([1.0, np.nan], np.float32)) is None  # json.dumps writes NaN
    assert float_text(np.array([1.0], np.float64)) is None  # doubles keep their exact repr
