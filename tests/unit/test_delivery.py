"""The Celery app's delivery settings: the at-least-once guarantees the service relies on."""

from __future__ import annotations

import pytest

from shared.celery_app import make_celery
from shared.errors import UserInputError
from shared.settings import Settings


@pytest.fixture
def conf():
    return make_celery(Settings(), broker_url="redis://127.0.0.1:1/0").conf


def test_only_json_crosses_the_wire(conf):
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]


def test_messages_are_acknowledged_after_the_stage_and_requeued_if_the_worker_dies(conf):
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1


def test_visibility_timeout_exceeds_the_hard_time_limit(conf):
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit > conf.task_soft_time_limit


def test_settings_refuse_a_visibility_timeout_below_the_stage_limit():
    with pytest.raises(ValueError, match="VISIBILITY_TIMEOUT"):
        Settings(stage_time_limit_s=600, stage_soft_time_limit_s=500, visibility_timeout_s=300)


def test_stages_route_to_cpu_by_default_and_both_pools_exist(conf):
    assert conf.task_default_queue == "cpu"
    assert {q.name for q in conf.task_queues} == {"cpu", "gpu"}


def test_no_broker_configured_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MODELYARD_BROKER_URL", raising=False)
    with pytest.raises(UserInputError, match="modelyard up"):
        make_celery(Settings(home=tmp_path))


def test_worker_import_does_not_load_heavy_frameworks():
    import subprocess
    import sys

    code = (
        "import sys, worker.app, worker.tasks, worker.plugins;"
        "heavy = [m for m in ('torch', 'tensorflow', 'onnxruntime', 'transformers') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={"MODELYARD_BROKER_URL": "redis://127.0.0.1:1/0", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
