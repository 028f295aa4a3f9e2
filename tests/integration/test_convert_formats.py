"""Each PyTorch source format converts in an end-to-end job through the queue, with its fidelity
figures in the job record's convert stage (what ``modelyard status`` shows).

Models are small: ResNet-18 (seeded random init) at 2x3x64x64 via torch-state-dict (safetensors,
factory tests.models.resnet:resnet18, allowed for the test workers in tests/conftest.py) and via
torch-exported (.pt2), and a small TorchScript CNN. The three jobs are submitted together.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer import api

pytestmark = [pytest.mark.integration, pytest.mark.heavy,
              pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")]

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

INPUTS = "inputs: [{name: x, dtype: float32, shape: [batch, 3, 64, 64]}]"
CONVERT = "convert: {to: onnx, opset: 17, samples: {batch: 2}, tolerance: {max_abs: 1.0e-3, cosine_min: 0.999}}"
FORMATS = ("torch-state-dict", "torch-exported", "torchscript")


def _jobs(folder: Path) -> dict[str, Path]:
    from tests.models import torch_files

    resnet = torch_files.seeded_resnet18(0)
    torch_files.save_safetensors(resnet, folder / "resnet18.safetensors")
    torch_files.save_program(resnet, folder / "resnet18.pt2")
    torch_files.save_torchscript(folder / "small.pt")
    texts = {
        "torch-state-dict": f"model: {{name: resnet-sd, source: ./resnet18.safetensors, format: torch-state-dict, "
                            f"factory: 'tests.models.resnet:resnet18', {INPUTS}}}\n{CONVERT}\n",
        "torch-exported": f"model: {{name: resnet-pt2, source: ./resnet18.pt2, format: torch-exported}}\n{CONVERT}\n",
        "torchscript": f"model: {{name: small-ts, source: ./small.pt, format: torchscript, {INPUTS}}}\n{CONVERT}\n",
    }
    jobs = {}
    for fmt, text in texts.items():
        jobs[fmt] = folder / f"{fmt}.yaml"
        jobs[fmt].write_text(text)
    return jobs


@pytest.fixture(scope="module")
def finished(cluster, producer_env, tmp_path_factory) -> dict[str, dict]:
    jobs = _jobs(tmp_path_factory.mktemp("torch-formats"))
    ids = {fmt: api.submit(path) for fmt, path in jobs.items()}
    return {fmt: api.wait(job_id, timeout=600) for fmt, job_id in ids.items()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_job_succeeds_with_fidelity_within_tolerance_in_the_convert_stage(finished, fmt):
    job = finished[fmt]
    assert job["state"] == "SUCCEEDED", job.get("error")
    convert = job["stages"]["convert"]
    fidelity = convert["metrics"]["fidelity"]
    assert fidelity["max_abs"] <= 1e-3
    assert fidelity["cosine_min"] >= 0.999
    assert convert["metrics"]["seconds"] > 0
    assert {f["path"] for f in convert["files"]} >= {"model.onnx", "samples.npz", "reference.npz"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_jobs_onnx_model_runs_at_batch_1_and_3(finished, fmt, tmp_path):
    import numpy as np

    from shared.inference.runtime import load_session
    from shared.storage import FileRef, open_store

    job = finished[fmt]
    store = open_store(job["artifact_store"])
    ref = next(f for f in job["stages"]["convert"]["files"] if f["path"] == "model.onnx")
    session = load_session(store.get_file(FileRef.from_dict(ref), tmp_path / "model.onnx"))
    for batch in (1, 3):
        out = session.run({"x": np.zeros((batch, 3, 64, 64), dtype=np.float32)})
        assert next(iter(out.values())).shape[0] == batch


def test_status_json_shows_the_convert_fidelity(finished, producer_env):
    from typer.testing import CliRunner

    from producer.cli import app

    job = finished["torch-exported"]
    result = CliRunner().invoke(app, ["status", job["id"], "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["stages"]["convert"]["metrics"]["fidelity"]["cosine_min"] >= 0.999
