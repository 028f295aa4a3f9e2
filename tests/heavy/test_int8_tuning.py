"""Accuracy-aware INT8 on small synthetic models: the saturation check, the float-node search, the switch model.

Seconds each: the models are a single MatMul or a 4-layer MLP. The MiniLM figures are in
``tests/heavy/test_int8_minilm.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from shared.inference.fidelity import compare
from shared.inference.runtime import load_session
from worker.plugins import registry
from worker.plugins.base import OptimizeRequest
from worker.support.onnx_files import metadata
from worker.support.quant_recipes import cpu_isa

pytestmark = pytest.mark.heavy
RNG = np.random.default_rng(0)


def _save(path: Path, nodes: list, inputs: list, outputs: list, initializers: list) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def saturating(tmp_path_factory) -> tuple[Path, dict]:
    """One MatMul whose 8-bit int8 weights overflow a kernel that sums uint8 x int8 pairs in int16.

    Channels 0-15 are outliers (15-20, so their uint8 codes are near 255) and their weights are
    the column maxima in half the columns (int8 codes 127): pairs of 255 x 127 exceed 32767 there,
    and only there, so those columns come out too small. In the other half a larger weight
    elsewhere keeps the outliers' codes small.
    """
    k, n = 256, 256
    weight = (RNG.standard_normal((k, n)) * 0.05).astype(np.float32)
    weight[:16] = 1.0
    weight[100, n // 2:] = 4.0
    path = _save(tmp_path_factory.mktemp("saturating") / "model.onnx",
                 [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
                 [numpy_helper.from_array(weight, "w")])
    x = RNG.uniform(-1, 1, size=(32, k)).astype(np.float32)
    x[:, :16] = RNG.uniform(15, 20, size=(32, 16))
    return path, {"x": x}


@pytest.fixture(scope="module")
def mlp(tmp_path_factory) -> tuple[Path, dict]:
    """Four 512 x 512 MatMuls with ReLUs, big enough for INT8 to be faster than float."""
    width, layers = 512, 4
    nodes, initializers, previous = [], [], "x"
    for i in range(layers):
        initializers.append(numpy_helper.from_array(
            (RNG.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [f"h{i}"], name=f"layer{i}/MatMul"))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
            previous = f"r{i}"
    path = _save(tmp_path_factory.mktemp("mlp") / "model.onnx", nodes,
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", width])],
                 [helper.make_tensor_value_info(f"h{layers - 1}", TensorProto.FLOAT, ["batch", "sequence", width])],
                 initializers)
    return path, {"x": RNG.standard_normal((8, 128, width)).astype(np.float32)}


def quantize(name: str, model: Path, samples: dict, workdir: Path, *, gate: dict | None = None, **params) -> Path:
    workdir.mkdir()
    request = OptimizeRequest(model=model, workdir=workdir, samples=samples, task=None, inputs=[], outputs=[],
                              params=params, gate=gate or {})
    return registry.optimizer(name).optimize(request)


def report_of(model: Path) -> tuple[dict, dict]:
    meta = metadata(model)
    return meta, json.loads(meta["modelyard.int8.tuning"])


@pytest.mark.parametrize("optimizer", ["int8-dynamic", "int8-static"])
def test_the_weight_range_is_chosen_by_measurement_where_the_kernel_saturates(saturating, tmp_path, optimizer):
    model, samples = saturating
    output = quantize(optimizer, model, samples, tmp_path / "q", smooth=False)
    meta, report = report_of(output)
    measured = {entry["recipe"]: entry["fit"]["cosine_min"] for entry in report["recipes"]}
    chosen = "int8 7-bit" if meta["modelyard.int8.reduce_range"] == "True" else meta["modelyard.int8.weight_type"]
    print(f"\n{optimizer} on {cpu_isa().label}: {meta['modelyard.int8.saturation']}; chose {chosen}")
    if "int8 7-bit" not in measured:  # only where the kernel sums into int32 and 8 bits already reach the goal
        assert cpu_isa().int32_dot_products and list(measured) == ["int8"] and measured["int8"] >= report["goal"]
        assert chosen == "int8" and meta["modelyard.int8.saturation"].startswith("not measured (one int8 recipe")
    elif cpu_isa().int32_dot_products and optimizer == "int8-dynamic":  # VNNI / AMX / ARM: the 8 bits are kept
        assert chosen == "int8" and meta["modelyard.int8.saturation"].startswith("not detected")
    elif cpu_isa().int32_dot_products:  # static QDQ: ONNX Runtime's kernel may still sum pairs in int16 here
        saturated = meta["modelyard.int8.saturation"].startswith("detected")
        assert (chosen in ("int8 7-bit", "uint8")) == saturated  # the choice follows the measurement
    else:  # AVX2 without VNNI: 8-bit weights overflow, the measurement picks 7-bit (or uint8)
        assert measured["int8"] < 0.995 < measured["int8 7-bit"]
        assert chosen in ("int8 7-bit", "uint8")
        assert meta["modelyard.int8.saturation"].startswith("detected")
    assert meta["modelyard.int8.isa"] == cpu_isa().label
    assert compare(load_session(model).run(samples), load_session(output).run(samples))["cosine_min"] >= 0.995


def test_both_int8_ranges_are_measured_when_the_first_misses_the_goal(saturating, tmp_path):
    model, samples = saturating
    _, report = report_of(quantize("int8-dynamic", model, samples, tmp_path / "q", smooth=False,
                                   target_cosine=0.99999, accuracy_aware=False))
    assert [entry["recipe"] for entry in report["recipes"]][:2] in (["int8", "int8 7-bit"], ["int8 7-bit", "int8"])
    assert not report["saturation"].startswith("not measured")


def test_an_unreachable_threshold_keeps_the_most_sensitive_nodes_float_and_reports_them(mlp, tmp_path):
    model, samples = mlp
    baseline = quantize("int8-dynamic", model, samples, tmp_path / "plain", accuracy_aware=False)
    tuned = quantize("int8-dynamic", model, samples, tmp_path / "tuned", target_cosine=0.99999, max_float_ops=2,
                     max_latency_ratio=1.0)
    meta, report = report_of(tuned)
    kept = meta["modelyard.int8.float_nodes"].split(", ")
    assert len(kept) == 2 and report["stopped"] == "max_float_ops reached"
    graph = onnx.load(str(tuned)).graph
    float_matmuls = {node.name for node in graph.node if node.op_type == "MatMul"}
    assert {f"{name}/MatMul" for name in kept} <= float_matmuls, "the reported nodes are plain float MatMuls"
    assert len([node for node in graph.node if node.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]) == 2
    costs = report["float_nodes"]
    assert [cost["node"] for cost in costs] == kept
    assert all(cost["check_cosine_min_gain"] > 0 and 0 < cost["predicted_latency_ratio"] <= 1 for cost in costs)
    assert report["final"]["latency_ratio"]["rounds"] >= 3 and report["final"]["float_nodes"] == 2
    plain = compare(load_session(model).run(samples), load_session(baseline).run(samples))
    better = compare(load_session(model).run(samples), load_session(tuned).run(samples))
    assert better["cosine_min"] > plain["cosine_min"] and better["max_abs"] < plain["max_abs"]


def test_a_reachable_threshold_keeps_every_node_int8_and_measures_no_latency(mlp, tmp_path):
    from worker.support.quant_tuning import tuning_report

    model, samples = mlp
    output = quantize("int8-dynamic", model, samples, tmp_path / "q", target_cosine=0.99)
    meta, report = report_of(output)
    assert tuning_report(output) == report and tuning_report(model) is None
    assert meta["modelyard.int8.float_nodes"] == "none"
    assert report["stopped"] == "reached the goal without float nodes" and "latency_ratio" not in report["int8_only"]
    assert report["rows"]["fit_rows"] == [0, 2, 4, 6] and report["rows"]["check_rows"] == [1, 3, 5, 7]
    assert report["rows"]["reference"] == "float model"


def test_the_job_gate_sets_the_threshold(mlp, tmp_path):
    model, samples = mlp
    _, report = report_of(quantize("int8-dynamic", model, samples, tmp_path / "q", gate={"cosine_min": 0.9},
                                   target_cosine=0.99999))
    assert report["threshold"] == 0.9 and report["stopped"] == "reached the goal without float nodes"


def test_the_switch_model_runs_exactly_the_model_the_quantizer_writes_with_those_nodes_float(mlp, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from worker.support.quant_switch import SwitchModel

    model, samples = mlp
    quantized, mixed = tmp_path / "q.onnx", tmp_path / "mixed.onnx"
    quantize_dynamic(str(model), str(quantized), per_channel=True, weight_type=QuantType.QInt8)
    quantize_dynamic(str(model), str(mixed), per_channel=True, weight_type=QuantType.QInt8,
                     nodes_to_exclude=["layer1/MatMul"])
    switch = SwitchModel(model, quantized, tmp_path / "switch" / "model.onnx", threads=1)
    assert [node.name for node in switch.nodes] == [f"layer{i}/MatMul" for i in range(4)]
    x = samples["x"][:2]
    expected_q = load_session(quantized, threads=1).run({"x": x})["h3"]
    expected_mixed = load_session(mixed, threads=1).run({"x": x})["h3"]
    np.testing.assert_array_equal(switch.run({"x": x})["h3"], expected_q)
    np.testing.assert_allclose(switch.run({"x": x}, ["layer1/MatMul"])["h3"], expected_mixed, rtol=1e-5, atol=1e-5)
    all_float = switch.run({"x": x}, [node.name for node in switch.nodes])["h3"]
    np.testing.assert_allclose(all_float, load_session(model, threads=1).run({"x": x})["h3"], rtol=1e-4, atol=1e-4)


def test_calibration_rows_split_evenly_and_a_fixed_batch_is_not_split(tmp_path):
    from worker.support.quant_calibration import check_indices, split_calibration

    assert check_indices(6, 0.5) == [1, 3, 5] and check_indices(8, 0.25) == [3, 7] and check_indices(2, 0.9) == [1]
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    dynamic = _save(tmp_path / "dynamic.onnx", [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [weight])
    fixed = _save(tmp_path / "fixed.onnx", [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 4])], [weight])
    x = {"x": np.arange(24, dtype=np.float32).reshape(6, 4)}
    source = {"y": x["x"] + 0.5}
    split = split_calibration(x, source, dynamic)
    assert split.separate and split.fit_rows == [0, 2, 4] and split.check_rows == [1, 3, 5]
    assert split.reference_source == "source model"
    np.testing.assert_array_equal(split.check_reference["y"], source["y"][[1, 3, 5]])
    np.testing.assert_array_equal(split.all_rows["x"], x["x"][[0, 2, 4, 1, 3, 5]])
    unsplit = split_calibration(x, None, fixed)
    assert not unsplit.separate and unsplit.fit_rows == unsplit.check_rows == list(range(6))
    assert unsplit.reference_source == "float model"


@pytest.fixture(scope="module")
def down_projection(tmp_path_factory) -> tuple[Path, dict]:
    """One 512 -> 128 MatMul whose input has two channels ~300x the others: the shape of a transformer's
    FFN down-projection input (GELU outputs), where smoothing alone leaves one channel setting the
    range that every token's quantization shares."""
    k, n = 512, 128
    weight = (RNG.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    path = _save(tmp_path_factory.mktemp("down") / "model.onnx",
                 [helper.make_node("MatMul", ["x", "w"], ["y"], name="down/MatMul")],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", k])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", n])],
                 [numpy_helper.from_array(weight, "w")])
    x = (RNG.standard_normal((8, 64, k)) * 0.3).astype(np.float32)
    x[..., [7, 300]] *= 300.0
    return path, {"x": x}


