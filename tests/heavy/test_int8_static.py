"""int8-static: QDQ quantization calibrated on the samples, for each calibration method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper

from shared.errors import UserInputError
from shared.inference.fidelity import compare
from shared.inference.runtime import load_session
from worker.plugins import registry
from worker.plugins.base import OptimizeRequest

pytestmark = pytest.mark.heavy
RNG = np.random.default_rng(0)
SAMPLES = {"x": RNG.standard_normal((16, 64)).astype(np.float32)}


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mlp")
    w1 = RNG.standard_normal((64, 256)).astype(np.float32) * 0.1
    w2 = RNG.standard_normal((256, 10)).astype(np.float32) * 0.1
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [onnx.numpy_helper.from_array(w1, "w1"), onnx.numpy_helper.from_array(w2, "w2")])
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def quantize(model: Path, workdir: Path, **params) -> Path:
    workdir.mkdir()
    request = OptimizeRequest(model=model, workdir=workdir, samples=SAMPLES, task=None, inputs=[], outputs=[],
                              params=params)
    return registry.optimizer("int8-static").optimize(request)


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_static_qdq_keeps_a_small_mlp_close_and_quarters_its_weights(mlp, tmp_path, method):
    output = quantize(mlp, tmp_path / method, calibrate_method=method)
    ops = {node.op_type for node in onnx.load(str(output)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert output.stat().st_size < 0.4 * mlp.stat().st_size
    fidelity = compare(load_session(mlp).run(SAMPLES), load_session(output).run(SAMPLES))
    assert fidelity["cosine_min"] > 0.97
    assert sorted(p.name for p in output.parent.iterdir()) == ["model.onnx"]  # no stray files left


def test_an_unknown_calibration_method_is_refused(mlp, tmp_path):
    with pytest.raises(UserInputError, match="calibrate_method"):
        quantize(mlp, tmp_path / "x", calibrate_method="vibes")
