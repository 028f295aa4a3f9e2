"""The model repository: atomic version numbers, aliases with history, Triton config."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from shared.errors import UserInputError
from shared.repository import ModelRepository
from shared.triton import config_pbtxt

IO = {
    "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
    "outputs": [{"name": "last_hidden_state", "dtype": "float32", "shape": ["batch", "sequence", 384]}],
}


def publish(repo: ModelRepository, tmp: Path, digest: str) -> int:
    version = repo.claim_version("m", {"artifact_digest": digest})
    model = tmp / f"model-{digest}.onnx"
    model.write_bytes(digest.encode())
    repo.publish("m", version, {"model.onnx": model}, {"artifact_digest": digest, "format": "onnx", **IO})
    return version


def test_racing_claims_never_share_a_version(tmp_path):
    repo = ModelRepository.open(tmp_path.joinpath("repo").as_uri())
    claimed: list[int] = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        barrier.wait()
        claimed.append(repo.claim_version("m", {"job": i}))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(1, 9))


def test_only_versions_with_a_manifest_are_listed(tmp_path):
    repo = ModelRepository.open(tmp_path.as_uri())
    repo.claim_version("m", {})  # claimed, never published
    second = publish(repo, tmp_path, "b")
    assert repo.versions("m") == [second] and repo.models() == ["m"]


def test_promote_then_rollback_returns_the_alias_to_its_previous_version(tmp_path):
    repo = ModelRepository.open(tmp_path.as_uri())
    v1, v2, v3 = (publish(repo, tmp_path, d) for d in "abc")
    for version in (v1, v2, v3):
        repo.set_alias("m", "production", version)
    assert repo.resolve("m", "production") == v3
    assert repo.rollback("m", "production") == (v3, v2)
    assert repo.rollback("m", "production") == (v2, v1)
    assert repo.resolve("m", "production") == v1
    history = repo.aliases("m")["production"]["history"]
    assert [h["to"] for h in history] == [v1, v2, v3, v2, v1]


def test_rollback_without_an_earlier_version_is_refused(tmp_path):
    repo = ModelRepository.open(tmp_path.as_uri())
    repo.set_alias("m", "canary", publish(repo, tmp_path, "a"))
    with pytest.raises(UserInputError, match="no earlier version"):
        repo.rollback("m", "canary")


def test_an_alias_cannot_point_at_a_missing_version(tmp_path):
    repo = ModelRepository.open(tmp_path.as_uri())
    with pytest.raises(UserInputError, match="no version 7"):
        repo.set_alias("m", "production", 7)


def test_find_version_by_artifact_digest_makes_redeploys_harmless(tmp_path):
    repo = ModelRepository.open(tmp_path.as_uri())
    version = publish(repo, tmp_path, "a")
    assert repo.find_version("m", "a") == version and repo.find_version("m", "z") is None


def test_triton_config_has_dynamic_batching_and_dims_without_the_batch_axis():
    text = config_pbtxt("minilm", "onnx", IO["inputs"], IO["outputs"])
    assert 'platform: "onnxruntime_onnx"' in text and "max_batch_size: 64" in text
    assert "dims: [ -1 ]" in text and "dims: [ -1, 384 ]" in text and "dynamic_batching" in text


def test_triton_config_without_a_batch_axis_has_max_batch_size_zero():
    fixed = [{"name": "x", "dtype": "float32", "shape": [1, 4]}]
    text = config_pbtxt("m", "onnx", fixed, fixed)
    assert "max_batch_size: 0" in text and "dims: [ 1, 4 ]" in text and "dynamic_batching" not in text
