"""A job with compress + optimize + deploy through the queue: the student is gated against the teacher.

MiniLM as a sentence encoder (task sentence-embedding: what all-MiniLM-L6-v2 is for) keeps 3 of its
6 layers, is distilled on 10,000 generated sentences and must reach a cosine of 0.95 or more
against the teacher's sentence embeddings on 64 held-out sentences of the same kind, as INT8.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from producer import api
from shared.repository import ModelRepository
from tests.data_gen import held_out, sentences

pytestmark = [pytest.mark.integration, pytest.mark.heavy]
HOST = socket.gethostname()
GATE = 0.95  # cosine_min of the INT8 student's sentence embeddings against the teacher's


@pytest.fixture(scope="module")
def compress_job(tmp_path_factory, minilm_dir) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("minilm-compress-job")
    corpus = sentences(10_000, seed=3)
    (folder / "corpus.txt").write_text("\n".join(corpus) + "\n")
    (folder / "held-out.txt").write_text("\n".join(held_out(corpus, 64)) + "\n")
    job = folder / "minilm-student.yaml"
    job.write_text(f"""
model: {{name: minilm-student, source: {minilm_dir}, format: hf-transformers, task: sentence-embedding,
        samples: ./held-out.txt}}
compress:
  prune: {{method: layers, keep: 3}}
  distill: {{data: ./corpus.txt, epochs: 2, batch_size: 64, lr: 2.0e-4}}
convert: {{to: onnx, opset: 17}}
optimize:
  variants: [int8-dynamic]
  gate: {{cosine_min: {GATE}}}
  objective: size
deploy: {{repository: file://./model-repo, alias: production}}
device: gpu
""")
    return job, folder / "model-repo"


@pytest.fixture(scope="module")
def compress_result(cluster, compress_job, producer_env) -> dict:
    job_file, _ = compress_job
    return api.wait(api.submit(job_file), timeout=1800)


def test_compressed_student_passes_the_teacher_gate_and_is_deployed(compress_result, compress_job):
    job = compress_result
    assert job["state"] == "SUCCEEDED", job.get("error")
    table = {row["variant"]: row for row in job["stages"]["select"]["table"]}
    print(f"\nsentence embeddings vs the teacher's, 64 held-out sentences: fp32 student cosine_min "
          f"{table['fp32']['cosine_min']:.4f}, int8 student {table['int8-dynamic']['cosine_min']:.4f}")
    assert job["result"]["variant"] == "int8-dynamic"
    assert table["int8-dynamic"]["cosine_min"] >= GATE
    _, repo_dir = compress_job
    repo = ModelRepository.open(repo_dir.as_uri())
    version = repo.resolve("minilm-student", "production")
    assert set(repo.manifest("minilm-student", version)["lineage"]["stages"]) >= {"compress", "convert", "select"}


def test_compress_runs_on_the_gpu_pool_before_convert_and_records_its_training(compress_result):
    stages = compress_result["stages"]
    compress = stages["compress"]
    assert compress["state"] == "done" and compress["worker"] == f"gpu@{HOST}"
    assert compress["metrics"]["distill"]["history"][-1]["epoch"] == 2
    parameters = compress["metrics"]["parameters"]
    assert parameters["student_encoder"] < 0.55 * parameters["teacher_encoder"]
    assert compress["progress"]["step"] == compress["progress"]["steps"]
    assert compress_result["queues"]["compress"] == "gpu"
    assert list(compress_result["queues"])[:2] == ["compress", "convert"]


def test_convert_references_the_teacher_and_checks_the_student_conversion(compress_result):
    convert = compress_result["stages"]["convert"]
    assert convert["metrics"]["fidelity"]["max_abs"] < 1e-3  # ONNX student vs torch student
    teacher = convert["metrics"]["teacher_fidelity"]  # torch student vs torch teacher
    assert GATE <= teacher["cosine_min"] < 0.9999
