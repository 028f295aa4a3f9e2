"""The local stack's state file: private to its owner, and never a licence to signal someone else's process."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

from producer import stack
from shared.settings import Settings


def test_the_stack_file_is_private_even_when_it_existed_readable_by_all(tmp_path):
    path = tmp_path / "stack.json"
    path.write_text("{}")
    path.chmod(0o644)
    stack.write_private(path, json.dumps({"broker_url": "redis://:secret@127.0.0.1:1/0"}))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "secret" in path.read_text()


def test_down_with_a_stale_stack_file_leaves_a_process_that_now_has_a_recorded_pid_alone(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        settings = Settings(home=tmp_path)
        recorded = stack.start_time(bystander.pid) - 1  # the stack's process had this pid, and another start time
        stack.write_private(settings.stack_file, json.dumps({
            "pid": bystander.pid, "pids": [bystander.pid], "starts": {str(bystander.pid): recorded}}))
        assert stack.running_stack(settings) is None
        assert stack.stop_running(settings) is True  # the stale file is cleared ...
        assert bystander.poll() is None  # ... and the process that reused the pid keeps running
        assert not settings.stack_file.exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_down_stops_the_processes_the_stack_file_recorded(tmp_path):
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    settings = Settings(home=tmp_path)
    stack.write_private(settings.stack_file, json.dumps({
        "pid": os.getpid(), "pids": [worker.pid],
        "starts": {str(worker.pid): stack.start_time(worker.pid), str(os.getpid()): stack.start_time(os.getpid())}}))
    assert stack.stop_running(settings) is True
    assert worker.wait(timeout=10) is not None
