"""Labelled eval data: the producer refuses a bad file up front; a worker measures top-1 accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shared.errors import UserInputError
from shared.inference.accuracy import split_eval_data, top1_accuracy


def linear_classifier(path: Path, weights: np.ndarray, *, batch: int | str = "batch") -> Path:
    """A tiny ONNX model: logits = x @ weights, x [batch, features]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"])], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, weights.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, weights.shape[1]])],
        [numpy_helper.from_array(weights.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture
def session(tmp_path):
    from shared.inference.runtime import load_session

    return load_session(linear_classifier(tmp_path / "m.onnx", np.eye(3)), threads=1)


def test_accuracy_is_the_fraction_of_rows_whose_top1_class_is_the_label(session):
    x = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    result = top1_accuracy(session, {"x": x, "labels": np.array([0, 1, 1, 0])})

    assert result == {"accuracy": 0.75, "eval_rows": 4, "eval_output": "logits"}


def test_accuracy_over_several_chunks_equals_one_pass(session):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(23, 3)).astype(np.float32)
    labels = rng.integers(0, 3, size=23)

    assert top1_accuracy(session, {"x": x, "labels": labels}, chunk=5) == \
        top1_accuracy(session, {"x": x, "labels": labels}, chunk=100)


def test_one_hot_labels_are_read_as_class_ids():
    _, labels = split_eval_data({"x": np.zeros((2, 3)), "labels": np.array([[0, 0, 1], [1, 0, 0]])})

    assert labels.tolist() == [2, 0]


@pytest.mark.parametrize(("arrays", "named"), [
    ({"x": np.zeros((2, 3))}, "no 'labels' array"),
    ({"labels": np.array([0, 1])}, "none of the model's inputs"),
    ({"x": np.zeros((3, 3)), "labels": np.array([0, 1])}, "input x has 3 rows, 'labels' has 2"),
])
def test_malformed_eval_data_is_refused_naming_what_is_wrong(arrays, named):
    with pytest.raises(UserInputError, match=named):
        split_eval_data(arrays)


def test_a_model_without_a_classifier_output_has_no_accuracy(tmp_path):
    from shared.inference.runtime import load_session

    session = load_session(linear_classifier(tmp_path / "m.onnx", np.ones((3, 1))), threads=1)  # [batch, 1]

    with pytest.raises(UserInputError, match=r"needs a classifier output \[batch, classes\]"):
        top1_accuracy(session, {"x": np.zeros((2, 3), np.float32), "labels": np.array([0, 0])})


def test_submit_refuses_eval_data_without_labels_before_contacting_the_broker(tmp_path, monkeypatch):
    from producer import api

    monkeypatch.setenv("MODELYARD_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens: must not be reached
    linear_classifier(tmp_path / "m.onnx", np.eye(3))
    np.savez(tmp_path / "eval.npz", x=np.zeros((2, 3), np.float32))
    job = tmp_path / "job.yaml"
    job.write_text("model: {name: m, source: m.onnx, format: onnx, eval_data: eval.npz}\n")

    with pytest.raises(UserInputError, match="model.eval_data: eval.npz has no 'labels' array"):
        api.submit(job)
