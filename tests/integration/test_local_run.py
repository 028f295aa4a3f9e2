"""``modelyard run``: a job's stages in one local process (worker.local), no Redis server, no workers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from producer.cli import app
from shared.repository import ModelRepository
from shared.settings import get_settings
from tests.models.tiny import tiny_onnx

TINY_WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10

pytestmark = pytest.mark.integration


@pytest.fixture
def job_file(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MODELYARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MODELYARD_ARTIFACT_STORE", (tmp_path / "artifacts").as_uri())
    monkeypatch.setenv("MODELYARD_BROKER_URL", "redis://127.0.0.1:1/0")  # a stopped broker: never used
    monkeypatch.setenv("MODELYARD_BENCH_RUNS", "3")
    get_settings.cache_clear()
    tiny_onnx(tmp_path / "m.onnx", TINY_WEIGHTS, relu=True)
    job = tmp_path / "job.yaml"
    job.write_text("model: {name: tiny, source: ./m.onnx, format: onnx}\n"
                   "optimize: {variants: [int8-dynamic], gate: {cosine_min: 0.9}, objective: size}\n"
                   "deploy: {repository: file://./repo, alias: production}\n")
    yield job
    get_settings.cache_clear()


def test_run_deploys_a_version_without_redis_or_workers_and_a_rerun_is_cached(job_file, tmp_path):
    result = CliRunner().invoke(app, ["run", str(job_file)])
    assert result.exit_code == 0, result.output
    assert "convert done" in result.output and "job " in result.output and "SUCCEEDED in" in result.output
    assert "deployed tiny version 1 as 'production'" in result.output  # the report, as submit --wait prints it
    repo = ModelRepository.open((tmp_path / "repo").as_uri())
    assert repo.versions("tiny") == [1] and repo.resolve("tiny", "production") == 1

    again = CliRunner().invoke(app, ["run", str(job_file), "--json"])
    assert again.exit_code == 0, again.output
    job = json.loads(again.stdout)
    assert job["state"] == "SUCCEEDED" and job["stages"]["deploy"]["version"] == 1
    assert job["stages"]["convert"]["state"] == "cached"  # the same step cache as the workers'
    assert set(job["queues"]) == {"convert", "optimize:fp32", "optimize:int8-dynamic", "select", "deploy"}
    assert job["spec"]["deploy"]["repository"] == (tmp_path / "repo").as_uri()  # the record submit writes


def test_a_failing_job_exits_1_with_its_error(job_file):
    # require_improvement: without it a job whose variants all fail the gate deploys fp32
    job_file.write_text(job_file.read_text().replace("cosine_min: 0.9", "cosine_min: 0.99999, max_abs: 1.0e-9")
                        .replace("objective: size", "objective: size, require_improvement: true"))
    result = CliRunner().invoke(app, ["run", str(job_file)])
    assert result.exit_code == 1, result.output
    # (int8-dynamic may keep every MatMul in float to meet so strict a gate: then it is no smaller than fp32)
    assert "FAILED" in result.output and ("no variant passed" in result.output or "no variant was" in result.output)
    assert "Traceback" not in result.output


def test_the_runner_reports_a_bad_job_file_as_exit_2_in_its_result(tmp_path, job_file):
    job_file.write_text("model: {name: tiny, source: ./absent.onnx, format: onnx}\n")
    out = tmp_path / "result.json"
    runner = subprocess.run([sys.executable, "-m", "worker.local", str(job_file), "--json-out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert runner.returncode == 2 and runner.stdout == ""
    assert "model.source: ./absent.onnx does not exist" in runner.stderr and "Traceback" not in runner.stderr
    assert json.loads(out.read_text())["exit_code"] == 2
