"""Compress: MiniLM 6 → 3 layers distilled on generated sentences; a digits CNN pruned 50% and distilled;
a training stage killed with SIGKILL resumes from its last epoch checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shared.settings import Settings
from tests.compress_jobs import context, record_job
from tests.data_gen import write_corpus
from tests.services import ROOT

pytestmark = pytest.mark.heavy
CORPUS_SENTENCES = 3000


def settings_for(redis_server, store: Path) -> Settings:
    return Settings(broker_url=redis_server.url, artifact_store=store.as_uri(), lease_ttl_s=5)


@pytest.fixture(scope="module")
def minilm_student(redis_server, minilm_dir, tmp_path_factory) -> dict:
    """The compress stage run in this process: MiniLM keep 3 of 6 layers, distilled 2 epochs."""
    from worker.stages.compress import run_compress

    folder = tmp_path_factory.mktemp("minilm-compress")
    corpus = write_corpus(folder / "corpus.txt", CORPUS_SENTENCES)
    store = folder / "artifacts"
    job = f"""
model: {{name: minilm, source: {minilm_dir}, format: hf-transformers, task: feature-extraction}}
compress:
  prune: {{method: layers, keep: 3}}
  distill: {{data: ./corpus.txt, epochs: 2, batch_size: 16, lr: 5.0e-4}}
"""
    job_id = record_job(redis_url=redis_server.url, store_uri=store.as_uri(), job_text=job, source=minilm_dir,
                        data=corpus)
    ctx = context(job_id, settings_for(redis_server, store))
    started = time.perf_counter()
    manifest, _ = run_compress(ctx)
    seconds = time.perf_counter() - started
    student = folder / "student"
    ctx.store.get_files(manifest.files, student)
    return {"manifest": manifest, "folder": student, "seconds": seconds, "record": ctx.jobs.get(job_id)}


def test_student_keeps_three_layers_and_about_half_the_encoder_parameters(minilm_student):
    parameters = minilm_student["manifest"].metrics["parameters"]
    config = json.loads((minilm_student["folder"] / "config.json").read_text())
    print(f"\nencoder parameters: teacher {parameters['teacher_encoder']:,} student {parameters['student_encoder']:,}"
          f" ({minilm_student['seconds']:.0f} s to prune and distill)")
    assert config["num_hidden_layers"] == 3
    assert 0.45 < parameters["student_encoder"] / parameters["teacher_encoder"] < 0.55


def test_distillation_raises_the_students_cosine_to_the_teacher(minilm_student):
    distill = minilm_student["manifest"].metrics["distill"]
    before, after = distill["before_distillation"], distill["after_distillation"]
    print(f"\nheld-out cosine vs teacher: pruned mean {before['cosine_mean']:.4f} min {before['cosine_min']:.4f}"
          f" -> distilled mean {after['cosine_mean']:.4f} min {after['cosine_min']:.4f}")
    assert after["cosine_mean"] > before["cosine_mean"] + 0.05
    assert after["cosine_min"] > before["cosine_min"]


def test_training_progress_is_recorded_in_the_job_record(minilm_student):
    progress = minilm_student["record"]["stages"]["compress"]["progress"]
    assert progress["epoch"] == 2 and progress["step"] == progress["steps"] and progress["loss"] > 0


def test_student_is_faster_than_the_teacher_in_onnx_runtime(minilm_student, minilm_dir, tmp_path):
    """Both exports measured in the same run, interleaved: a ratio, not a time."""
    from shared.inference.latency import measure
    from shared.inference.runtime import load_session

    teacher, samples = _export(minilm_dir, tmp_path / "teacher")
    student, _ = _export(minilm_student["folder"], tmp_path / "student")
    sessions = {"teacher": load_session(teacher, threads=2), "student": load_session(student, threads=2)}
    p50 = {name: [] for name in sessions}
    for _ in range(3):
        for name, session in sessions.items():
            p50[name].append(measure(session, samples, runs=10, warmup=2)["p50_ms"])
    teacher_ms, student_ms = min(p50["teacher"]), min(p50["student"])
    print(f"\nONNX Runtime p50, batch 8 x seq 128, 2 threads: teacher {teacher_ms:.1f} ms, student {student_ms:.1f} ms")
    assert student_ms < 0.75 * teacher_ms


def _export(folder: Path, workdir: Path) -> tuple[Path, dict]:
    from shared.jobspec import ConvertSpec, ModelSpec
    from worker.plugins import registry
    from worker.plugins.base import ConvertRequest

    workdir.mkdir()
    model = ModelSpec(name="m", source=str(folder), format="hf-transformers", task="feature-extraction")
    result = registry.converter("hf-transformers").convert(ConvertRequest(
        source=folder, model=model, convert=ConvertSpec(), workdir=workdir, settings=Settings()))
    return workdir / result.model_file, result.samples


# -- a CNN on load_digits ------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    import torch
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    from tests.compress_models import train_digits_cnn

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    order = np.random.default_rng(0).permutation(len(images))
    train, test = order[:1400], order[1400:]
    torch.set_num_threads(1)
    teacher = train_digits_cnn(images[train], data.target[train].astype(np.int64), epochs=8)
    folder = tmp_path_factory.mktemp("digits")
    save_file(teacher.state_dict(), str(folder / "teacher.safetensors"))
    np.savez(folder / "unlabelled.npz", x=images[train])  # no labels: the student learns from the teacher
    return {"folder": folder, "images": images[test], "labels": data.target[test]}


def _accuracy(model, images, labels) -> float:
    import torch

    with torch.no_grad():
        return float((model.eval()(torch.from_numpy(images)).argmax(1).numpy() == labels).mean())


@pytest.fixture(scope="module")
def digits_student(digits, redis_server, tmp_path_factory) -> dict:
    from safetensors.torch import load_file

    from worker.compress import cnn
    from worker.stages.compress import run_compress

    folder = digits["folder"]
    store = tmp_path_factory.mktemp("digits-artifacts")
    job = """
