"""A parsed job checked against the plugins (check_job), and the plugins listed (describe)."""

from __future__ import annotations

import pytest

from shared.errors import UserInputError
from shared.jobspec import parse_job
from worker.plugins.catalog import check_job, describe

ONNX = "model: {name: m, source: m.onnx, format: onnx}\n"


def checked(text: str):
    return check_job(parse_job(text))


def refusal(text: str) -> str:
    with pytest.raises(UserInputError) as caught:
        checked(text)
    return str(caught.value)


def test_a_job_the_plugins_accept_comes_back_unchanged():
    spec = parse_job(ONNX + "optimize: {variants: [int8-dynamic, graph+fp16]}")

    assert check_job(spec) is spec


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("model: {name: m, source: m.onnx, format: pickle}", "model.format 'pickle' is not a known format"),
        (ONNX + "optimize: {variants: [int9]}", "optimize.variants: 'int9' is not a known variant"),
        (ONNX + "optimize: {variants: [graph+int9]}", "'graph+int9' is not a known variant"),
        ("model: {name: m, source: m.onnx, format: onnx, samples: s.txt}",
         "model.samples s.txt: text samples (.txt) are for format 'hf-transformers'"),
        ("model: {name: m, source: ./m, format: hf-transformers}\ncompress: {prune: {method: channels, keep: 0.5}}",
         "compress.prune.method 'channels' applies to format 'torch-state-dict' models, not 'hf-transformers'"),
        ("model: {name: m, source: m.pt, format: torch-state-dict, factory: 'torchvision.models:resnet18'}\n"
         "compress: {prune: {method: layers, keep: 2}}",
         "compress.prune.method 'layers' applies to format 'hf-transformers' models, not 'torch-state-dict'"),
    ],
)
def test_what_the_plugins_refuse_is_named_by_its_field(text, named):
    assert named in refusal(text)


def test_the_refusal_names_the_job_file_it_came_from():
    with pytest.raises(UserInputError, match=r"^jobs/x\.yaml is invalid: model\.format"):
        check_job(parse_job("model: {name: m, source: m.onnx, format: pickle}"), origin="jobs/x.yaml")


def test_text_samples_are_accepted_for_the_format_that_takes_text():
    spec = checked("model: {name: m, source: ./m, format: hf-transformers, samples: lines.TXT}")

    assert spec.model.samples == "lines.TXT"


def test_a_prune_method_the_format_supports_is_accepted():
    checked("model: {name: m, source: ./m, format: hf-transformers}\ncompress: {prune: {method: heads, keep: 2}}")


def test_an_unknown_parameter_is_refused_listing_the_known_ones():
    message = refusal(ONNX + "optimize: {variants: [{id: q, of: int8-dynamic, params: {bits: 4}}]}")

    assert "optimize variant q (int8-dynamic): unknown parameter 'bits'" in message
    assert "known: per_channel, reduce_range, smooth, smooth_alpha" in message


def test_a_parameter_of_the_wrong_type_is_refused_naming_variant_and_parameter():
    message = refusal(ONNX + "optimize: {variants: [{id: q, of: int8-dynamic, params: {per_channel: 'no'}}]}")

    assert "optimize variant q (int8-dynamic): parameter per_channel must be a bool, got 'no'" in message


def test_a_value_outside_the_choices_is_refused_listing_them():
    message = refusal(ONNX + "optimize: {variants: [{id: g, of: graph, params: {model_type: gpt}}]}")

    assert "parameter model_type must be one of auto, bert, generic, got 'gpt'" in message


def test_a_number_out_of_bounds_is_refused_with_the_bounds():
    message = refusal(ONNX + "optimize: {variants: [{id: q, of: int8-dynamic, params: {smooth_alpha: 2}}]}")

    assert "parameter smooth_alpha must be within 0..1, got 2" in message


def test_params_of_a_combination_are_checked_against_each_plugin():
    message = refusal(ONNX + "optimize: {variants: [{id: c, of: graph+int8-dynamic, "
                             "params: {graph: {model_type: bert}, int8-dynamic: {weight_type: int4}}}]}")

    assert "optimize variant c (int8-dynamic): parameter weight_type must be one of auto, int8, uint8" in message


def test_a_plugin_without_parameters_refuses_any():
    message = refusal(ONNX + "optimize: {variants: [{id: h, of: fp16, params: {keep_io: true}}]}")

    assert "optimize variant h (fp16): unknown parameter 'keep_io' (known: none)" in message


def test_an_int_is_accepted_where_a_float_is_declared():
    checked(ONNX + "optimize: {variants: [{id: q, of: int8-dynamic, params: {smooth_alpha: 1}}]}")


def test_a_bool_is_not_taken_for_a_number():
    message = refusal("model: {name: m, source: m.keras, format: keras}\nconvert: {to: tflite}\n"
                      "optimize: {variants: [{id: i, of: int8, params: {calibration_samples: true}}]}")

    assert "parameter calibration_samples must be an int, got True" in message


def test_describe_lists_every_plugin_once_with_its_kind_summary_and_params():
    listing = {entry["name"]: entry for entry in describe()}

    assert len(listing) == len(describe())
    assert listing["hf-transformers"]["kind"] == "converter" and listing["hf-transformers"]["text_samples"] is True
    assert listing["hf-transformers"]["prune_methods"] == ["layers", "heads", "ffn-neurons"]
    assert listing["torch-state-dict"]["prune_methods"] == ["channels"]
    assert listing["fp16"]["kind"] == "optimizer" and listing["fp16"]["gpu_benefit"] is True
    assert listing["int8-dynamic"]["summary"].startswith("Dynamic INT8 quantization")
    weight_type = next(p for p in listing["int8-dynamic"]["params"] if p["name"] == "weight_type")
    assert weight_type["type"] == "str" and weight_type["default"] == "auto"
    assert weight_type["choices"] == ["auto", "int8", "uint8"] and weight_type["help"]


def test_describe_puts_converters_first_each_kind_sorted_by_name():
    kinds = [(entry["kind"], entry["name"]) for entry in describe()]

    assert kinds == sorted(kinds, key=lambda item: (item[0] != "converter", item[1]))
