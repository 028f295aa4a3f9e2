"""The model-load sandbox (worker.sandbox): its command line, its limits, and real sandboxed converts.

The real runs use the test-only ``misbehaving-onnx`` converter (tests/plugins/unsafe.py), which
the sandboxed child imports through MODELYARD_PLUGIN_MODULES. They need bubblewrap: skipped
where it is missing, failed in CI (scripts/test.sh installs it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from shared.errors import UserInputError
from shared.jobspec import JobSpec
from shared.settings import Settings
from tests.models.tiny import tiny_onnx
from tests.plugins import unsafe  # registers misbehaving-onnx in this process too
from worker.plugins import registry
from worker.plugins.base import ConvertRequest
from worker.sandbox import bubblewrap, convert_model, exchange, status
from worker.sandbox.limits import Limits
from worker.sandbox.output import check_workdir

LIMITS = Limits(memory_mb=1024, cpu_s=60, file_mb=64, procs=64, wall_s=60)


# --- the command line -------------------------------------------------------------------------

def test_a_needed_folder_under_a_mask_is_bound_back_after_the_mask_and_its_parents_made_readable(tmp_path):
    home, venv = tmp_path / "home", tmp_path / "home" / "app" / "venv"
    venv.mkdir(parents=True)
    args = bubblewrap.command(tmp_path / "box", source=tmp_path / "m.onnx", workdir=tmp_path / "out",
                              hidden=[home], needed=[venv], secrets=[], argv=["python"], privileged=False)
    joined = " ".join(args)
    assert joined.index(f"--tmpfs {home}") < joined.index(f"--perms 0755 --dir {home / 'app'}") \
        < joined.index(f"--ro-bind {venv} {venv}") < joined.index(f"--remount-ro {home}")


def test_a_secret_file_inside_a_needed_folder_is_covered_and_the_folder_stays_visible(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    credentials = project / "credentials.json"
    credentials.write_text("{}")
    args = bubblewrap.command(tmp_path / "box", source=tmp_path / "m.onnx", workdir=tmp_path / "out",
                              hidden=[project], needed=[project], secrets=[credentials], argv=["python"],
                              privileged=False)
    assert f"--tmpfs {project}" not in " ".join(args)
    assert f"--ro-bind /dev/null {credentials}" in " ".join(args)


def test_an_unprivileged_sandbox_gets_every_namespace_and_no_further_user_namespaces(tmp_path):
    args = bubblewrap.command(tmp_path, source=tmp_path, workdir=tmp_path, hidden=[], needed=[], secrets=[],
                              argv=["python"], privileged=False)
    assert {"--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"} <= set(args)
    privileged = bubblewrap.command(tmp_path, source=tmp_path, workdir=tmp_path, hidden=[], needed=[],
                                    secrets=[], argv=["python"], privileged=True)
    assert {"--unshare-net", "--unshare-pid", "--unshare-ipc"} <= set(privileged)


def test_the_child_environment_carries_no_worker_secret():
    environ = {"MODELYARD_BROKER_URL": "redis://:hunter2@redis:6379/0", "GOOGLE_APPLICATION_CREDENTIALS": "/c.json",
               "AWS_SECRET_ACCESS_KEY": "x", "OMP_NUM_THREADS": "2", "MODELYARD_PLUGIN_MODULES": "my.plugins",
               "HOME": "/root", "PYTHONPATH": "/opt/plugins"}
    env = bubblewrap.child_env(environ)
    assert "hunter2" not in json.dumps(env)
    assert not {"MODELYARD_BROKER_URL", "GOOGLE_APPLICATION_CREDENTIALS", "AWS_SECRET_ACCESS_KEY"} & set(env)
    assert env["HOME"].startswith(str(bubblewrap.INSIDE)) and env["HF_HUB_OFFLINE"] == "1"
    assert env["OMP_NUM_THREADS"] == "2" and env["PYTHONPATH"].endswith("/opt/plugins")


def test_the_stack_file_and_credentials_folders_are_hidden(tmp_path):
    credentials = tmp_path / "secrets" / "gcs.json"
    credentials.parent.mkdir()
    credentials.write_text("{}")
    settings = Settings(home=tmp_path / "modelyard", artifact_store=(tmp_path / "store").as_uri())
    for folder in (settings.home_dir, tmp_path / "store"):
        folder.mkdir()
    hidden = bubblewrap.hidden_folders(settings, {"HOME": "/root", "GOOGLE_APPLICATION_CREDENTIALS": str(credentials)})
    assert {settings.home_dir.resolve(), credentials.parent.resolve(), (tmp_path / "store").resolve(),
            Path("/tmp").resolve()} <= set(hidden)


def test_a_root_workers_sandboxes_get_distinct_unprivileged_uids():
    assert bubblewrap.sandbox_uid(100) != bubblewrap.sandbox_uid(101)
    assert bubblewrap.sandbox_uid(100) >= bubblewrap.UID_BASE > 65535


# --- limits and what the job is told ----------------------------------------------------------

@pytest.mark.parametrize(("returncode", "log", "phrase"), [
    (128 + 24, "", "CPU time limit in the sandbox (60 s, MODELYARD_SANDBOX_CPU_S)"),
    (128 + 6, "terminate called after throwing an instance of 'std::bad_alloc'", "ran out of memory"),
    (128 + 11, "", "crashed in the sandbox (killed by SIGSEGV)"),
    (128 + 9, "", "MODELYARD_SANDBOX_CPU_S) or the machine ran out of memory"),
    (1, "bwrap: Can't mount proc", "without a result (exit status 1): bwrap: Can't mount proc"),
])
def test_a_child_that_left_no_result_is_explained(returncode, log, phrase):
    assert phrase in LIMITS.ended(returncode, log_tail=log)


def test_error_texts_that_name_an_exhausted_limit_become_that_limits_message():
    assert "MODELYARD_SANDBOX_PROCS" in LIMITS.classify("BlockingIOError: [Errno 11] Resource temporarily unavailable")
    assert "MODELYARD_SANDBOX_FILE_MB" in LIMITS.classify("OSError: [Errno 27] File too large")
    assert LIMITS.classify("ValueError: bad shape") is None


# --- reading what the child left ----------------------------------------------------------------

def test_every_convert_request_field_crosses_the_sandbox():
    import dataclasses

    assert {f.name for f in dataclasses.fields(ConvertRequest)} == set(exchange.REQUEST_FIELDS)


def test_a_symlink_in_the_output_is_refused(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "weights.bin").symlink_to("/etc/hostname")
    with pytest.raises(UserInputError, match="left a symlink in its output"):
        check_workdir(tmp_path, "model.onnx")


def test_a_model_file_outside_the_output_folder_is_refused(tmp_path):
    with pytest.raises(UserInputError, match="outside its output folder"):
        check_workdir(tmp_path, "../../etc/passwd")


def test_onnx_external_data_outside_the_output_folder_is_refused(tmp_path):
    import onnx

    model = tiny_onnx(tmp_path / "model.onnx")
    proto = onnx.load(str(model))
    tensor = proto.graph.initializer[0]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("float_data")
    tensor.external_data.add(key="location", value="../../../etc/hostname")
    onnx.save(proto, str(model))
    with pytest.raises(UserInputError, match="outside its output folder"):
        check_workdir(tmp_path, "model.onnx")


def test_a_result_file_that_is_a_symlink_is_not_read(tmp_path):
    (tmp_path / exchange.RESULT).symlink_to("/etc/hostname")
    with pytest.raises(UserInputError, match="unreadable result.json"):
        exchange.read_result(tmp_path)


# --- real sandboxed converts ------------------------------------------------------------------

@pytest.fixture
def sandbox_env(monkeypatch):
    if shutil.which("bwrap") is None:
        if os.environ.get("CI"):
            pytest.fail("bubblewrap is not installed (scripts/test.sh installs it)")
        pytest.skip("bubblewrap is not installed")
    monkeypatch.setenv("MODELYARD_PLUGIN_MODULES", "tests.plugins.unsafe")


def misbehave(tmp_path: Path, action: str, **settings) -> tuple:
    source = tmp_path / "source"
    tiny_onnx(source / "model.onnx")
    (source / unsafe.BEHAVIOUR).write_text(json.dumps({"action": action, "target": "/etc/hostname"}))
    out = tmp_path / "out"
    out.mkdir()
    spec = JobSpec.model_validate({"model": {"name": "m", "source": "./m", "format": "misbehaving-onnx"},
                                   "convert": {"samples": {"batch": 2}}})
    request = ConvertRequest(source=source, model=spec.model, convert=spec.convert, workdir=out,
                             settings=Settings(**{"sandbox_wall_s": 60, **settings}))
    return convert_model(registry.converters["misbehaving-onnx"], request)


def test_a_sandboxed_convert_returns_the_converters_result(sandbox_env, tmp_path):
    result, record = misbehave(tmp_path, "none")
    assert result.model_file == "model.onnx" and (tmp_path / "out" / "model.onnx").is_file()
    np.testing.assert_allclose(result.reference["y"], result.samples["x"] @ np.arange(12).reshape(4, 3), rtol=1e-5)
    assert record["mode"] == "bwrap" and record["seconds"] > 0


def test_a_user_input_error_in_the_sandbox_keeps_its_message(sandbox_env, tmp_path):
    with pytest.raises(UserInputError, match="^model.source: misbehaving-onnx refuses this model, as asked$"):
        misbehave(tmp_path, "user-error")


@pytest.mark.parametrize(("action", "settings", "phrase"), [
    ("memory", {"sandbox_memory_mb": 512}, "ran out of memory in the sandbox (limit 512 MB per process"),
    ("cpu", {"sandbox_cpu_s": 3}, "exceeded its CPU time limit in the sandbox (3 s, MODELYARD_SANDBOX_CPU_S)"),
    ("file", {"sandbox_file_mb": 8}, "write a file over 8 MB in the sandbox (MODELYARD_SANDBOX_FILE_MB)"),
    ("procs", {"sandbox_procs": 32}, "more than 32 processes and threads in the sandbox (MODELYARD_SANDBOX_PROCS)"),
    ("hang", {"sandbox_wall_s": 4}, "did not finish within 4 s in the sandbox and was stopped"),
    ("abort", {}, "crashed in the sandbox (killed by SIGABRT)"),
    ("symlink", {}, "left a symlink in its output (weights.bin); refused"),
])
def test_a_load_that_breaks_a_limit_fails_naming_the_limit(sandbox_env, tmp_path, action, settings, phrase):
    with pytest.raises(UserInputError) as failure:
        misbehave(tmp_path, action, **settings)
    assert phrase in str(failure.value)


def test_with_the_sandbox_off_the_load_runs_in_process_and_says_so(sandbox_env, tmp_path):
    _, record = misbehave(tmp_path, "none", sandbox="off")
    assert record == {"mode": "off", "reason": "MODELYARD_SANDBOX=off"}


def test_without_bubblewrap_every_load_fails_naming_the_setting_and_what_is_missing(sandbox_env, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setattr(status.shutil, "which", lambda name: None)
    status.forget()
    try:
        with pytest.raises(UserInputError) as failure:
            misbehave(tmp_path, "none")
    finally:
        status.forget()
    assert "MODELYARD_SANDBOX=bwrap" in str(failure.value) and "bubblewrap is not installed" in str(failure.value)
    assert "MODELYARD_SANDBOX=off" in str(failure.value)
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_the_start_check_runs_a_sandboxed_child_and_logs_the_limits(sandbox_env, monkeypatch, caplog):
    from shared.settings import get_settings
    from worker.sandbox import startup

    get_settings.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="modelyard.sandbox"):
            startup.check_sandbox_at_start()
        assert "model loads run in a bubblewrap sandbox" in caplog.text
        monkeypatch.setenv("MODELYARD_SANDBOX", "off")
        get_settings.cache_clear()
        startup.check_sandbox_at_start()
        assert "MODELYARD_SANDBOX=off: untrusted models are loaded UNSANDBOXED" in caplog.text
    finally:
        get_settings.cache_clear()
