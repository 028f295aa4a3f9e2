"""Keras and SavedModel jobs through the queue: convert, TFLite variants, deploy.

The digits CNN (tests/digits.py) is trained once in the test process; the workers are the
session's ``cluster``. The job's samples are the digits test split, so the reference outputs
are Keras's on it and each variant's accuracy can be measured on the same rows.

The first job is a torch (MiniLM) conversion on the cpu worker: the TF jobs after it run in
the same prefork child (concurrency 1), the case where mixing frameworks could hang.
"""

from __future__ import annotations

import socket
import tarfile
import tempfile
from pathlib import Path

import pytest

from producer import api
from shared.manifest import load_manifest
from shared.repository import ModelRepository
from shared.storage import open_store
from tests import digits as digits_data
from tests.conftest import require

pytestmark = [pytest.mark.integration, pytest.mark.heavy]
HOST = socket.gethostname()
VARIANTS = ["float16", "dynamic-range", "int8"]


def write_job(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def run_job(job_file: Path, timeout: float = 600) -> dict:
    return api.wait(api.submit(job_file), timeout=timeout)


def step_accuracy(job: dict, stage: str, digits: digits_data.Digits) -> float:
    """Download a step's model from the artifact store and measure its test-split accuracy."""
    from shared.inference.runtime import load_session

    store = open_store(job["artifact_store"])
    manifest = load_manifest(store, job["stages"][stage]["step_key"])
    with tempfile.TemporaryDirectory() as tmp:
        model = [f for f in manifest.files if f.path == manifest.info["model_file"]]
        folder = store.get_files(model, Path(tmp))
        outputs = load_session(folder / manifest.info["model_file"]).run({digits_data.INPUT: digits.x_test})
    return digits.accuracy(next(iter(outputs.values())))


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> digits_data.Digits:
    for module in ("tensorflow", "tf2onnx", "ai_edge_litert", "sklearn"):
        require(module)
    return digits_data.train(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def torch_job_first(cluster, producer_env, minilm_dir, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("torch-first")
    job = write_job(folder, "minilm", f"""
model: {{name: minilm-torch-first, source: {minilm_dir}, format: hf-transformers, task: feature-extraction}}
convert: {{to: onnx, samples: {{batch: 2, sequence: 16}}}}
""")
    return run_job(job)


@pytest.fixture(scope="module")
def job_folder(digits, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tf-jobs")
    digits.write_test_split(folder / "test_split.npz")
    digits.write_test_split(folder / "eval.npz", labels=True)
    return folder


@pytest.fixture(scope="module")
def tflite_job(torch_job_first, job_folder, digits) -> dict:
    job = write_job(job_folder, "digits-tflite", f"""
model: {{name: digits, source: {digits.keras_file}, format: keras, samples: ./test_split.npz,
         eval_data: ./eval.npz}}
convert: {{to: tflite}}
optimize:
  variants: [{", ".join(VARIANTS)}]
  gate: {{cosine_min: 0.95, top1_min: 0.97, accuracy_drop_max: 0.01}}
  objective: size
deploy: {{repository: file://./model-repo, alias: production}}
""")
    return run_job(job)


def test_the_torch_job_before_the_tf_jobs_succeeded_on_the_cpu_worker(torch_job_first):
    assert torch_job_first["state"] == "SUCCEEDED", torch_job_first.get("error")
    assert torch_job_first["stages"]["convert"]["worker"] == f"cpu@{HOST}"


def test_keras_tflite_job_succeeds_on_the_cpu_worker_after_a_torch_job(tflite_job):
    assert tflite_job["state"] == "SUCCEEDED", tflite_job.get("error")
    assert tflite_job["stages"]["convert"]["worker"] == f"cpu@{HOST}"


def test_keras_tflite_conversion_reports_its_fidelity(tflite_job):
    fidelity = tflite_job["stages"]["convert"]["metrics"]["fidelity"]

    assert fidelity["cosine_min"] >= 0.9999
    assert fidelity["top1_agreement"] == 1.0


@pytest.mark.parametrize("variant", ["fp32", *VARIANTS])
def test_every_tflite_variant_keeps_accuracy_within_one_point_of_keras(tflite_job, digits, variant):
    accuracy = step_accuracy(tflite_job, f"optimize:{variant}", digits)

    assert abs(accuracy - digits.keras_accuracy) <= 0.01


@pytest.mark.parametrize("variant", ["fp32", *VARIANTS])
def test_every_tflite_variant_reports_an_accuracy_within_one_point_of_keras(tflite_job, digits, variant):
    table = {row["variant"]: row for row in tflite_job["stages"]["select"]["table"]}

    assert abs(table[variant]["accuracy"] - digits.keras_accuracy) <= 0.01
    assert tflite_job["stages"][f"optimize:{variant}"]["metrics"]["eval_rows"] == len(digits.y_test)


def test_tflite_variants_are_smaller_than_fp32(tflite_job):
    table = {row["variant"]: row for row in tflite_job["stages"]["select"]["table"]}

    for variant in VARIANTS:
        assert table[variant]["size_bytes"] < table["fp32"]["size_bytes"], variant


def test_deployed_tflite_model_has_a_triton_config_and_no_saved_model(tflite_job, job_folder):
    repo_dir = job_folder / "model-repo"
    repo = ModelRepository.open(repo_dir.as_uri())
    version = repo.resolve("digits", "production")
    files = sorted(p.name for p in (repo_dir / "digits" / str(version)).iterdir())

    assert "model.tflite" in files and "saved_model" not in files
    assert 'backend: "tflite"' in (repo_dir / "digits" / "config.pbtxt").read_text()


def test_keras_onnx_job_converts_with_the_test_accuracy_of_keras(torch_job_first, job_folder, digits):
    job = run_job(write_job(job_folder, "digits-onnx", f"""
model: {{name: digits-onnx, source: {digits.keras_file}, format: keras, samples: ./test_split.npz}}
convert: {{to: onnx}}
"""))

    assert job["state"] == "SUCCEEDED", job.get("error")
    assert abs(step_accuracy(job, "convert", digits) - digits.keras_accuracy) <= 0.005


def test_savedmodel_archive_job_converts_to_tflite(torch_job_first, job_folder, digits):
    import keras

    exported = job_folder / "digits_savedmodel"
    keras.saving.load_model(digits.keras_file).export(str(exported), verbose=False)
    archive = job_folder / "digits_savedmodel.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(exported, arcname="digits_savedmodel")
    job = run_job(write_job(job_folder, "digits-savedmodel", """
model: {name: digits-savedmodel, source: ./digits_savedmodel.tar.gz, format: tf-savedmodel, samples: ./test_split.npz}
convert: {to: tflite}
"""))

    assert job["state"] == "SUCCEEDED", job.get("error")
    assert abs(step_accuracy(job, "convert", digits) - digits.keras_accuracy) <= 0.005


def test_keras_file_with_a_lambda_layer_fails_the_job_and_its_code_never_runs(torch_job_first, job_folder, digits):
    import keras

    marker = job_folder / "pwned"
    payload = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")
    model = keras.Sequential([keras.Input((8, 8, 1), name="pixels"), keras.layers.Lambda(payload),
                              keras.layers.Flatten(), keras.layers.Dense(10)])
    model.save(job_folder / "evil.keras")
    marker.unlink()  # building the model above ran the payload here, in the test process

    job = run_job(write_job(job_folder, "evil", """
model: {name: evil, source: ./evil.keras, format: keras}
convert: {to: onnx}
"""))

    assert job["state"] == "FAILED"
    assert "safe_mode" in job["error"]
    assert not marker.exists()
