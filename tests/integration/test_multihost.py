"""A worker on "another host": its own network namespace, reaching Redis and the object store over a link.

The test makes a network namespace and a veth pair on a private /30 it picks
(10.213.<random>.0/30: the host side is .1, the namespace side .2), binds a Redis and a GCS emulator
to the host-side address only, and starts a cpu worker inside the namespace. The namespace has no
route to anything but that link — not even the host's loopback — so a job that completes there
(convert, then deploy into a gs:// repository) shows that a worker needs nothing but the broker URL
and the object store: no shared disk, no state from a previous stage.

Creating namespaces needs CAP_SYS_ADMIN and CAP_NET_ADMIN: where ``ip netns add`` is refused (or
iproute2 is missing) the test skips and says why. The namespace and the veth pair are removed in
teardown, whatever happened.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from producer import api
from shared.redis_server import free_port, redis_executable
from shared.repository import ModelRepository
from shared.settings import get_settings
from tests.models.tiny import tiny_onnx
from tests.services import ROOT, Cluster, WorkerProcess
from tests.storage_fixtures import _emulator_executable, _wait_until_answering

pytestmark = pytest.mark.integration


@dataclass
class Link:
    namespace: str
    host_device: str
    host_ip: str
    remote_ip: str

    def exec_args(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *args]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture(scope="module")
def link():
    """A namespace joined to this host by a veth pair on a private /30; removed on teardown."""
    if shutil.which("ip") is None:
        pytest.skip("the 'ip' command is missing (apt-get install iproute2; .ci/run installs it)")
    tag = secrets.token_hex(3)
    subnet = f"10.213.{secrets.randbelow(256)}"
    link = Link(namespace=f"myard-{tag}", host_device=f"myh{tag}", host_ip=f"{subnet}.1", remote_ip=f"{subnet}.2")
    probe = ip("netns", "add", link.namespace, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here (needs CAP_SYS_ADMIN/CAP_NET_ADMIN): "
                    f"'ip netns add' said: {probe.stderr.strip()}")
    try:
        remote_device = f"myn{tag}"
        ip("link", "add", link.host_device, "type", "veth", "peer", "name", remote_device)
        ip("link", "set", remote_device, "netns", link.namespace)
        ip("addr", "add", f"{link.host_ip}/30", "dev", link.host_device)
        ip("link", "set", link.host_device, "up")
        ip("-n", link.namespace, "addr", "add", f"{link.remote_ip}/30", "dev", remote_device)
        ip("-n", link.namespace, "link", "set", remote_device, "up")
        ip("-n", link.namespace, "link", "set", "lo", "up")
        yield link
    finally:
        ip("netns", "del", link.namespace, check=False)  # takes its end of the veth pair with it
        ip("link", "del", link.host_device, check=False)


@pytest.fixture(scope="module")
def services(link, tmp_path_factory):
    """Redis and a GCS emulator listening on the host side of the link only."""
    folder = tmp_path_factory.mktemp("multihost")
    password, redis_port, gcs_port = secrets.token_urlsafe(18), free_port(), free_port()
    config = folder / "redis.conf"
    config.touch(mode=0o600)
    config.write_text(f"port {redis_port}\nbind {link.host_ip}\nrequirepass {password}\ndir {folder}\n"
                      f"appendonly no\nsave \"\"\nlogfile {folder / 'redis.log'}\n")
    emulator = _emulator_executable()
    if emulator is None:
        pytest.skip("gcp-storage-emulator is not installed (pip install gcp-storage-emulator)")
    processes = [subprocess.Popen([redis_executable(), str(config)], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        with open(folder / "emulator.log", "wb") as log:
            processes.append(subprocess.Popen(
                [emulator, "start", "--host", link.host_ip, "--port", str(gcs_port), "--in-memory"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True))
        gcs = f"http://{link.host_ip}:{gcs_port}"
        _wait_until_answering(f"{gcs}/storage/v1/b?project=modelyard", processes[1], folder / "emulator.log")
        bucket = f"modelyard-multihost-{uuid.uuid4().hex[:12]}"
        yield {
            "MODELYARD_BROKER_URL": f"redis://:{password}@{link.host_ip}:{redis_port}/0",
            "MODELYARD_ARTIFACT_STORE": f"gs://{bucket}/artifacts",
            "STORAGE_EMULATOR_HOST": gcs,
            "MODELYARD_GCS_CREATE_BUCKET": "1",
            "bucket": bucket,
            "folder": str(folder),
        }
    finally:
        for process in processes:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def remote_worker(link, services, service_env, tmp_path_factory):
    """A cpu worker process inside the namespace; this process is the producer on the host side."""
    env = {**service_env, **{k: v for k, v in services.items() if k.isupper()},
           "MODELYARD_HOME": str(tmp_path_factory.mktemp("remote-home"))}
    cluster = Cluster(env=env, folder=Path(services["folder"]))
    name = f"cpu@{link.namespace}"
    log = cluster.folder / "worker-remote.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            link.exec_args(sys.executable, "-m", "producer", "worker", "--pool", "cpu", "--name", name),
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    cluster.workers.append(WorkerProcess(pool="cpu", name=name, process=process, log=log))
    patch = pytest.MonkeyPatch()
    for key in ("MODELYARD_BROKER_URL", "MODELYARD_ARTIFACT_STORE", "STORAGE_EMULATOR_HOST",
                "MODELYARD_GCS_CREATE_BUCKET", "MODELYARD_HOME"):
        patch.setenv(key, env[key])
    get_settings.cache_clear()
    try:
        cluster.wait_online([name])
        yield cluster.workers[0]
    finally:
        cluster.stop()  # before the namespace goes: nothing may keep it alive
        patch.undo()
        get_settings.cache_clear()


def test_the_namespace_reaches_the_links_redis_but_not_the_hosts_loopback(link, services, redis_server):
    link_port = services["MODELYARD_BROKER_URL"].rsplit(":", 1)[1].split("/")[0]
    probe = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)"

    def connect_from_namespace(host: str, port: int | str) -> subprocess.CompletedProcess:
        return subprocess.run(link.exec_args(sys.executable, "-c", probe, host, str(port)),
                              check=False, capture_output=True, text=True, timeout=30)

    assert connect_from_namespace(link.host_ip, link_port).returncode == 0
    # the session's Redis listens on the host's 127.0.0.1: out of the namespace's reach
    assert connect_from_namespace("127.0.0.1", redis_server.port).returncode != 0


def test_a_worker_in_another_network_namespace_completes_a_job_into_a_gs_repository(
    link, services, remote_worker, tmp_path
):
    tiny_onnx(tmp_path / "m.onnx")
    repository = f"gs://{services['bucket']}/models"
    job = tmp_path / "job.yaml"
    job.write_text("model: {name: remote, source: ./m.onnx, format: onnx}\n"
                   f"deploy: {{repository: {repository}, alias: production}}\n")
    result = api.wait(api.submit(job), timeout=300)
    assert result["state"] == "SUCCEEDED", result.get("error") or remote_worker.log_text()[-3000:]
    assert {s["worker"] for s in result["stages"].values()} == {remote_worker.name}
    repo = ModelRepository.open(repository)
    assert repo.store.exists(f"remote/{repo.resolve('remote', 'production')}/model.onnx")
