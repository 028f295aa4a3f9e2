"""The command line: bad input gives a clear message and exit 2, an unreachable or lost Redis exit 3,
a wait past its --timeout exit 4; in a log, progress is one line per stage change."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from producer import api
from producer.cli import app
from shared.jobs import JobStore
from shared.redis_server import free_port, start_redis
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


def test_the_worker_command_becomes_python_m_worker_with_its_options(monkeypatch):
    calls = []

    def execv(path, args):
        calls.append(args)
        raise SystemExit(0)

    monkeypatch.setattr("os.execv", execv)
    result = run("worker", "--pool", "gpu", "--name", "g1@h", "--allow-cpu", "--concurrency", "3")
    assert result.exit_code == 0, result.output
    assert calls[0][1:5] == ["-m", "worker", "--pool", "gpu"]
    assert calls[0][calls[0].index("--name") + 1] == "g1@h" and "--allow-cpu" in calls[0]
    assert calls[0][calls[0].index("--concurrency") + 1] == "3"


def test_the_worker_command_refuses_an_unknown_pool():
    result = run("worker", "--pool", "tpu")
    assert result.exit_code == 2 and "--pool must be cpu or gpu" in result.output


# -- --version, validate --------------------------------------------------------------------------
def test_version_prints_the_installed_package_version():
    from importlib.metadata import version

    result = run("--version")
    assert result.exit_code == 0 and result.output.strip() == f"modelyard {version('modelyard')}"


def tiny_job(tmp_path, extra: str = "") -> Path:
    (tmp_path / "m.onnx").write_bytes(b"not read by validate")
    job = tmp_path / "job.yaml"
    job.write_text("model: {name: m, source: ./m.onnx, format: onnx}\n"
                   "optimize: {variants: [int8-dynamic, fp16], gate: {cosine_min: 0.98}}\n"
                   "deploy: {repository: file://./repo}\n" + extra)
    return job


def test_validate_a_good_job_prints_ok_and_its_stages_without_redis(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELYARD_BROKER_URL", "redis://127.0.0.1:1/0")  # never contacted
    result = run("validate", str(tiny_job(tmp_path)))
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"OK {tmp_path / 'job.yaml'}: model m (onnx)")
    for stage in ("convert [cpu]", "optimize:fp32 [cpu]", "optimize:int8-dynamic [cpu]", "select [cpu]",
                  f"deploy [cpu]: {(tmp_path / 'repo').as_uri()} as 'production'"):
        assert stage in result.output


def test_validate_json_gives_the_plan_and_the_spec_as_submitted(tmp_path):
    result = run("validate", str(tiny_job(tmp_path, "device: gpu\n")), "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["ok"] is True
    assert answer["stages"]["optimize:fp16"] == "gpu" and answer["stages"]["optimize:int8-dynamic"] == "cpu"
    assert answer["spec"]["deploy"]["repository"] == (tmp_path / "repo").as_uri()


@pytest.mark.parametrize("body, message", [
    ("model: {name: m, source: ./m.onnx, format: onnx, colour: blue}\n", "model.colour: unknown key"),
    ("model: {name: m, source: ./absent.onnx, format: onnx}\n", "model.source: ./absent.onnx does not exist"),
    ("model: {name: m, source: ./m.onnx, format: no-such-format}\n", "no-such-format"),
    ("model: [unclosed\n", "is not valid YAML"),
])
def test_validate_a_bad_job_exits_2_with_the_message(tmp_path, body, message):
    (tmp_path / "m.onnx").write_bytes(b"x")
    job = tmp_path / "job.yaml"
    job.write_text(body)
    result = run("validate", str(job))
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    as_json = CliRunner().invoke(app, ["validate", str(job), "--json"])
    assert as_json.exit_code == 2 and json.loads(as_json.stdout) == {"ok": False, "job_file": str(job)}


def test_validate_a_missing_file_or_none_exits_2(tmp_path):
    result = run("validate", str(tmp_path / "absent.yaml"))
    assert result.exit_code == 2 and "cannot read job file" in result.output
    result = run("validate")
    assert result.exit_code == 2 and "--schema" in result.output


def test_validate_schema_prints_the_job_files_json_schema():
    result = run("validate", "--schema")
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert schema["title"] == "JobSpec" and "model" in schema["required"] and "optimize" in schema["properties"]


# -- waiting: timeouts and Redis trouble are messages and exit codes ------------------------------
@pytest.fixture
def store(redis_server, monkeypatch) -> JobStore:
    url = redis_server.url.rsplit("/", 1)[0] + "/6"  # a database only this module uses
    monkeypatch.setenv("MODELYARD_BROKER_URL", url)
    get_settings.cache_clear()
    jobs = JobStore.from_url(url)
    jobs.redis.flushdb()
    yield jobs
    jobs.redis.flushdb()


def test_wait_past_its_timeout_exits_4_and_says_the_job_goes_on(store):
    store.create("slow", {"model": "m", "queues": {"convert": "cpu"}})
    result = run("wait", "slow", "--timeout", "0.3")
    assert result.exit_code == 4, result.output
    assert "job slow is still QUEUED after 0.3 s" in result.output and "modelyard cancel slow" in result.output
    assert "Traceback" not in result.output


def test_submit_wait_with_redis_unreachable_exits_3(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELYARD_BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setattr(api.time, "sleep", lambda s: None)
    result = run("submit", str(tiny_job(tmp_path)), "--wait", "--timeout", "5")
    assert result.exit_code == 3 and "cannot reach Redis at redis://127.0.0.1:1/0" in result.output
    result = run("wait", "abc", "--timeout", "5")
    assert result.exit_code == 3 and "Is Redis running?" in result.output and "Traceback" not in result.output


def test_redis_lost_during_a_wait_exits_3_after_the_grace_period(tmp_path, monkeypatch):
    server = start_redis(tmp_path / "redis", appendonly=False)
    try:
        monkeypatch.setenv("MODELYARD_BROKER_URL", server.url)
        monkeypatch.setattr(api, "OUTAGE_GRACE_S", 0.5)
        get_settings.cache_clear()
        JobStore.from_url(server.url).create("j1", {"model": "m", "queues": {"convert": "cpu"}})
        threading.Timer(0.5, server.stop).start()
        result = run("wait", "j1", "--timeout", "60")
    finally:
        server.stop()
    assert result.exit_code == 3, result.output
    assert "lost the connection to Redis" in result.output and "job j1" in result.output
    assert server.password not in result.output and "Traceback" not in result.output


def test_wait_in_a_log_prints_one_line_per_stage_change_then_the_report(store, monkeypatch):
    store.create("j2", {"model": "m", "queues": {"convert": "cpu", "deploy": "cpu"}})
    now = time.time()
    updates = iter([
        lambda: store.update_stage("j2", "convert", state="running", worker="cpu1@h", started=now),
        lambda: store.set_state("j2", "RUNNING"),
        lambda: store.update_stage("j2", "convert", state="done", finished=now + 3.14),
        lambda: store.update_stage("j2", "deploy", state="failed", message="smoke gate: bad", started=now + 4,
                                   finished=now + 5),
        lambda: store.set_state("j2", "FAILED", "deploy: smoke gate: bad"),
    ])
    monkeypatch.setattr(api.time, "sleep", lambda s: next(updates, lambda: None)())
    result = run("wait", "j2")
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    stamp = r"\d\d:\d\d:\d\d "
    expected = [f"{stamp}job j2 QUEUED \\(model m\\)", f"{stamp}convert running on cpu1@h",
                f"{stamp}job j2 RUNNING \\(model m\\)", f"{stamp}convert done 3.1 s",
                f"{stamp}deploy failed 1.0 s: smoke gate: bad",
                f"{stamp}job j2 FAILED in .* s: deploy: smoke gate: bad"]
    for line, pattern in zip(lines[:len(expected)], expected, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)
    assert "FAILED: deploy: smoke gate: bad" in result.output  # the report, as before


def test_wait_json_keeps_stdout_for_the_record_and_logs_progress_on_stderr(store):
    store.create("j3", {"model": "m", "queues": {"convert": "cpu"}})
    store.set_state("j3", "SUCCEEDED")
    result = run("wait", "j3", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["state"] == "SUCCEEDED"
    assert "job j3 SUCCEEDED" in result.stderr


# -- report ---------------------------------------------------------------------------------------
def test_report_json_writes_no_file_and_html_only_where_asked(store, tmp_path, monkeypatch):
    table = [{"variant": "fp32", "size_bytes": 100, "p50_ms": 1.0, "cosine_min": 1.0, "verdict": "baseline"}]
    store.create("j4", {"model": "m", "spec": {}})
    store.update_stage("j4", "select", state="done", table=table)
    monkeypatch.chdir(tmp_path)
    result = run("report", "j4", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == table
    assert list(tmp_path.iterdir()) == []
    result = run("report", "j4", "--html", str(tmp_path / "r.html"))
    assert result.exit_code == 0 and 'id="variant-chart"' in (tmp_path / "r.html").read_text()


def test_run_refuses_a_bad_job_file_before_starting_a_runner(tmp_path, monkeypatch):
    import producer.local

    monkeypatch.setattr(producer.local.subprocess, "Popen", lambda *a, **k: pytest.fail("a runner started"))
    result = run("run", str(tiny_job(tmp_path, "colour: blue\n")))
    assert result.exit_code == 2 and "colour: unknown key" in result.output


# -- plugins --------------------------------------------------------------------------------------
DESCRIBED = [
    {"name": "int8-dynamic", "kind": "optimizer", "summary": "INT8 weights, dynamic activations",
     "params": [{"name": "per_channel", "type": "bool", "default": True, "help": "one scale per channel",
                 "choices": None},
                {"name": "weight_type", "type": "str", "default": "auto", "help": "", "choices": ["auto", "int8"]}],
     "gpu_benefit": False, "formats": ["onnx"]},
    {"name": "onnx", "kind": "converter", "summary": "an ONNX model as is", "params": []},
]


def test_plugins_lists_each_kind_with_its_params_and_other_facts(monkeypatch):
    from worker.plugins import catalog

    monkeypatch.setattr(catalog, "describe", lambda: DESCRIBED)
    result = CliRunner().invoke(app, ["plugins"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert result.output.index("converters (1)") < result.output.index("optimizers (1)")
    assert "per_channel: bool = true — one scale per channel" in result.output
    assert "weight_type: str = auto [auto, int8]" in result.output
    assert "gpu_benefit: false" in result.output and "formats: onnx" in result.output
    assert json.loads(run("plugins", "--json").output) == {"plugins": DESCRIBED}


def test_plugins_renders_the_real_catalog():
    result = run("plugins")
    assert result.exit_code == 0, result.output
    assert "int8-dynamic" in result.output and "hf-transformers" in result.output
