"""Checker and loader read the same bytes: archives that list a member twice are refused, nothing runs.

``zipfile`` returns the last copy of a duplicated member, torch's reader (with the layouts in
tests/models/crafted_archives.py) the first. On main that let a ``.pt2`` whose first copy of its
sample inputs was a pickle payload pass the check and run inside ``torch.export.load``, and a
TorchScript archive whose first copy of its code read a worker file put that file's bytes in the
job's reference outputs. The control tests show the crafted files are live against torch itself.
"""

from __future__ import annotations

import io
import uuid
import zipfile

import numpy as np
import pytest

from shared.errors import UserInputError
from tests.reliability.crafted_jobs import assert_failed_in_convert, assert_no_artifact_holds, convert, run_job

pytestmark = [pytest.mark.integration, pytest.mark.heavy,
              pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")]

torch = pytest.importorskip("torch")

from tests.models import crafted_archives, torch_files  # noqa: E402  (imports torch: after the skips above)

INPUTS = "inputs: [{name: x, dtype: float32, shape: [batch, 3, 64, 64]}]"
SAMPLE_INPUTS = "/data/sample_inputs/model.pt"


@pytest.fixture(scope="module")
def honest_program(tmp_path_factory):
    return torch_files.save_program(torch_files.seeded_resnet18(0), tmp_path_factory.mktemp("pt2") / "honest.pt2")


@pytest.fixture
def secret(tmp_path):
    """A worker file whose bytes must never reach an artifact."""
    path = tmp_path / "worker-secret.txt"
    path.write_bytes(f"modelyard-secret-{uuid.uuid4().hex}".encode())
    return path


# --- .pt2 ------------------------------------------------------------------------------------


def test_control_torch_export_load_reads_the_first_copy_where_zipfile_reads_the_last(honest_program, tmp_path):
    probe = crafted_archives.duplicate_member(
        honest_program, tmp_path / "probe.pt2", SAMPLE_INPUTS,
        crafted_archives.sample_inputs(torch.full((2, 3, 64, 64), 7.0)), padding=crafted_archives.PT2_PADDING)

    with zipfile.ZipFile(probe) as archive:
        name = next(n for n in archive.namelist() if n.endswith(SAMPLE_INPUTS))
        zipfile_copy = torch.load(io.BytesIO(archive.read(name)), weights_only=True)
    program = torch.export.load(str(probe))

    assert float(zipfile_copy[0][0].flatten()[0]) != 7.0
    assert float(program.example_inputs[0][0].flatten()[0]) == 7.0


def test_pt2_listing_its_sample_inputs_twice_is_refused_before_loading(honest_program, tmp_path):
    marker = tmp_path / "pwned"
    evil = crafted_archives.pt2_with_payload_first(honest_program, tmp_path / "evil.pt2", marker)

    with pytest.raises(UserInputError, match=r"archive member '[^']+/data/sample_inputs/model\.pt' appears twice"):
        convert("torch-exported", evil, tmp_path / "out")
    assert not marker.exists()


def test_pt2_listing_its_sample_inputs_twice_fails_through_the_queue(cluster, producer_env, tmp_path,
                                                                     honest_program):
    marker = tmp_path / "pwned"
    crafted_archives.pt2_with_payload_first(honest_program, tmp_path / "evil.pt2", marker)

    job = run_job(tmp_path, "model: {name: evil-dup-pt2, source: ./evil.pt2, format: torch-exported}\n")

    assert_failed_in_convert(job, "data/sample_inputs/model.pt' appears twice", "duplicate names are refused")
    assert not marker.exists()


def test_torch_loads_inside_the_pt2_load_never_fall_back_to_weights_only_false(tmp_path):
    from worker.plugins.torch_exported import weights_only_loads

    marker = tmp_path / "pwned"
    payload = crafted_archives.sample_inputs(torch_files.OpenMarker(marker))

    with weights_only_loads(), pytest.raises(Exception, match="Weights only load failed"):
        torch.load(io.BytesIO(payload), weights_only=False)  # what deserialize_torch_artifact falls back to
    assert not marker.exists()


def test_the_loader_gets_a_pt2_without_sample_inputs_to_unpickle(honest_program, tmp_path, monkeypatch):
    loaded_samples = []
    real_load = torch.export.load

    def load(path, *args, **kwargs):
        with zipfile.ZipFile(path) as archive:
            loaded_samples.extend(archive.read(n) for n in archive.namelist() if n.endswith(SAMPLE_INPUTS))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch.export, "load", load)
    convert("torch-exported", honest_program, tmp_path / "out")

    assert loaded_samples == [b""]


# --- TorchScript -----------------------------------------------------------------------------


@pytest.fixture
def torchscript_reading_a_file(tmp_path, secret):
    honest, _ = torch_files.save_torchscript(tmp_path / "honest.pt")
    return crafted_archives.torchscript_reading_a_file_first(honest, tmp_path / "evil.pt", secret)


def test_control_torch_jit_load_runs_the_first_copy_and_returns_the_file(torchscript_reading_a_file, secret):
    module = torch.jit.load(str(torchscript_reading_a_file))

    _, leaked = module(torch.zeros(1, 3, 8, 8))

    assert leaked.numpy().tobytes() == secret.read_bytes()


def test_torchscript_listing_its_code_twice_is_refused_before_loading(torchscript_reading_a_file, tmp_path):
    with pytest.raises(UserInputError, match=r"torch_files\.py' appears twice"):
        convert("torchscript", torchscript_reading_a_file, tmp_path / "out",
                inputs=[{"name": "x", "dtype": "float32", "shape": ["batch", 3, 8, 8]}])


def test_torchscript_listing_its_code_twice_fails_through_the_queue_and_no_file_leaks(
        cluster, producer_env, tmp_path, torchscript_reading_a_file, secret):
    job = run_job(tmp_path, "model: {name: evil-dup-ts, source: ./evil.pt, format: torchscript, "
                            "inputs: [{name: x, dtype: float32, shape: [batch, 3, 8, 8]}]}\n")

    assert_failed_in_convert(job, "code/__torch__/tests/models/torch_files.py' appears twice")
    assert_no_artifact_holds(secret.read_bytes())


# --- a whole archive read once ----------------------------------------------------------------


def test_honest_archives_convert_from_the_rewritten_copy(honest_program, tmp_path):
    result = convert("torch-exported", honest_program, tmp_path / "out")

    assert result.model_file == "model.onnx" and np.isfinite(result.reference["output"]).all()


@pytest.mark.parametrize("hidden", ["prepended", "appended"])
def test_pt2_with_bytes_no_member_lists_is_refused(honest_program, tmp_path, hidden):
    data = honest_program.read_bytes()
    evil = tmp_path / "evil.pt2"
    evil.write_bytes(b"#!/bin/sh\n" + data if hidden == "prepended" else data + b"PK\x03\x04hidden")

    with pytest.raises(UserInputError, match="prepended or hidden data|bytes after its end record"):
        convert("torch-exported", evil, tmp_path / "out")
