"""The command line: bad input gives a clear message and exit 2, an unreachable Redis exit 3."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from producer.cli import app
from shared.redis_server import free_port
from shared.settings import get_settings


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("MODELYARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MODELYARD_ARTIFACT_STORE", (tmp_path / "artifacts").as_uri())
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_an_unknown_key_exits_2_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELYARD_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    job = tmp_path / "job.yaml"
    job.write_text("model: {name: m, source: m.onnx, format: onnx, colour: blue}\n")
    result = run("submit", str(job))
    assert result.exit_code == 2
    assert "model.colour: unknown key" in result.output
    assert "Traceback" not in result.output


def test_a_missing_source_exits_2_before_contacting_redis(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELYARD_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    job = tmp_path / "job.yaml"
    job.write_text("model: {name: m, source: ./nowhere.onnx, format: onnx}\n")
    result = run("submit", str(job))
    assert result.exit_code == 2
    assert "model.source: ./nowhere.onnx does not exist" in result.output


def test_a_missing_job_file_exits_2(tmp_path):
    result = run("submit", str(tmp_path / "absent.yaml"))
    assert result.exit_code == 2 and "cannot read job file" in result.output


def test_redis_down_exits_3_with_a_clear_message_and_uploads_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELYARD_BROKER_URL", f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    (tmp_path / "m.onnx").write_bytes(b"x")
    job = tmp_path / "job.yaml"
    job.write_text("model: {name: m, source: ./m.onnx, format: onnx}\n")
    result = run("submit", str(job))
    assert result.exit_code == 3
    assert "cannot reach Redis" in result.output and "hunter2" not in result.output
    assert not (tmp_path / "artifacts").exists() or not any((tmp_path / "artifacts").rglob("blobs/*"))


def test_no_broker_and_no_local_stack_tells_the_user_to_start_one(tmp_path, monkeypatch):
    monkeypatch.delenv("MODELYARD_BROKER_URL", raising=False)
    result = run("status", "abc")
    assert result.exit_code == 2 and "modelyard up" in result.output


def test_a_gpu_worker_without_cuda_refuses_to_start_unless_allowed(monkeypatch):
    import worker.gpu

    monkeypatch.setattr(worker.gpu, "cuda_providers", lambda: [])
    result = run("worker", "--pool", "gpu")
    assert result.exit_code == 2 and "--allow-cpu" in result.output
