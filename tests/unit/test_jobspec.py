"""The job file schema: good files parse, bad ones fail with a message naming the field.

Whether the format, variants and params exist is the plugins' to say: tests/unit/test_catalog.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import UserInputError
from shared.jobspec import parse_job

GOOD = """
model: {name: minilm, source: ./models/minilm, format: hf-transformers, task: feature-extraction}
convert: {to: onnx, opset: 17}
optimize: {variants: [int8-dynamic, graph+int8-dynamic], gate: {cosine_min: 0.99}}
deploy: {repository: file://./model-repo, alias: production}
device: gpu
"""


def test_the_schema_alone_accepts_names_only_the_plugins_can_judge():
    spec = parse_job("model: {name: m, source: m.onnx, format: pickle}\noptimize: {variants: [int9]}")

    assert spec.model.format == "pickle" and spec.optimize.ids == ["int9"]


def test_a_complete_job_file_parses_with_its_values():
    spec = parse_job(GOOD)
    assert spec.model.format == "hf-transformers"
    assert spec.optimize.ids == ["int8-dynamic", "graph+int8-dynamic"]
    assert spec.optimize.variant("graph+int8-dynamic").parts == ["graph", "int8-dynamic"]
    assert spec.deploy.alias == "production" and spec.device == "gpu"


def test_defaults_fill_what_a_minimal_job_leaves_out():
    spec = parse_job("model: {name: m, source: m.onnx, format: onnx}")
    assert spec.convert.to == "onnx" and spec.optimize is None and spec.deploy is None and spec.device == "cpu"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("model: {name: m, source: m.onnx, format: onnx, colour: blue}", "model.colour: unknown key"),
        ("model: {name: m, source: m.onnx, format: onnx}\nextra: 1", "extra: unknown key"),
        ("model: {name: M!, source: m.onnx, format: onnx}", "model.name"),
        ("model: {name: m, source: m.onnx, format: onnx}\nconvert: {opset: -3}", "convert.opset"),
        ("model: {name: m, source: m.onnx, format: onnx}\nconvert: {samples: {batch: 100000000}}",
         "convert.samples.batch"),
        ("model: {name: m, source: m.onnx, format: onnx}\ndevice: tpu", "device"),
        ("model: {name: m, source: m.onnx, format: onnx}\noptimize: {variants: []}", "optimize.variants"),
        ("model: {name: m, format: onnx}", "model.source"),
        ("model: [1, 2]", "model"),
        ("model: {name: m, source: m.onnx, format: onnx}\ncompress: {prune: {method: rows, keep: 2}}",
         "compress.prune.method"),
    ],
)
def test_bad_job_files_name_the_field_that_is_wrong(text, named):
    with pytest.raises(UserInputError) as caught:
        parse_job(text)
    assert named in str(caught.value)


def test_a_variant_may_carry_its_own_id_and_plugin_params():
    spec = parse_job("model: {name: m, source: m.onnx, format: onnx}\n"
                     "optimize: {variants: [int8-dynamic, {id: int8-per-tensor, of: int8-dynamic, "
                     "params: {per_channel: false}}]}")
    variant = spec.optimize.variant("int8-per-tensor")
    assert variant.of == "int8-dynamic" and variant.params_for("int8-dynamic") == {"per_channel": False}


def test_params_of_a_combination_must_be_keyed_by_plugin():
    with pytest.raises(UserInputError, match="keyed by plugin name"):
        parse_job("model: {name: m, source: m.onnx, format: onnx}\n"
                  "optimize: {variants: [{id: x, of: graph+int8-dynamic, params: {per_channel: false}}]}")


def test_fp32_is_the_baseline_and_cannot_be_listed_as_a_variant():
    with pytest.raises(UserInputError, match="baseline"):
        parse_job("model: {name: m, source: m.onnx, format: onnx}\noptimize: {variants: [fp32]}")


EVAL_JOB = """
model: {name: digits, source: digits.keras, format: keras, eval_data: ./eval.npz}
convert: {to: tflite}
optimize: {variants: [int8], gate: {cosine_min: 0.95, accuracy_drop_max: 0.01}}
"""


def test_labelled_eval_data_and_an_accuracy_drop_gate_parse_with_their_values():
    spec = parse_job(EVAL_JOB)

    assert spec.model.eval_data == "./eval.npz"
    assert spec.optimize.gate.accuracy_drop_max == 0.01


def test_eval_data_is_optional_and_the_accuracy_gate_off_by_default():
    spec = parse_job("model: {name: m, source: m.onnx, format: onnx}\noptimize: {variants: [int8-dynamic]}")

    assert spec.model.eval_data is None and spec.optimize.gate.accuracy_drop_max is None


def test_an_accuracy_drop_gate_without_eval_data_is_refused_naming_both_fields():
    with pytest.raises(UserInputError) as caught:
        parse_job(EVAL_JOB.replace(", eval_data: ./eval.npz", ""))

    assert "optimize.gate.accuracy_drop_max" in str(caught.value) and "model.eval_data" in str(caught.value)


@pytest.mark.parametrize("drop", ["-0.01", "1.5"])
def test_an_accuracy_drop_outside_0_to_1_is_refused(drop):
    with pytest.raises(UserInputError, match="optimize.gate.accuracy_drop_max"):
        parse_job(EVAL_JOB.replace("accuracy_drop_max: 0.01", f"accuracy_drop_max: {drop}"))


def test_an_empty_eval_data_path_is_refused():
    with pytest.raises(UserInputError, match="model.eval_data"):
        parse_job(EVAL_JOB.replace("./eval.npz", "''"))


def test_malformed_yaml_is_reported_as_such():
    with pytest.raises(UserInputError, match="not valid YAML"):
        parse_job("model: {name: m, source: [")


def test_a_yaml_scalar_is_not_a_job():
    with pytest.raises(UserInputError, match="must be a YAML mapping"):
        parse_job("just a string")


@settings(max_examples=300, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
))
def test_no_exception_but_the_validation_error_escapes_the_parser(data):
    import yaml

    try:
        parse_job(yaml.safe_dump(data))
    except UserInputError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_crashes_the_parser(text):
    try:
        parse_job(text)
    except UserInputError:
        pass