def test_outlier_channels_leave_the_int8_path_exactly_and_lift_fidelity(down_projection, tmp_path):
    from worker.support.smoothing import FLOAT_PART, smooth

    model, samples = down_projection
    smoothed = smooth(model, tmp_path / "smooth" / "model.onnx", samples, 0.6, max_steps=25.0)
    assert smoothed.float_channels == 2 and smoothed.float_nodes == (f"down/MatMul{FLOAT_PART}",)
    float_run = compare(load_session(model).run(samples), load_session(smoothed.path).run(samples))
    assert float_run["cosine_min"] > 0.99999 and float_run["max_abs"] < 1e-3  # exact in float, up to rounding

    split = quantize("int8-dynamic", model, samples, tmp_path / "split", accuracy_aware=False)
    plain = quantize("int8-dynamic", model, samples, tmp_path / "plain", accuracy_aware=False, max_range_steps=0)
    meta = metadata(split)
    assert meta["modelyard.int8.float_channels"] == "2" and metadata(plain)["modelyard.int8.float_channels"] == "0"
    graph = onnx.load(str(split)).graph
    kept = [node for node in graph.node if node.name == f"down/MatMul{FLOAT_PART}"]
    assert [node.op_type for node in kept] == ["MatMul"], "the outlier channels' MatMul stays float"
    assert any(node.op_type in ("DynamicQuantizeMatMul", "MatMulInteger") for node in graph.node)
    with_split = compare(load_session(model).run(samples), load_session(split).run(samples))
    without = compare(load_session(model).run(samples), load_session(plain).run(samples))
    print(f"\noutlier channels in float: cosine-min {without['cosine_min']:.5f} -> {with_split['cosine_min']:.5f}")
    assert with_split["cosine_min"] > without["cosine_min"] and with_split["max_abs"] < without["max_abs"]


