"""The whole road: producer → Redis → cpu/gpu worker processes → artifact store → model repository."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest

from producer import api
from shared.repository import ModelRepository

pytestmark = [pytest.mark.integration, pytest.mark.heavy]
HOST = socket.gethostname()


def write_job(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def minilm_job(tmp_path_factory, minilm_dir) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("minilm-job")
    repo = folder / "model-repo"
    job = write_job(folder, "minilm", f"""
model: {{name: minilm, source: {minilm_dir}, format: hf-transformers, task: feature-extraction}}
convert: {{to: onnx, opset: 17}}
optimize:
  variants:
    - int8-dynamic
    - fp16
    - {{id: int8-per-tensor, of: int8-dynamic, params: {{per_channel: false, smooth: false, weight_type: int8}}}}
  gate: {{cosine_min: 0.99}}
  objective: size  # deterministic on a shared machine; the latency rule is tested in tests/unit/test_select.py
deploy: {{repository: file://./model-repo, alias: production}}
device: gpu
""")
    return job, repo


@pytest.fixture(scope="module")
def minilm_result(cluster, minilm_job, producer_env):
    job_file, _repo = minilm_job
    return api.wait(api.submit(job_file), timeout=900)


def test_minilm_job_deploys_an_int8_model_about_4x_smaller_that_passes_the_gate(minilm_result, minilm_job):
    job = minilm_result
    assert job["state"] == "SUCCEEDED", job.get("error")
    table = {row["variant"]: row for row in job["stages"]["select"]["table"]}
    assert job["result"]["variant"] == "int8-dynamic"
    int8 = table["int8-dynamic"]
    assert int8["size_bytes"] / table["fp32"]["size_bytes"] < 0.3
    assert int8["cosine_min"] >= 0.99  # on the held-out rows no optimizer saw
    assert int8["gate_rows"] == 2 and int8["calibration_rows"] == 6
    assert int8["ratio_low"] <= int8["ratio"] <= int8["ratio_high"] and int8["rounds"] >= 3  # timed beside fp32
    hardware = job["stages"]["select"]["hardware"]
    assert int8["hardware_class"] == hardware["class"] and hardware["provider"] == "CPUExecutionProvider"
    _job_file, repo_dir = minilm_job
    repo = ModelRepository.open(repo_dir.as_uri())
    version = repo.resolve("minilm", "production")
    manifest = repo.manifest("minilm", version)
    assert (repo_dir / "minilm" / str(version) / "model.onnx").stat().st_size == int8["size_bytes"]
    assert (repo_dir / "minilm" / "config.pbtxt").read_text().count("TYPE_INT64") == 3
    assert manifest["lineage"]["source_digest"] == job["source"]["digest"]
    assert manifest["lineage"]["hardware"] == hardware and manifest["lineage"]["measurement"]["rounds"] >= 3
    assert set(manifest["lineage"]["stages"]) >= {"convert", "optimize:int8-dynamic", "select"}


def test_a_per_tensor_int8_variant_is_rejected_by_the_gate_with_its_measured_cosine(minilm_result):
    verdict = {row["variant"]: row["verdict"] for row in minilm_result["stages"]["select"]["table"]}
    assert verdict["int8-per-tensor"].startswith("rejected: cosine_min 0.")
    assert "< gate 0.99" in verdict["int8-per-tensor"]


def test_gpu_benefiting_variant_runs_on_the_gpu_worker_and_the_rest_on_the_cpu_worker(minilm_result):
    stages = minilm_result["stages"]
    assert stages["optimize:fp16"]["worker"] == f"gpu@{HOST}"
    assert stages["optimize:int8-dynamic"]["worker"] == f"cpu@{HOST}"
    assert stages["convert"]["worker"] == f"cpu@{HOST}"


def test_convert_records_reference_outputs_and_its_own_fidelity(minilm_result):
    convert = minilm_result["stages"]["convert"]
    assert {f["path"] for f in convert["files"]} >= {"model.onnx", "samples.npz", "reference.npz"}
    assert convert["metrics"]["fidelity"]["max_abs"] < 1e-3


def test_resubmitted_identical_job_recomputes_no_stage(minilm_result, minilm_job, producer_env):
    job_file, _ = minilm_job
    again = api.wait(api.submit(job_file), timeout=300)
    assert again["state"] == "SUCCEEDED", again.get("error")
    computed = {name: s["state"] for name, s in again["stages"].items() if name.startswith(("convert", "optimize"))}
    assert set(computed.values()) == {"cached"}, computed
    assert again["stages"]["deploy"]["reused"] is True
    assert again["stages"]["deploy"]["version"] == minilm_result["stages"]["deploy"]["version"]


def test_corrupt_model_fails_the_job_with_a_clear_message_and_the_worker_keeps_serving(
    cluster, producer_env, tmp_path
):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    job = write_job(tmp_path, "bad", """
model: {name: broken, source: ./broken.onnx, format: onnx, inputs: [{name: x, dtype: float32, shape: [batch, 4]}]}
""")
    failed = api.wait(api.submit(job), timeout=300)
    assert failed["state"] == "FAILED"
    assert "broken.onnx" in failed["error"] or "model.onnx" in failed["error"]
    assert failed["stages"]["convert"]["state"] == "failed"

    good = tmp_path / "good.onnx"
    _tiny_onnx(good)
    ok = write_job(tmp_path, "good", "model: {name: tiny, source: ./good.onnx, format: onnx}\n")
    served = api.wait(api.submit(ok), timeout=300)
    assert served["state"] == "SUCCEEDED", served.get("error")
    assert all(w.process.poll() is None for w in cluster.workers)


def _tiny_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_status_json_shows_stage_states_artifacts_and_metrics(minilm_result, producer_env):
    from typer.testing import CliRunner

    from producer.cli import app

    result = CliRunner().invoke(app, ["status", minilm_result["id"], "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["state"] == "SUCCEEDED"
    assert shown["stages"]["deploy"]["uri"].endswith(f"/minilm/{shown['stages']['deploy']['version']}/")


def test_a_job_requiring_improvement_whose_every_variant_fails_the_gate_ends_failed_with_the_measured_values(
    minilm_result, minilm_job, producer_env
):
    job_file, _ = minilm_job
    strict = job_file.with_name("strict.yaml")
    # fp16 keeps cosine 1.0000 on MiniLM: max_abs is what rejects it (not a race against fp32's latency)
    # optimize.require_improvement: true, or the job would deploy fp32 ("no variant passed the gate; deployed fp32")
    strict.write_text(job_file.read_text().replace("cosine_min: 0.99}", "cosine_min: 0.99999, max_abs: 1.0e-6}")
                      .replace("  objective: size", "  require_improvement: true\n  objective: size")
                      .replace("alias: production", "alias: strict"))
    job = api.wait(api.submit(strict), timeout=600)
    assert job["state"] == "FAILED"
    assert job["error"].startswith("select: no variant") and "fp16 (rejected: " in job["error"]
    verdicts = {row["variant"]: row["verdict"] for row in job["stages"]["select"]["table"]}
    assert verdicts["fp32"] == "baseline" and verdicts["fp16"].startswith("rejected")
    assert "deploy" not in job["stages"]
    repo = ModelRepository.open(minilm_job[1].as_uri())
    assert "strict" not in repo.aliases("minilm")


def test_the_minilm_job_deploys_to_gs_and_is_served_over_the_v2_protocol(minilm_result, minilm_job, producer_env,
                                                                         tmp_path):
    from fastapi.testclient import TestClient

    from serving import create_app
    from tests.storage_fixtures import unique_bucket

    job_file, _ = minilm_job
    uri = f"gs://{unique_bucket()}/repo"
    gs_job = job_file.with_name("gs.yaml")
    gs_job.write_text(job_file.read_text().replace("file://./model-repo", uri))
    job = api.wait(api.submit(gs_job), timeout=300)
    assert job["state"] == "SUCCEEDED", job.get("error")
    assert job["stages"]["deploy"]["uri"] == f"{uri}/minilm/1/"

    ids = np.full((1, 16), 2023, dtype=np.int64)
    ids[0, 0], ids[0, -1] = 101, 102
    body = {"inputs": [
        {"name": name, "shape": [1, 16], "datatype": "INT64", "data": value.ravel().tolist()}
        for name, value in (("input_ids", ids), ("attention_mask", np.ones_like(ids)),
                            ("token_type_ids", np.zeros_like(ids)))
    ]}
    app = create_app(uri, "minilm", "production", poll_interval=60, cache_dir=tmp_path / "cache", threads=2)
    with TestClient(app) as client:
        assert client.get("/v2/health/ready").status_code == 200
        response = client.post("/v2/models/minilm/infer", json=body)
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["shape"] == [1, 16, 384] and response.json()["model_version"] == "1"


def test_report_prints_the_variant_table_and_writes_an_html_chart(minilm_result, producer_env, tmp_path):
    from typer.testing import CliRunner

    from producer.cli import app

    page = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", minilm_result["id"], "--json", "--html", str(page)])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert {r["variant"] for r in rows} == {"fp32", "int8-dynamic", "fp16", "int8-per-tensor"}
    text = page.read_text()
    assert 'id="variant-chart"' in text and "int8-per-tensor" in text  # the chart, and the table below it
    from producer.report import variant_rows
    from producer.variant_chart import variant_figure

    rows = variant_rows(api.status(minilm_result["id"]))
    figure = variant_figure(minilm_result, rows, 0.99)  # what the page draws, as data
    labels = " ".join(annotation.text for annotation in figure.layout.annotations)
    timed = [r["variant"] for r in rows if r.get("p50_ms") is not None and r.get("cosine_min") is not None]
    assert "fp32" in timed and all(variant in labels for variant in timed), (timed, labels)
    assert "gate: cosine-min ≥ 0.99" in labels


def test_the_deployed_manifest_carries_the_variant_table(minilm_result, minilm_job):
    repo = ModelRepository.open(minilm_job[1].as_uri())
    manifest = repo.manifest("minilm", minilm_result["stages"]["deploy"]["version"])
    assert {r["variant"] for r in manifest["lineage"]["variants"]} >= {"fp32", "int8-dynamic"}
