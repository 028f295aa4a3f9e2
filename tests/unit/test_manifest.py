"""Step keys identify a step by content; manifests round-trip through the store."""

from __future__ import annotations

from shared.manifest import Manifest, load_manifest, manifest_key, save_manifest, step_key
from shared.storage import FileRef, open_store

BASE = {"stage": "convert", "input_digest": "a" * 64, "params": {"opset": 17}, "tools": {"onnx": "1.0"}}


def test_the_same_step_has_the_same_key_whatever_the_param_order():
    first = step_key(**{**BASE, "params": {"opset": 17, "to": "onnx"}})
    second = step_key(**{**BASE, "params": {"to": "onnx", "opset": 17}})
    assert first == second


def test_any_change_of_input_stage_params_or_tools_changes_the_key():
    key = step_key(**BASE)
    assert step_key(**{**BASE, "input_digest": "b" * 64}) != key
    assert step_key(**{**BASE, "stage": "optimize:fp16"}) != key
    assert step_key(**{**BASE, "params": {"opset": 18}}) != key
    assert step_key(**{**BASE, "tools": {"onnx": "1.1"}}) != key


def test_a_saved_manifest_loads_back_equal(tmp_path):
    store = open_store(tmp_path.as_uri())
    manifest = Manifest(step_key="k" * 64, stage="convert", input_digest="a" * 64, params={}, tools={},
                        files=[FileRef("model.onnx", "d" * 64, 10)], metrics={"x": 1.5}, job_id="j")
    assert load_manifest(store, manifest.step_key) is None
    save_manifest(store, manifest)
    loaded = load_manifest(store, manifest.step_key)
    assert loaded.to_dict() == manifest.to_dict()
    assert loaded.file("model.onnx").size == 10


KEY = b"workers-only"


def _manifest(key: str = "k" * 64) -> Manifest:
    return Manifest(step_key=key, stage="convert", input_digest="a" * 64, params={}, tools={},
                    files=[FileRef("model.onnx", "d" * 64, 10)], job_id="j")


def test_a_signed_manifest_verifies_with_the_workers_key(tmp_path):
    store = open_store(tmp_path.as_uri())
    save_manifest(store, _manifest(), signing_key=KEY)
    assert load_manifest(store, "k" * 64, signing_key=KEY).file("model.onnx").size == 10


def test_a_manifest_planted_without_the_key_is_not_trusted(tmp_path):
    store = open_store(tmp_path.as_uri())
    save_manifest(store, _manifest())  # a submitter who can write to the store, but has no key
    assert load_manifest(store, "k" * 64, signing_key=KEY) is None


def test_a_signed_manifest_whose_files_were_changed_is_not_trusted(tmp_path):
    store = open_store(tmp_path.as_uri())
    save_manifest(store, _manifest(), signing_key=KEY)
    data = store.read_json(manifest_key("k" * 64))
    data["files"][0]["digest"] = "e" * 64  # point the step at a blob of the attacker's choosing
    store.write_json(manifest_key("k" * 64), data)
    assert load_manifest(store, "k" * 64, signing_key=KEY) is None


def test_a_signed_manifest_copied_under_another_steps_key_is_not_trusted(tmp_path):
    store = open_store(tmp_path.as_uri())
    save_manifest(store, _manifest("k" * 64), signing_key=KEY)
    store.write_json(manifest_key("m" * 64), store.read_json(manifest_key("k" * 64)))
    assert load_manifest(store, "m" * 64, signing_key=KEY) is None
    assert load_manifest(store, "m" * 64) is None  # even where manifests are not signed