model: {name: digits, source: ./teacher.safetensors, format: torch-state-dict,
        factory: "tests.compress_models:digits_cnn",
        inputs: [{name: x, dtype: float32, shape: [batch, 1, 8, 8]}]}
compress:
  prune: {method: channels, keep: 0.5}
  distill: {data: ./unlabelled.npz, epochs: 10, batch_size: 64, lr: 3.0e-3, temperature: 4.0}
"""
    job_id = record_job(redis_url=redis_server.url, store_uri=store.as_uri(), job_text=job,
                        source=folder / "teacher.safetensors", data=folder / "unlabelled.npz")
    settings = settings_for(redis_server, store).model_copy(update={"allowed_factories": ["tests.compress_models:*"]})
    ctx = context(job_id, settings)
    manifest, _ = run_compress(ctx)
    out = tmp_path_factory.mktemp("digits-student")
    ctx.store.get_files(manifest.files, out)
    student = cnn.build(json.loads((out / cnn.ARCHITECTURE).read_text()))
    student.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    return {"manifest": manifest, "student": student, "ctx": ctx}


def test_channel_pruned_cnn_has_fewer_parameters_and_rebuilds_from_its_architecture(digits_student):
    parameters = digits_student["manifest"].metrics["parameters"]
    print(f"\ndigits CNN parameters: teacher {parameters['teacher']:,} student {parameters['student']:,}")
    assert parameters["student"] < 0.35 * parameters["teacher"]
    assert sum(p.numel() for p in digits_student["student"].parameters()) == parameters["student"]


def test_channel_pruning_50_percent_and_distillation_keep_accuracy_within_2_points(digits, digits_student):
    from tests.compress_models import digits_cnn
    from worker.support.torch_weights import load_weights

    teacher = digits_cnn()
    teacher.load_state_dict(load_weights(digits["folder"] / "teacher.safetensors", "teacher"))
    teacher_acc = _accuracy(teacher, digits["images"], digits["labels"])
    student_acc = _accuracy(digits_student["student"], digits["images"], digits["labels"])
    print(f"\ndigits accuracy (held-out 397 images): teacher {teacher_acc:.4f} student {student_acc:.4f}")
    assert student_acc >= teacher_acc - 0.02


def test_convert_rebuilds_the_pruned_cnn_and_measures_it_against_the_teacher(digits_student):
    from worker.stages.convert import run_convert

    ctx = digits_student["ctx"]
    manifest, _ = run_convert(ctx, digits_student["manifest"].step_key)
    assert manifest.info["reference"] == "teacher" and manifest.info["factory"] == "worker.compress.cnn:build"
    assert manifest.metrics["fidelity"]["max_abs"] < 1e-3  # ONNX student vs torch student
    assert manifest.metrics["teacher_fidelity"]["cosine_mean"] < 0.9999  # the student is not the teacher


# -- resume after kill -9 --------------------------------------------------------------------

def test_compress_killed_after_its_first_epoch_checkpoint_resumes_at_epoch_2(redis_server, minilm_dir, tmp_path):
    from shared.jobs import JobStore

    corpus = write_corpus(tmp_path / "corpus.txt", 150, seed=1)
    store = tmp_path / "artifacts"
    job = f"""