def test_the_quantized_model_carries_no_shape_annotations(mlp, tmp_path):
    """ONNX Runtime fuses Add + LayerNormalization into its slower SkipLayerNormalization only where
    shapes are annotated (``onnx_files.drop_shape_annotations``; the MiniLM check is in test_minilm_plugins)."""
    model, samples = mlp
    for name in ("int8-dynamic", "int8-static"):
        output = quantize(name, model, samples, tmp_path / name, accuracy_aware=False)
        assert len(onnx.load(str(output)).graph.value_info) == 0, name


def test_two_split_matmuls_in_a_row_stay_in_topological_order(tmp_path):
    """The first MatMul's output is the second's activation: after the split, the Add that now produces
    it must come before the second's smoothing Mul and Gather."""
    from worker.support.smoothing import smooth

    k = 256
    first = (RNG.standard_normal((k, k)) / np.sqrt(k)).astype(np.float32)
    first[:, [3, 50]] *= 300.0  # two output channels of the first become outliers of the second's input
    second = (RNG.standard_normal((k, 64)) / np.sqrt(k)).astype(np.float32)
    model = _save(tmp_path / "model.onnx",
                  [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first/MatMul"),
                   helper.make_node("MatMul", ["h", "w2"], ["y"], name="second/MatMul")],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
                  [numpy_helper.from_array(first, "w1"), numpy_helper.from_array(second, "w2")])
    x = (RNG.standard_normal((64, k)) * 0.3).astype(np.float32)
    x[:, [7, 100]] *= 300.0
    smoothed = smooth(model, tmp_path / "smooth" / "model.onnx", {"x": x}, 0.6, max_steps=25.0)
    assert len(smoothed.float_nodes) == 2
    onnx.checker.check_model(onnx.load(str(smoothed.path)))
    float_run = compare(load_session(model).run({"x": x}), load_session(smoothed.path).run({"x": x}))
    assert float_run["cosine_min"] > 0.99999


def test_a_given_weight_type_is_reported_as_given_not_as_reaching_the_goal(mlp, tmp_path):
    model, samples = mlp
    meta, report = report_of(quantize("int8-dynamic", model, samples, tmp_path / "q", weight_type="int8",
                                      target_cosine=0.99999, accuracy_aware=False))
    assert report["recipe"]["chosen"] == "given"
    assert meta["modelyard.int8.saturation"].startswith("not measured (one int8 recipe tried); CPU ")
