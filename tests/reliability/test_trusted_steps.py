"""Deploys only where a job may deploy, and step manifests only a worker wrote (issue 16), through
the queue: a private stack whose workers hold the signing key and an allow-list of repositories."""

from __future__ import annotations

import json

import pytest

from shared.manifest import manifest_key
from shared.repository import ModelRepository
from shared.storage import open_store
from tests.reliability.conftest import fault_job

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


def test_a_deploy_outside_the_allowed_repositories_fails_naming_the_setting_and_the_worker_serves_on(
        make_stack, tmp_path):
    ours = (tmp_path / "ours").as_uri()
    stack = make_stack(env={"MODELYARD_ALLOWED_REPOSITORIES": json.dumps([ours, ours + "/*"])})
    stack.start_worker()
    other_team = tmp_path / "other-team"
    refused = stack.wait(stack.submit(fault_job(tmp_path, "intruder", deploy=other_team.as_uri())))
    assert refused["state"] == "FAILED"
    assert "is not allowed on this worker: MODELYARD_ALLOWED_REPOSITORIES" in refused["error"]
    assert not other_team.exists()

    allowed = stack.wait(stack.submit(fault_job(tmp_path, "ours-model", deploy=ours)))
    assert allowed["state"] == "SUCCEEDED", allowed.get("error")
    assert ModelRepository.open(ours).resolve("ours-model", "production") == 1


def test_a_planted_step_manifest_is_recomputed_not_trusted(make_stack, tmp_path):
    stack = make_stack()
    stack.start_worker()
    first = stack.wait(stack.submit(fault_job(tmp_path, "planted", seed=3)))
    assert first["state"] == "SUCCEEDED", first.get("error")
    key = first["stages"]["convert"]["step_key"]

    # A submitter (who may write to the store but has no signing key) points the step at its own bytes.
    store = open_store(stack.env["MODELYARD_ARTIFACT_STORE"])
    planted = store.read_json(manifest_key(key))
    evil = tmp_path / "evil.onnx"
    evil.write_bytes(b"attacker bytes")
    planted["files"] = [store.put_file(evil, "model.onnx").to_dict()]
    planted.pop("signature")
    store.write_json(manifest_key(key), planted)

    again = stack.wait(stack.submit(fault_job(tmp_path, "planted", seed=3)))
    assert again["state"] == "SUCCEEDED", again.get("error")
    convert = again["stages"]["convert"]
    assert convert["step_key"] == key and convert["state"] == "done"  # computed again, not "cached"
    assert convert["files"] == first["stages"]["convert"]["files"]
    assert "does not verify against MODELYARD_STEP_SIGNING_KEY" in stack.log_text()