model: {{name: minilm, source: {minilm_dir}, format: hf-transformers, task: feature-extraction}}
compress:
  prune: {{method: layers, keep: 2}}
  distill: {{data: ./corpus.txt, epochs: 2, batch_size: 16, lr: 1.0e-4, sequence: 32}}
"""
    job_id = record_job(redis_url=redis_server.url, store_uri=store.as_uri(), job_text=job, source=minilm_dir,
                        data=corpus)
    env = {**os.environ, "MODELYARD_BROKER_URL": redis_server.url, "MODELYARD_ARTIFACT_STORE": store.as_uri(),
           "MODELYARD_LEASE_TTL_S": "5", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "tests.compress_jobs", job_id]
    first = subprocess.Popen([*command, "--pause-after-epoch", "1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = ""
        while "checkpointed epoch 1" not in line:
            line = first.stdout.readline()
            assert line or first.poll() is None, "the first run ended before its epoch-1 checkpoint"
        assert list((store / "checkpoints").glob("*.json")), "no checkpoint in the artifact store"
        os.killpg(first.pid, signal.SIGKILL)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL

    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    progress = JobStore.from_url(redis_server.url).get(job_id)["stages"]["compress"]["progress"]
    print(f"\nresumed run: start epoch {result['metrics']['distill']['start_epoch']}, "
          f"history {result['metrics']['distill']['history']}")
    assert result["metrics"]["distill"]["start_epoch"] == 2
    assert progress["start_epoch"] == 2 and progress["resumed"] is True
    assert [h["epoch"] for h in result["metrics"]["distill"]["history"]] == [1, 2]
    assert not list((store / "checkpoints").glob("*.json")), "the finished step leaves no checkpoint behind"


def test_a_checkpoint_not_signed_by_the_workers_is_ignored_and_a_signed_one_resumes(tmp_path):
    torch = pytest.importorskip("torch")
    from shared.storage import open_store
    from worker.compress.distill import Checkpoint
    from worker.stages.compress import Checkpoints, checkpoint_key

    store = open_store((tmp_path / "store").as_uri())
    key, signing_key = "s" * 64, b"workers-only"
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = Checkpoint(epoch=1, student=model.state_dict(), optimizer=optimizer.state_dict(), history=[{"epoch": 1}])

    Checkpoints(store, key, tmp_path / "a", signing_key).save(saved)
    resumed = Checkpoints(store, key, tmp_path / "b", signing_key).load()
    assert resumed.epoch == 1 and torch.equal(resumed.student["weight"], model.state_dict()["weight"])

    record = store.read_json(checkpoint_key(key))
    store.write_json(checkpoint_key(key), {**record, "epoch": 7})  # a submitter steering the resume point
    assert Checkpoints(store, key, tmp_path / "c", signing_key).load() is None
    Checkpoints(store, key, tmp_path / "d", None).save(saved)  # written without the key
    assert Checkpoints(store, key, tmp_path / "e", signing_key).load() is None
