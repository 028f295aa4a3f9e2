"""The loads of a user's model outside convert run in the sandbox too: the compress teacher, the GenAI builder.

``worker.sandbox.tasks.run_task`` runs a named task (nothing else: the child looks it up in a
fixed table) in the same bubblewrap sandbox as a converter. These tests show that the task ran
there (its record, and the sandbox's memory limit applying to it), that what comes back is plain
data (safetensors written inside the sandbox), and that a pickle which would run code is refused.
"""

from __future__ import annotations

import os
import pickle
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from shared.errors import UserInputError
from shared.settings import Settings
from worker.sandbox import exchange
from worker.sandbox.tasks import TASKS, run_task

pytestmark = [pytest.mark.reliability]
LABEL = "model.source teacher"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(sandbox="bwrap", home=tmp_path / "home", artifact_store=(tmp_path / "store").as_uri())


def state_dict_file(path: Path) -> dict[str, np.ndarray]:
    import torch

    rng = np.random.default_rng(0)
    tensors = {"conv.weight": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
               "fc.weight": rng.normal(size=(2, 16)).astype(np.float32)}
    state = {name: torch.from_numpy(value) for name, value in tensors.items()}
    state["tied.weight"] = state["fc.weight"]  # shared storage: safetensors cannot save it as it is
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return {**tensors, "tied.weight": tensors["fc.weight"]}


def test_the_compress_teacher_is_read_in_the_sandbox_and_comes_back_as_safetensors(bubblewrap, settings, tmp_path):
    from safetensors.numpy import load_file

    expected = state_dict_file(tmp_path / "upload" / "teacher.pt")
    answer, record = run_task("compress-teacher", {"format": "torch-state-dict", "task": None, "label": LABEL},
                              source=tmp_path / "upload" / "teacher.pt", workdir=tmp_path / "plain", settings=settings)
    assert record["mode"] == "bwrap" and record["seconds"] > 0
    assert answer == {"path": "model.safetensors"}
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["model.safetensors"]
    loaded = load_file(tmp_path / "plain" / "model.safetensors")
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_teacher_pickle_that_would_run_code_is_refused_and_runs_nothing(bubblewrap, settings, tmp_path):
    marker = tmp_path / f"ran-{uuid.uuid4().hex}"
    source = tmp_path / "upload" / "teacher.pt"
    source.parent.mkdir()
    with open(source, "wb") as handle:
        pickle.dump({"fc.weight": _RunsCode(marker)}, handle, protocol=2)
    with pytest.raises(UserInputError, match=r"model\.source teacher") as raised:
        run_task("compress-teacher", {"format": "torch-state-dict", "task": None, "label": LABEL},
                 source=source, workdir=tmp_path / "plain", settings=settings)
    print(f"\ncompress teacher, crafted pickle: {raised.value}")
    assert not marker.exists()


def test_the_sandboxs_memory_limit_applies_to_a_task(bubblewrap, settings, tmp_path):
    import torch

    source = tmp_path / "upload" / "teacher.pt"
    source.parent.mkdir()
    torch.save({"big.weight": torch.zeros(80 * 2**20)}, source)  # 320 MB of weights
    tight = settings.model_copy(update={"sandbox_memory_mb": 256})
    with pytest.raises(UserInputError, match="MODELYARD_SANDBOX_MEMORY_MB"):
        run_task("compress-teacher", {"format": "torch-state-dict", "task": None, "label": LABEL},
                 source=source, workdir=tmp_path / "plain", settings=tight)


def test_the_genai_builder_runs_in_the_sandbox(bubblewrap, settings, tmp_path):
    """A folder the builder cannot read fails inside the sandbox, with the builder's words."""
    source = tmp_path / "hf_source"
    source.mkdir()
    (source / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    params = {"precision": "int4", "provider": "cpu", "options": {}, "label": "variant int4"}
    with pytest.raises(UserInputError, match="model builder failed on variant int4") as raised:
        run_task("genai-build", params, source=source, workdir=tmp_path / "out", settings=settings)
    print(f"\ngenai builder on a broken folder: {raised.value}")


def test_a_request_names_only_the_tasks_in_the_table(tmp_path):
    assert set(TASKS) == {"compress-teacher", "genai-build"}
    with pytest.raises(ValueError, match="no sandbox task"):
        run_task("os.system", {}, source=tmp_path, workdir=tmp_path / "out", settings=Settings(sandbox="off"))
    assert exchange.task_request("genai-build", {}) == {"task": "genai-build", "params": {}}


def warm_children() -> list[int]:
    """Pids of this process's warm sandboxes (bwrap running ``worker.sandbox.child ... --warm``), not other
    processes' (the workers other tests started keep theirs)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid() and argv[0].endswith(b"bwrap") and b"--warm" in argv:
            found.append(int(proc.name))
    return found


def test_a_warm_sandbox_serves_one_request_and_one_whose_request_never_comes_is_ended(bubblewrap, settings,
                                                                                    tmp_path):
    from worker.sandbox import warm

    state_dict_file(tmp_path / "upload" / "teacher.pt")
    params = {"format": "torch-state-dict", "task": None, "label": LABEL}
    warm.enable()
    try:
        _, first = run_task("compress-teacher", params, source=tmp_path / "upload" / "teacher.pt",
                            workdir=tmp_path / "one", settings=settings)
        _, second = run_task("compress-teacher", params, source=tmp_path / "upload" / "teacher.pt",
                             workdir=tmp_path / "two", settings=settings)
        assert (first["warm"], second["warm"]) == (False, True)
        assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["model.safetensors"]
        with pytest.raises(FileNotFoundError):  # the source cannot be placed: that warm sandbox is killed
            run_task("compress-teacher", params, source=tmp_path / "missing.pt", workdir=tmp_path / "three",
                     settings=settings)
        deadline = time.monotonic() + 10  # the killed one goes, the next one (started after the failure) comes
        while len(warm_children()) != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        assert len(warm_children()) == 1
    finally:
        warm.disable()
    deadline = time.monotonic() + 10
    while warm_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert warm_children() == []
