"""The repository as Triton reads it: every config.pbtxt parsed with Triton's own schema.

Deploy, promote, roll back and crash mid-deploy, then check that the model-level config would
make Triton load exactly the versions aliases point to, under a config that matches each one.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from google.protobuf import text_format

from shared.repository import ModelRepository
from shared.triton import TensorRT, TritonConfig, plan_served

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")

ONNX_IO = {
    "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
               {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]}],
    "outputs": [{"name": "last_hidden_state", "dtype": "float32", "shape": ["batch", "sequence", 384]}],
}
TFLITE_IO = {
    "inputs": [{"name": "pixels", "dtype": "float32", "shape": ["batch", 28, 28]}],
    "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}],
}


def parse(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def deploy(repo: ModelRepository, tmp: Path, model_format: str = "onnx", *, alias: str | None = "production",
           tensorrt: str | None = None) -> int:
    """What the deploy stage does: claim, publish (files, own config, manifest last), move the alias."""
    io = ONNX_IO if model_format == "onnx" else TFLITE_IO
    version = repo.claim_version("m", {"test": True})
    model = tmp / f"upload-{version}.{model_format}"
    model.write_bytes(f"weights of {version}".encode())
    files = {f"model.{model_format}": model}
    config = None
    if tensorrt:
        engine = tmp / f"engine-{version}"
        engine.write_bytes(b"engine")
        files["trt_cache/TensorrtExecutionProvider_0.engine"] = engine
        config = TritonConfig.for_model("m", model_format, io["inputs"], io["outputs"], tensorrt=TensorRT(
            precision=tensorrt, engine_cache=f"/mnt/models/m/{version}/trt_cache"))
    manifest = {"model": "m", "version": version, "model_file": f"model.{model_format}", "format": model_format, **io}
    repo.publish("m", version, files, manifest, config=config)
    if alias:
        repo.set_alias("m", alias, version, reason="deploy")
    return version


def triton_view(repo: ModelRepository, model: str = "m"):
    """The model-level config as Triton parses it, and the versions it would load."""
    config = parse(repo.store._read_bytes(f"{model}/config.pbtxt")[0].decode())
    assert config.name == model
    assert config.version_policy.WhichOneof("policy_choice") == "specific"
    return config, sorted(config.version_policy.specific.versions)


def assert_triton_loads_matching_versions(repo: ModelRepository, expected: list[int]) -> None:
    """Triton would load ``expected``; each is complete and the config is its own (but the version list)."""
    config, loaded = triton_view(repo)
    assert loaded == expected
    for version in loaded:
        assert version in repo.versions("m")  # complete: its manifest is written
        own = parse(repo.store._read_bytes(f"m/{version}/config.pbtxt")[0].decode())
        assert list(own.version_policy.specific.versions) == [version]
        own.version_policy.CopyFrom(config.version_policy)
        assert own == config, f"version {version} does not run under the model's config"
        suffix = "onnx" if config.platform == "onnxruntime_onnx" else config.backend
        assert repo.store.exists(f"m/{version}/model.{suffix}")


def test_each_version_carries_its_own_config_and_manifest_record(tmp_path):
    repo = ModelRepository.open((tmp_path / "repo").as_uri())
    v1 = deploy(repo, tmp_path, "onnx")
    v2 = deploy(repo, tmp_path, "tflite", alias="staging")
    own1 = parse(repo.store._read_bytes(f"m/{v1}/config.pbtxt")[0].decode())
    own2 = parse(repo.store._read_bytes(f"m/{v2}/config.pbtxt")[0].decode())
    assert own1.platform == "onnxruntime_onnx" and [i.name for i in own1.input] == ["input_ids", "attention_mask"]
    assert own2.backend == "tflite" and [i.name for i in own2.input] == ["pixels"] and list(own2.input[0].dims) == [
        28, 28]
    assert repo.manifest("m", v1)["served_by"] == ["modelyard serve", "triton"]
    assert repo.manifest("m", v2)["served_by"] == ["modelyard serve"]
    assert "served by `modelyard serve` only" in repo.store._read_bytes(f"m/{v2}/config.pbtxt")[0].decode()


def test_onnx_then_tflite_then_rollback_leaves_the_config_describing_v1(tmp_path):
    repo = ModelRepository.open((tmp_path / "repo").as_uri())
    v1 = deploy(repo, tmp_path, "onnx")
    assert_triton_loads_matching_versions(repo, [v1])

    v2 = deploy(repo, tmp_path, "tflite")
    config, loaded = triton_view(repo)
    assert loaded == [v2] and config.backend == "tflite" and config.input[0].name == "pixels"
    assert "Triton cannot load this model until production points at a version Triton serves" in \
        repo.store._read_bytes("m/config.pbtxt")[0].decode()

    assert repo.rollback("m", "production") == (v2, v1)
    config, _ = triton_view(repo)
    assert config.platform == "onnxruntime_onnx" and not config.backend
    assert [i.name for i in config.input] == ["input_ids", "attention_mask"]
    assert config.output[0].name == "last_hidden_state" and list(config.output[0].dims) == [-1, 384]
    assert_triton_loads_matching_versions(repo, [v1])


def test_a_crashed_deploy_is_never_listed(tmp_path):
    repo = ModelRepository.open((tmp_path / "repo").as_uri())
    v1 = deploy(repo, tmp_path)
    crashed = repo.claim_version("m", {"job_id": "crashed"})  # claimed, files half uploaded, no manifest
    partial = tmp_path / "partial.onnx"
    partial.write_bytes(b"half")
    repo.store.put_object(f"m/{crashed}/model.onnx", partial)
    v3 = deploy(repo, tmp_path, alias="staging")
    assert crashed not in repo.versions("m") and v3 == crashed + 1
    assert_triton_loads_matching_versions(repo, [v1, v3])
    repo.set_alias("m", "staging", v1)
    assert_triton_loads_matching_versions(repo, [v1])


def test_only_aliased_versions_are_listed_so_memory_does_not_grow_with_deploys(tmp_path):
    repo = ModelRepository.open((tmp_path / "repo").as_uri())
    versions = [deploy(repo, tmp_path) for _ in range(6)]
    assert_triton_loads_matching_versions(repo, [versions[-1]])
    repo.set_alias("m", "canary", versions[2], reason="promote")
    assert_triton_loads_matching_versions(repo, [versions[2], versions[-1]])


def test_an_alias_on_another_format_is_left_to_modelyard_serve(tmp_path):
    repo = ModelRepository.open((tmp_path / "repo").as_uri())
    v1 = deploy(repo, tmp_path, "onnx")
    deploy(repo, tmp_path, "tflite", alias="staging")
    assert_triton_loads_matching_versions(repo, [v1])
    text = repo.store._read_bytes("m/config.pbtxt")[0].decode()
    assert "Not loaded by Triton (modelyard serve serves it): staging -> 2, a tflite version" in text


def test_tensorrt_versions_carry_the_accelerator_and_their_own_engine_cache(tmp_path):
    repo = ModelRepository.open((tmp_path / "repo").as_uri())
    v1 = deploy(repo, tmp_path, "onnx")
    v2 = deploy(repo, tmp_path, "onnx", alias="canary", tensorrt="FP16")
    assert_triton_loads_matching_versions(repo, [v1])  # v2 needs its own engine: not under v1's config
    repo.set_alias("m", "production", v2, reason="promote")
    config, _ = triton_view(repo)
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {"precision_mode": "FP16", "trt_engine_cache_enable": "1",
                                            "trt_engine_cache_path": f"/mnt/models/m/{v2}/trt_cache"}
    assert_triton_loads_matching_versions(repo, [v2])
    assert repo.store.exists(f"m/{v2}/trt_cache/TensorrtExecutionProvider_0.engine")


def test_promote_and_rollback_from_the_cli_rewrite_the_config(tmp_path):
    from typer.testing import CliRunner

    from producer.cli import app

    repo = ModelRepository.open((tmp_path / "repo").as_uri())
    v1 = deploy(repo, tmp_path)
    v2 = deploy(repo, tmp_path, alias=None)
    assert CliRunner().invoke(app, ["promote", "m", str(v2), "-r", repo.uri]).exit_code == 0
    assert_triton_loads_matching_versions(repo, [v2])
    assert CliRunner().invoke(app, ["rollback", "m", "-r", repo.uri]).exit_code == 0
    assert_triton_loads_matching_versions(repo, [v1])


def test_an_old_all_versions_config_is_replaced_on_the_next_alias_move(tmp_path):
    repo = ModelRepository.open((tmp_path / "repo").as_uri())
    v1 = deploy(repo, tmp_path)
    repo.store._write_bytes("m/config.pbtxt", b'name: "m"\nversion_policy: { all { } }\n', if_generation=None)
    repo.set_alias("m", "production", v1)  # unchanged alias: the config is still brought up to date
    assert_triton_loads_matching_versions(repo, [v1])


def test_racing_alias_moves_leave_the_config_of_the_final_aliases(tmp_path):
    repo = ModelRepository.open((tmp_path / "repo").as_uri())
    versions = [deploy(repo, tmp_path, alias=None) for _ in range(4)]
    barrier = threading.Barrier(4)

    def move(alias: str, version: int) -> None:
        barrier.wait()
        repo.set_alias("m", alias, version)

    threads = [threading.Thread(target=move, args=(f"a{i}", v)) for i, v in enumerate(versions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert_triton_loads_matching_versions(repo, versions)


def test_without_any_alias_the_latest_version_stands_in():
    configs = {3: TritonConfig.for_model("m", "onnx", ONNX_IO["inputs"], ONNX_IO["outputs"])}
    plan = plan_served({}, configs, latest=3)
    assert plan.primary_alias is None and plan.versions == (3,)
    assert plan_served({}, {}, latest=None) is None


def test_without_production_the_alias_created_first_is_primary():
    onnx = TritonConfig.for_model("m", "onnx", ONNX_IO["inputs"], ONNX_IO["outputs"])
    tflite = TritonConfig.for_model("m", "tflite", TFLITE_IO["inputs"], TFLITE_IO["outputs"])
    aliases = {"staging": {"version": 2, "history": [{"at": 20.0}]},
               "canary": {"version": 1, "history": [{"at": 10.0}]}}
    plan = plan_served(aliases, {1: onnx, 2: tflite}, latest=2)
    assert plan.primary_alias == "canary" and plan.versions == (1,) and set(plan.left_out) == {"staging"}


@pytest.mark.parametrize("variant, files, expected", [
    ("trt-fp16", ["model.onnx", "trt_cache/a.engine"], TensorRT("FP16", "/models/m/7/trt_cache")),
    ("int8-static+trt-int8", ["model.onnx", "trt_cache/a.engine", "trt_cache/calibration.flatbuffers"],
     TensorRT("INT8", "/models/m/7/trt_cache", "calibration.flatbuffers")),
    ("fp16", ["model.onnx"], None),
    ("trt-fp16", ["model.onnx"], None),  # no engine was stored: plain ONNX
])
def test_the_deploy_stage_gives_tensorrt_variants_their_accelerator(variant, files, expected):
    from types import SimpleNamespace

    from shared.jobspec import VariantSpec
    from worker.stages.deploy import tensorrt_accelerator

    optimize = SimpleNamespace(variants=[VariantSpec(id=variant, of=variant)])
    ctx = SimpleNamespace(spec=SimpleNamespace(optimize=optimize),
                          settings=SimpleNamespace(triton_model_root="/models/"))
    assert tensorrt_accelerator(ctx, variant, dict.fromkeys(files, Path("x")), "m", 7) == expected


def test_triton_sync_copies_the_listed_versions_then_their_config(tmp_path):
    from typer.testing import CliRunner

    from producer.cli import app
    from serving.triton_sync import sync_once

    repo = ModelRepository.open((tmp_path / "repo").as_uri())
    v1 = deploy(repo, tmp_path)
    deploy(repo, tmp_path, "tflite", alias="staging")
    v3 = deploy(repo, tmp_path, alias="canary", tensorrt="FP16")
    local = tmp_path / "mnt-models"
    result = CliRunner().invoke(app, ["triton-sync", str(local), "--once", "-r", repo.uri])
    assert result.exit_code == 0, result.output
    assert f"m: versions {v1} in" in result.output
    config = parse((local / "m" / "config.pbtxt").read_text())
    assert list(config.version_policy.specific.versions) == [v1]
    assert sorted(p.name for p in (local / "m").iterdir()) == [str(v1), "config.pbtxt"]
    assert (local / "m" / str(v1) / "model.onnx").read_bytes() == f"weights of {v1}".encode()

    repo.set_alias("m", "production", v3, reason="promote")
    assert sync_once(repo, local) == {"m": [v3]}
    config = parse((local / "m" / "config.pbtxt").read_text())
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert dict(accelerator.parameters)["trt_engine_cache_path"] == f"/mnt/models/m/{v3}/trt_cache"
    assert (local / "m" / str(v3) / "trt_cache" / "TensorrtExecutionProvider_0.engine").is_file()
    assert not (local / "m" / str(v1)).exists()  # no longer listed: removed, disk does not grow


def test_a_text_generation_version_is_served_by_modelyard_serve_only(tmp_path):
    repo = ModelRepository.open((tmp_path / "repo").as_uri())
    v1 = deploy(repo, tmp_path)
    model = tmp_path / "genai.onnx"
    model.write_bytes(b"decoder")
    v2 = repo.claim_version("m", {})
    repo.publish("m", v2, {"model.onnx": model}, {"model_file": "model.onnx", "format": "onnx",
                                                  "task": "text-generation", **ONNX_IO})
    repo.set_alias("m", "chat", v2)
    assert repo.manifest("m", v2)["served_by"] == ["modelyard serve"]
    own = repo.store._read_bytes(f"m/{v2}/config.pbtxt")[0].decode()
    assert "a text-generation model runs a generation loop" in own
    assert_triton_loads_matching_versions(repo, [v1])
    assert "chat -> 2, a text-generation version" in repo.store._read_bytes("m/config.pbtxt")[0].decode()
