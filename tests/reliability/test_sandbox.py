"""The model-load sandbox through the queue: a model that attacks the worker gets nothing, and the worker goes on.

The job's converter is the test-only ``unsafe-onnx`` (tests/plugins/unsafe.py): inside the
worker's convert stage it tries to write a file in the worker's home and in the project folder,
read the stack file (``$MODELYARD_HOME/stack.json``) and the cloud credentials file, connect to
the stack's Redis, find secrets in its environment and fork-bomb (bounded), then fails the job
with a report of every attempt. Every attempt must be blocked, no marker file may exist, no
secret may appear in the job record, Redis, the artifacts or the worker's log, and the same
worker must then convert a normal model, sandboxed.
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

from tests.plugins import unsafe  # registers unsafe-onnx here: the producer validates the job against it
from tests.reliability.conftest import report, tiny_onnx

pytestmark = [pytest.mark.reliability, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[2]
ATTEMPTS = ("home", "outside", "stack", "credentials", "redis", "env", "fork")
PROCS = 64


def everything_in_redis(client) -> str:
    parts: list[bytes] = []
    for key in client.scan_iter():
        kind = client.type(key).decode()
        if kind == "string":
            parts.append(client.get(key))
        elif kind == "hash":
            parts.extend(k + b"=" + v for k, v in client.hgetall(key).items())
        elif kind == "list":
            parts.extend(client.lrange(key, 0, -1))
        elif kind in ("set", "zset"):
            parts.extend(client.zrange(key, 0, -1) if kind == "zset" else client.smembers(key))
    return b"\n".join(parts).decode(errors="replace")


@pytest.mark.parametrize("sandbox", ["cold", "warm"])
def test_a_model_that_attacks_the_worker_gets_nothing_and_the_worker_serves_the_next_job(bubblewrap, make_stack,
                                                                                          tmp_path, sandbox):
    """cold: the attack is the worker's first convert (a sandbox started for it); warm: a convert ran
    before, so the attack gets the sandbox the worker started in advance (worker.sandbox.warm)."""
    token = uuid.uuid4().hex
    credentials = tmp_path / "secrets" / "gcs-credentials.json"
    credentials.parent.mkdir()
    credentials.write_text(json.dumps({"type": "authorized_user", "client_secret": f"GCS-SECRET-{token}"}))
    stack = make_stack(env={"MODELYARD_PLUGIN_MODULES": "tests.plugins.fault,tests.plugins.unsafe",
                            "GOOGLE_APPLICATION_CREDENTIALS": str(credentials), "MODELYARD_SANDBOX_PROCS": str(PROCS)})
    stack_file = Path(stack.env["MODELYARD_HOME"]) / "stack.json"
    stack_file.parent.mkdir(parents=True, exist_ok=True)
    stack_file.write_text(json.dumps({"broker_url": stack.env["MODELYARD_BROKER_URL"], "note": f"STACK-{token}"}))
    markers = [Path.home() / f".modelyard-sandbox-marker-{token}", ROOT / f".modelyard-sandbox-marker-{token}"]
    worker = stack.start_worker("cpu", "cpu1")

    evil = tmp_path / "evil"
    tiny_onnx(evil / "model.onnx")
    (evil / unsafe.PLAN).write_text(json.dumps({
        "home_marker": str(markers[0]), "outside_marker": str(markers[1]), "stack_file": str(stack_file),
        "credentials": str(credentials), "redis": ["127.0.0.1", stack.redis.port], "fork_seconds": 3,
    }))
    (tmp_path / "evil.yaml").write_text("model: {name: evil, source: ./evil, format: unsafe-onnx}\n"
                                        "convert: {samples: {batch: 2}}\n")
    tiny_onnx(tmp_path / "after.onnx", seed=5)
    (tmp_path / "after.yaml").write_text("model: {name: after, source: ./after.onnx, format: onnx}\n"
                                         "convert: {samples: {batch: 2}}\n")
    tiny_onnx(tmp_path / "before.onnx", seed=7)
    (tmp_path / "before.yaml").write_text("model: {name: before, source: ./before.onnx, format: onnx}\n"
                                          "convert: {samples: {batch: 2}}\n")
    try:
        if sandbox == "warm":
            assert stack.wait(stack.submit(tmp_path / "before.yaml"), timeout=180)["state"] == "SUCCEEDED"
        attacked = stack.wait(stack.submit(tmp_path / "evil.yaml"), timeout=180)
        after = stack.wait(stack.submit(tmp_path / "after.yaml"), timeout=180)
        markers_left = [str(m) for m in markers if m.exists()]
    finally:
        for marker in markers:
            marker.unlink(missing_ok=True)

    error = attacked.get("error") or ""
    outcomes = dict(re.findall(r"(\w+)=((?:blocked|SUCCEEDED)[^;]*)", error))
    forks = re.search(r"started (\d+) processes", outcomes.get("fork", ""))
    secrets = {"redis password": stack.redis.password, "stack file": f"STACK-{token}",
               "gcs credential": f"GCS-SECRET-{token}"}
    places = {
        "job records": everything_in_redis(stack.redis.client()),
        "artifacts": "\n".join(p.read_bytes().decode(errors="replace")
                               for p in (stack.folder / "artifacts").rglob("*") if p.is_file()),
        "worker log": stack.log_text(),
    }
    leaks = [f"{name} in {place}" for name, secret in secrets.items() for place, text in places.items()
             if secret in text]
    report(f"sandbox attacking model ({sandbox})", submitted=2, completed=int(after["state"] == "SUCCEEDED"),
           failed=int(attacked["state"] == "FAILED"), duplicated=0,
           blocked=sum(v.startswith("blocked") for v in outcomes.values()), attempts=len(ATTEMPTS),
           forked=forks.group(1) if forks else None, leaks=len(leaks), markers=len(markers_left))

    assert attacked["state"] == "FAILED" and attacked["stages"]["convert"]["state"] == "failed", attacked
    assert set(outcomes) == set(ATTEMPTS), error
    assert all(outcome.startswith("blocked") for outcome in outcomes.values()), error
    assert forks and int(forks.group(1)) < PROCS, error
    assert markers_left == []
    assert leaks == []
    assert worker.process.poll() is None
    assert after["state"] == "SUCCEEDED", after.get("error")
    sandboxed = [m for m in stack.manifests("convert") if m["info"].get("sandbox", {}).get("mode") == "bwrap"]
    assert sandboxed, "the next job's convert manifest does not record the sandbox"
    # the job after a convert gets the sandbox started in advance
    after_manifests = [m for m in sandboxed if m["job_id"] == after["id"]]
    assert after_manifests and all(m["info"]["sandbox"]["warm"] for m in after_manifests)
