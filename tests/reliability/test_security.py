"""Security of the running system (issue 5): Flower refuses anonymous control requests, rediss:// works
for broker and backend, and no secret ends up in logs, job records or manifests."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from shared.celery_app import make_celery
from shared.redis_server import free_port
from shared.settings import Settings
from tests.reliability.conftest import HOST, fault_job, report, tls_redis_executable
from tests.services import ROOT, Cluster

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


def _post(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url, data=b"", method="POST")
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_flower_refuses_revoke_and_shutdown_requests_without_valid_credentials(make_stack, tmp_path):
    stack = make_stack()
    stack.start_worker("cpu", "cpu1")
    port, password = free_port(), uuid.uuid4().hex
    log = tmp_path / "flower.log"
    with open(log, "wb") as out:  # started as producer/stack.py starts it
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker.app", "flower", f"--port={port}", "--address=127.0.0.1"],
            cwd=ROOT, env={**stack.env, "FLOWER_BASIC_AUTH": f"admin:{password}"}, stdout=out,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    stack.extra_processes.append(flower)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/healthcheck", timeout=2):
                break
        except (urllib.error.URLError, ConnectionError):
            assert flower.poll() is None, log.read_text()
            time.sleep(0.3)
    shutdown, revoke = f"{base}/api/worker/shutdown/cpu1@{HOST}", f"{base}/api/task/revoke/{uuid.uuid4()}"

    codes = {
        "shutdown anonymous": _post(shutdown),
        "revoke anonymous": _post(revoke),
        "shutdown wrong password": _post(shutdown, ("admin", "wrong")),
        "revoke wrong password": _post(revoke, ("admin", "wrong")),
        "revoke with credentials": _post(revoke, ("admin", password)),
    }
    report("security flower auth", submitted=0, completed=0, failed=0, duplicated=0,
           **{k.replace(" ", "_"): v for k, v in codes.items()})
    assert [codes[k] for k in list(codes)[:4]] == [401, 401, 401, 401]
    assert codes["revoke with credentials"] == 200  # the endpoint is real: only the credentials differ
    assert stack.cluster.workers[0].process.poll() is None


def test_a_rediss_url_configures_tls_with_verification_for_broker_and_backend():
    app = make_celery(Settings(), broker_url="rediss://:pw@redis.example:6380/0")

    backend_tls = app.backend.connparams.get("ssl_cert_reqs")
    broker_tls = app.connection_for_write().ssl

    assert app.connection_for_write().transport_cls == "rediss"
    assert int(backend_tls) == 2 and int(broker_tls["ssl_cert_reqs"]) == 2  # ssl.CERT_REQUIRED


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=modelyard-test-ca",
         "-keyout", ca_key, "-out", ca],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", csr],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1",
         "-extfile", ext, "-out", cert],
    ):
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)
    return ca, cert, key


def test_a_job_runs_end_to_end_over_a_tls_redis(make_stack, tmp_path):
    executable = tls_redis_executable()
    if executable is None or shutil.which("openssl") is None:
        pytest.skip("no redis-server built with TLS (or no openssl) on this machine")
    ca, cert, key = _certificates(tmp_path)
    port, password = free_port(), uuid.uuid4().hex
    config = tmp_path / "tls-redis.conf"
    config.write_text(f"port 0\ntls-port {port}\nbind 127.0.0.1\nrequirepass {password}\ntls-cert-file {cert}\n"
                      f"tls-key-file {key}\ntls-ca-cert-file {ca}\ntls-auth-clients no\ndir {tmp_path}\n"
                      "appendonly yes\nsave \"\"\n")
    server = subprocess.Popen([executable, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    stack = make_stack()
    stack.extra_processes.append(server)
    url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    env = {**stack.env, "MODELYARD_BROKER_URL": url}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODELYARD_BROKER_URL", url)
        from shared.settings import get_settings

        get_settings.cache_clear()
        cluster = Cluster(env=env, folder=tmp_path / "tls-workers")
        cluster.folder.mkdir()
        try:
            cluster.start_worker("cpu", f"tls@{HOST}")
            cluster.wait_online([f"tls@{HOST}"])
            result = stack.wait(stack.submit(fault_job(tmp_path, "over-tls")), timeout=60)
        finally:
            cluster.stop()
            get_settings.cache_clear()

    report("security rediss end to end", submitted=1, completed=int(result["state"] == "SUCCEEDED"),
           failed=int(result["state"] == "FAILED"), duplicated=0, redis_tls_port=port)
    assert result["state"] == "SUCCEEDED", result.get("error")


def _redis_dump(client) -> bytes:
    """Every value in Redis, concatenated: job records, Celery results, queues, leases."""
    parts = []
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
    return b"\n".join(parts)


def test_no_secret_reaches_worker_logs_job_records_or_manifests(make_stack, tmp_path):
    gcs_secret = f"FAKE-GCS-SECRET-{uuid.uuid4().hex}"
    credentials = tmp_path / "gcs-credentials.json"
    credentials.write_text(json.dumps({"type": "authorized_user", "client_id": "modelyard-test",
                                       "client_secret": gcs_secret, "refresh_token": gcs_secret}))
    stack = make_stack(env={"GOOGLE_APPLICATION_CREDENTIALS": str(credentials)})
    stack.start_worker("cpu", "cpu1")
    repo = tmp_path / "repo"
    good = stack.submit(fault_job(tmp_path, "secretive", deploy=repo.as_uri()))
    bad_model = tmp_path / "bad.onnx"
    bad_model.write_bytes(b"not a model")
    bad_job = tmp_path / "bad.yaml"
    bad_job.write_text("model: {name: bad, source: ./bad.onnx, format: onnx}\n")
    bad = stack.submit(bad_job)
    results = stack.wait_all([good, bad], timeout=90)
    status = subprocess.run([sys.executable, "-m", "producer", "status", good, "--json"], cwd=ROOT, env=stack.env,
                            check=False, capture_output=True, text=True, timeout=60)

    secrets = {"redis password": stack.redis.password, "gcs credential": gcs_secret}
    places = {
        "worker logs": stack.log_text(),
        "redis contents": _redis_dump(stack.redis.client()).decode(errors="replace"),
        "artifact manifests": "\n".join(p.read_text() for p in (stack.folder / "artifacts").rglob("*.json")),
        "repository manifests": "\n".join(p.read_text() for p in repo.rglob("*.json")),
        "status output": status.stdout + status.stderr,
    }
    leaks = [f"{secret} in {place}" for secret, value in secrets.items() for place, text in places.items()
             if value in text]
    report("security no secrets in logs", submitted=2, completed=int(results[good]["state"] == "SUCCEEDED"),
           failed=int(results[bad]["state"] == "FAILED"), duplicated=0, places_checked=len(places),
           bytes_checked=sum(len(t) for t in places.values()), leaks=len(leaks))
    assert results[good]["state"] == "SUCCEEDED" and results[bad]["state"] == "FAILED"
    assert all(places.values())  # each place really had content to search
    assert leaks == []
