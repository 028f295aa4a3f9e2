"""``modelyard serve``'s /metrics after 1,000 inference requests, with p50/p99.

    python scripts/bench/serve_metrics.py [--requests 1000] [--json bench-results/serve_metrics.json]

Publishes a small ONNX model (y = relu(x W1) W2, x [batch, 64] float32, a symbolic batch axis)
as version 1 of a file:// repository in a scratch folder, starts ``modelyard serve`` on it as
its own process with a bearer token (``MODELYARD_SERVE_TOKEN``) and ``--max-batch-size 8``,
and sends, one at a time over a keep-alive connection:

* ``--requests`` JSON inference requests with batch sizes cycling 1, 2, 4, 8 (timed here);
* 5 requests with a batch of 16 (refused: 400, over the cap) and 3 without the token (401).

Then it prints the server's ``GET /metrics`` (the ``modelyard_serve_*`` samples), the client's
p50/p99 and the p50/p99 Prometheus would estimate from the latency histogram
(``histogram_quantile``: linear inside the bucket), and writes JSON (bench-results/ is
git-ignored).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MODEL = "mlp"
TOKEN = "bench-token"
BATCHES = (1, 2, 4, 8)
INFER_ROUTE = "/v2/models/{name}/infer"


def publish(folder: Path) -> str:
    """Version 1 of MODEL, production → 1, in a file:// repository under folder."""
    from onnx import TensorProto, helper, numpy_helper

    from shared.repository import ModelRepository

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 256)).astype(np.float32)
    w2 = rng.standard_normal((256, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "mlp.onnx"
    path.write_bytes(model.SerializeToString())
    repo = ModelRepository.open((folder / "repo").as_uri())
    version = repo.claim_version(MODEL, {"bench": True})
    repo.publish(MODEL, version, {"model.onnx": path}, {
        "model": MODEL, "version": version, "model_file": "model.onnx", "format": "onnx",
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 64]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 16]}]})
    repo.set_alias(MODEL, "production", version)
    return repo.uri


def start_server(uri: str, port: int, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "producer", "serve", MODEL, "--repository", uri, "--port", str(port),
            "--threads", "1", "--workers", "2", "--max-batch-size", "8"]
    env = {**os.environ, "MODELYARD_SERVE_TOKEN": TOKEN}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"the server did not become ready; see {log}")


def infer_body(rows: int) -> bytes:
    x = np.random.default_rng(rows).standard_normal((rows, 64)).astype(np.float32)
    return json.dumps({"inputs": [{"name": "x", "shape": [rows, 64], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def send(conn: http.client.HTTPConnection, body: bytes, *, token: str | None = TOKEN) -> tuple[int, float]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    start = time.perf_counter()
    conn.request("POST", f"/v2/models/{MODEL}/infer", body, headers)
    response = conn.getresponse()
    response.read()
    return response.status, time.perf_counter() - start


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile over cumulative (le, count) pairs, in seconds."""
    total = buckets[-1][1]
    rank = q * total
    previous_le, previous_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return previous_le
            share = (rank - previous_count) / (count - previous_count) if count > previous_count else 0.0
            return previous_le + (le - previous_le) * share
        previous_le, previous_count = le, count
    return previous_le


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "serve_metrics.json")
    args = parser.parse_args()

    from prometheus_client.parser import text_string_to_metric_families

    from shared.redis_server import free_port

    with tempfile.TemporaryDirectory(prefix="modelyard-serve-metrics-") as tmp:
        folder = Path(tmp)
        uri = publish(folder)
        port = free_port()
        server = start_server(uri, port, folder / "server.log")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            bodies = {rows: infer_body(rows) for rows in (*BATCHES, 16)}
            latencies = []
            for index in range(args.requests):
                status, seconds = send(conn, bodies[BATCHES[index % len(BATCHES)]])
                if status != 200:
                    raise SystemExit(f"request {index} got HTTP {status}")
                latencies.append(seconds)
            refused = [send(conn, bodies[16])[0] for _ in range(5)] + [send(conn, bodies[1], token=None)[0]
                                                                       for _ in range(3)]
            conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
            metrics = conn.getresponse().read().decode()
        finally:
            server.terminate()
            server.wait(timeout=30)

    lines = [line for line in metrics.splitlines()
             if line.startswith("modelyard_serve_") and "_created" not in line.split(" ")[0]]
    print("\n".join(lines))
    buckets = []
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "modelyard_serve_request_duration_seconds_bucket" and \
                    sample.labels.get("route") == INFER_ROUTE:
                buckets.append((float(sample.labels["le"]), sample.value))
    buckets.sort()
    ms = np.array(latencies) * 1000
    result = {
        "requests": args.requests, "refused_status": refused,
        "client_p50_ms": float(np.percentile(ms, 50)), "client_p99_ms": float(np.percentile(ms, 99)),
        "histogram_p50_ms": histogram_quantile(0.50, buckets) * 1000,
        "histogram_p99_ms": histogram_quantile(0.99, buckets) * 1000,
        "metrics": lines,
    }
    print(f"\n{args.requests} requests (batch {', '.join(map(str, BATCHES))} in turn), one at a time:")
    print(f"  client:    p50 {result['client_p50_ms']:.2f} ms, p99 {result['client_p99_ms']:.2f} ms")
    print(f"  /metrics:  p50 {result['histogram_p50_ms']:.2f} ms, p99 {result['histogram_p99_ms']:.2f} ms "
          "(histogram_quantile over the infer route's buckets, all its requests)")
    print(f"  refused:   {refused} (5 over --max-batch-size 8, 3 without the token)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
