"""Calibration rows and gate rows: the split rule, model.gate_samples appended, and its job-file checks."""

from __future__ import annotations

import numpy as np
import pytest

from shared.arrays import TensorInfo
from shared.errors import UserInputError
from shared.jobspec import parse_job
from worker.stages.holdout import _append_rows, fixed_batch, gate_indices, split, timing_inputs


def rows(n: int) -> tuple[dict, dict]:
    """Samples whose row i holds i, and reference outputs likewise."""
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None], 4, axis=1)
    return {"x": x}, {"y": x[:, :3] * 2}


@pytest.mark.parametrize(("total", "held"),
                         [(2, [1]), (3, [1]), (4, [3]), (8, [3, 7]), (9, [3, 7]), (16, [3, 7, 11, 15])])
def test_every_fourth_row_is_held_out_and_both_sides_always_get_a_row(total, held):
    assert gate_indices(total) == held
    assert 0 < len(held) < total


def test_the_gate_part_holds_exactly_the_rows_the_calibration_part_does_not():
    samples, reference = rows(8)
    part = split(samples, reference, gate_rows=None)

    assert part.separate and part.gate_rows == [3, 7] and part.calibration_rows == [0, 1, 2, 4, 5, 6]
    assert part.gate["x"][:, 0].tolist() == [3, 7] and part.gate_reference["y"][:, 0].tolist() == [6, 14]
    assert part.calibration["x"][:, 0].tolist() == [0, 1, 2, 4, 5, 6]
    assert part.describe() == {"rule": "every 4th row held out for the gate (every 2nd for 2-3 rows)",
                               "separate": True, "calibration_rows": 6, "gate_rows": [3, 7]}


def test_with_gate_samples_the_trailing_rows_are_the_gate_and_every_other_row_calibrates():
    samples, reference = rows(10)
    part = split(samples, reference, gate_rows=3)

    assert part.gate_rows == [7, 8, 9] and part.calibration_rows == list(range(7))
    assert part.rule == "the 3 rows of model.gate_samples"
    assert timing_inputs(samples, 3)["x"][:, 0].tolist() == list(range(7))
    assert timing_inputs(samples, None)["x"].shape == (10, 4)


def test_one_row_or_a_fixed_batch_cannot_be_split_and_the_record_says_so():
    samples, reference = rows(1)
    single = split(samples, reference, gate_rows=None)
    assert not single.separate and single.rule == "no split: only 1 sample row" and single.gate_rows == [0]

    samples, reference = rows(8)
    fixed = split(samples, reference, gate_rows=None, fixed=True)
    assert not fixed.separate and fixed.rule == "no split: the model takes a fixed batch"
    assert fixed.gate["x"].shape == (8, 4)


def test_a_fixed_batch_is_an_onnx_input_with_a_numeric_first_dimension():
    assert fixed_batch([TensorInfo("x", "float32", [8, 4])], "model.onnx")
    assert not fixed_batch([TensorInfo("x", "float32", ["batch", 4])], "model.onnx")
    assert not fixed_batch([TensorInfo("x", "float32", [1, 4])], "model.tflite")  # LiteRT resizes


def test_outputs_without_a_row_per_sample_are_not_split():
    samples, _ = rows(8)
    part = split(samples, {"y": np.zeros((3,), dtype=np.float32)}, gate_rows=None)
    assert not part.separate and "do not share a row count" in part.rule


def test_stored_samples_shorter_than_the_gate_rows_ask_for_a_new_conversion():
    samples, reference = rows(3)
    with pytest.raises(UserInputError, match="resubmit"):
        split(samples, reference, gate_rows=3)


def test_text_rows_of_different_widths_are_padded_with_a_zero_mask_when_the_outputs_agree():
    first = {"input_ids": np.ones((2, 5), np.int64), "attention_mask": np.ones((2, 5), np.int64)}
    second = {"input_ids": np.full((1, 3), 7, np.int64), "attention_mask": np.ones((1, 3), np.int64)}

    combined = _append_rows(first, second, pad=True)

    assert combined["input_ids"].shape == (3, 5)
    assert combined["attention_mask"][2].tolist() == [1, 1, 1, 0, 0]
    with pytest.raises(UserInputError, match="output y has rows of shape"):
        _append_rows({"y": np.zeros((2, 5, 4))}, {"y": np.zeros((1, 3, 4))}, pad=False)


# -- the job file ------------------------------------------------------------------------------

def test_gate_samples_come_beside_samples_of_the_same_kind():
    spec = parse_job("model: {name: m, source: m.onnx, format: onnx, samples: s.npz, gate_samples: g.npz}\n")
    assert spec.model.gate_samples == "g.npz"
    with pytest.raises(UserInputError, match="model.gate_samples needs model.samples"):
        parse_job("model: {name: m, source: m.onnx, format: onnx, gate_samples: g.npz}\n")
    with pytest.raises(UserInputError, match="same kind of file"):
        parse_job("model: {name: m, source: ./m, format: hf-transformers, samples: s.txt, gate_samples: g.npz}\n")


def test_require_improvement_defaults_to_deploying_fp32():
    spec = parse_job("model: {name: m, source: m.onnx, format: onnx}\noptimize: {variants: [int8-dynamic]}\n")
    assert spec.optimize.require_improvement is False and spec.optimize.target is None
