"""deploy.vertex in the job file: what it needs, and the clear refusals."""

from __future__ import annotations

import pytest

from shared.errors import UserInputError
from shared.jobspec import parse_job

MODEL = "model: {name: minilm, source: ./m.onnx, format: onnx}\n"


def job(deploy: str, convert: str = "") -> str:
    return MODEL + convert + f"deploy: {deploy}\n"


def test_a_vertex_section_gets_its_defaults():
    spec = parse_job(job("{repository: gs://models/team, vertex: {project: demo-project}}"))
    vertex = spec.deploy.vertex
    assert (vertex.region, vertex.machine_type, vertex.min_replicas, vertex.traffic_percentage) == \
        ("us-central1", "n1-standard-4", 1, 100)
    assert vertex.model is None and vertex.endpoint is None and vertex.serving is None
    assert spec.deploy.vertex_alias == "production"


def test_vertex_needs_a_gs_repository():
    with pytest.raises(UserInputError, match=r"deploy\.vertex needs deploy\.repository to be a gs:// URI .*"
                                             r"'file://./repo'"):
        parse_job(job("{repository: file://./repo, vertex: {project: demo-project}}"))


def test_an_alias_vertex_cannot_hold_asks_for_a_version_alias():
    with pytest.raises(UserInputError, match="'prod_1' is not a valid Vertex AI version alias.*version_alias"):
        parse_job(job("{repository: gs://m/r, alias: prod_1, vertex: {project: demo-project}}"))
    spec = parse_job(job("{repository: gs://m/r, alias: prod_1, vertex: {project: demo-project, "
                         "version_alias: prod-1}}"))
    assert spec.deploy.vertex_alias == "prod-1"


@pytest.mark.parametrize("field, value, message", [
    ("version_alias", "Prod", "Vertex AI version alias"),
    ("project", "x", "deploy.vertex.project"),
    ("max_replicas", "0", "deploy.vertex.max_replicas"),
    ("traffic_percentage", "101", "deploy.vertex.traffic_percentage"),
    ("accelerator_type", "nvidia-l4", "deploy.vertex.accelerator_type"),
    ("unknown", "1", "deploy.vertex.unknown: unknown key"),
])
def test_a_bad_vertex_field_is_named(field, value, message):
    with pytest.raises(UserInputError, match=message):
        parse_job(job(f"{{repository: gs://m/r, vertex: {{project: demo-project, {field}: {value}}}}}"))


def test_max_replicas_below_min_is_refused():
    with pytest.raises(UserInputError, match=r"max_replicas \(1\) is below min_replicas \(2\)"):
        parse_job(job("{repository: gs://m/r, vertex: {project: demo-project, min_replicas: 2, max_replicas: 1}}"))


def test_triton_cannot_serve_a_tflite_job():
    with pytest.raises(UserInputError, match="'triton' cannot serve a tflite model.*serving: modelyard"):
        parse_job(job("{repository: gs://m/r, vertex: {project: demo-project, serving: triton}}",
                      convert="convert: {to: tflite}\n"))
