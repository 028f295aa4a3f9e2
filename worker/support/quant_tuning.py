"""Accuracy-aware INT8: pick the weight recipe by measurement, then keep the fewest nodes float.

What Intel Neural Compressor's tuning loop is known for, with the measurement kept honest. Both
INT8 optimizers (``int8-dynamic``, ``int8-static``) hand ``tune`` a ``build`` function (recipe,
nodes to keep float, output path -> model) and the calibration rows split into fit and check
parts (``worker.support.quant_calibration``); ``tune``:

1. builds both int8 weight ranges (8-bit, 7-bit ``reduce_range``; only the first where the CPU's
   kernel sums into int32 and it reaches the goal), and uint8 only when neither comes near the
   threshold, and scores them on the fit rows. The CPU's hint
   (``quant_recipes.recipe_order``) is kept unless another recipe is clearly closer: where 8-bit
   weights measure worse than 7-bit ones the kernel saturates, and the report says so;
2. scores the chosen model on the check rows; when they miss the goal (the job's gate threshold
   plus a margin), measures its latency against the float model, paired and interleaved in this
   process (``shared.inference.paired``): INT8 that is not clearly faster gets no float nodes;
3. otherwise searches for the fewest MatMuls/Gemms to keep float (``quant_islands``), stopping
   when the predicted speed advantage is gone, then builds that model with the quantizer and
   measures it for real (check rows, paired latency), dropping the last nodes again if it came
   out clearly too slow.

Everything runs within ``budget_s`` (the first recipe is always built) and writes only under the
scratch folder it is given. The outcome and what each float node cost go into ``TuningResult``:
its ``report`` (plain data) and ``metadata()`` (``modelyard.int8.*`` entries for the model file).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import one_line
from worker.support.quant_calibration import CalibrationSplit, Score, score
from worker.support.quant_islands import SPEED, CostModel, IslandSearch, search_float_islands
from worker.support.quant_recipes import UINT8, CpuIsa, WeightRecipe, saturation_finding
from worker.support.quant_switch import SwitchModel, WeightNode

Build = Callable[[WeightRecipe, Sequence[str], Path], Path]
UINT8_FLOOR = 0.02  # uint8 weights (slower) are tried only when no int8 recipe comes this close to the threshold


@dataclass(frozen=True)
class TuningConfig:
    threshold: float  # the job's gate cosine_min, or the optimizer's target
    margin: float = 0.003  # the check rows must clear the threshold by this much
    accuracy_aware: bool = True  # False: no float-node search
    max_float_ops: int = 8
    max_latency_ratio: float = 0.9  # a model slower than this fraction of the float model has lost its point
    budget_s: float = 180.0
    recipes: tuple[WeightRecipe, ...] = ()  # the tries, in order; one: no choice
    threads: int = 2

    @property
    def goal(self) -> float:
        return min(self.threshold + self.margin, 1.0)


@dataclass
class TuningResult:
    model: Path
    recipe: WeightRecipe
    float_nodes: list[WeightNode] = field(default_factory=list)
    report: dict = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        """``modelyard.int8.*`` entries: the recipe, the float nodes, the check figures, the whole report."""
        final = self.report.get("final", {})
        latency = final.get("latency_ratio") or {}
        entries = {
            "weight_type": self.recipe.weight_type,
            "reduce_range": self.recipe.reduce_range,
            "isa": self.report.get("isa", {}).get("class", "unknown"),
            "saturation": self.report.get("saturation", ""),
            "float_nodes": ", ".join(node.short for node in self.float_nodes) or "none",
            "check_cosine_min": f"{final.get('check', {}).get('cosine_min', float('nan')):.4f}",
            "latency_ratio": _show_ratio(latency) if latency else "not measured (no float-node search)",
            "tuning": json.dumps(self.report, separators=(",", ":")),
        }
        return {f"modelyard.int8.{key}": str(value) for key, value in entries.items()}


def tuning_report(model: Path) -> dict | None:
    """The report an INT8 optimizer wrote into ``model``'s metadata (``modelyard.int8.tuning``), for a
    stage that wants it in its record; None when the model has none (not INT8, or tuned before it existed)."""
    from worker.support.onnx_files import metadata

    if model.suffix.lower() != ".onnx":
        return None
    text = metadata(model).get("modelyard.int8.tuning")
    return json.loads(text) if text else None


def quantization_summary(model: Path) -> dict | None:
    """What an INT8 optimizer decided, for the variant's record: the ``modelyard.int8.*`` entries
    (recipe, float MatMuls, outlier channels kept float, saturation, check figure) and what each
    float MatMul cost (``float_node_costs``); None for a model without them."""
    from worker.support.onnx_files import metadata

    if model.suffix.lower() != ".onnx":
        return None
    entries = metadata(model)
    found = {key.removeprefix("modelyard.int8."): value for key, value in entries.items()
             if key.startswith("modelyard.int8.") and key != "modelyard.int8.tuning"}
    if not found:
        return None
    report = json.loads(entries.get("modelyard.int8.tuning") or "{}")
    return {**found, "float_node_costs": report.get("float_nodes") or []}


def gate_threshold(gate: Mapping[str, Any] | None, default: float) -> float:
    """The job gate's ``cosine_min`` (``request.gate``; None where the job sets none), else ``default``."""
    value = (gate or {}).get("cosine_min")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def tune(float_model: Path, quant_input: Path, build: Build, split: CalibrationSplit, config: TuningConfig,
         scratch: Path, isa: CpuIsa) -> TuningResult:
    """The recipe and float nodes for ``quant_input`` (the model the quantizer reads, e.g. smoothed);
    latency is compared with ``float_model``. The result's model lies under ``scratch``."""
    started = time.monotonic()
    deadline = started + config.budget_s
    report: dict = {"isa": isa.to_dict(), "threshold": config.threshold, "margin": config.margin,
                    "goal": config.goal, "rows": split.describe(), "budget_s": config.budget_s}
    tried = _try_recipes(build, split, config, scratch, deadline, isa)
    report["recipes"] = [{"recipe": t.recipe.label, "fit": t.fit.to_dict(), "build_s": round(t.seconds, 1)}
                         for t in tried]
    skipped = len(tried) == 1 < len(config.recipes) and tried[0].fit.cosine_min >= config.goal
    report["saturation"] = saturation_finding({t.recipe: t.fit for t in tried}, isa,
                                              "it reached the goal" if skipped else "")
    chosen = _choose(tried)
    report["recipe"] = {**chosen.recipe.to_dict(), "chosen": "measured" if len(config.recipes) > 1 else "given"}
    check = _score(chosen.path, split, config.threads)
    report["int8_only"] = {"check": check.to_dict()}
    result, final_check, final_ratio = TuningResult(chosen.path, chosen.recipe, [], report), check, None
    if check.cosine_min >= config.goal:
        report["stopped"] = "reached the goal without float nodes"
    elif not config.accuracy_aware:
        report["stopped"] = "accuracy-aware tuning off"
    elif time.monotonic() > deadline:
        report["stopped"] = "tuning budget spent before the float-node search"
    else:
        final_ratio = report["int8_only"]["latency_ratio"] = paired_ratio(
            float_model, chosen.path, split.all_rows, config.threads)
        if _clearly_above(final_ratio, config.max_latency_ratio):
            report["stopped"] = f"{SPEED}: the all-int8 model is already at {final_ratio['ratio']:.2f}x float"
        else:
            found = _keep_nodes_float(float_model, quant_input, build, split, config, scratch, chosen, final_ratio,
                                      deadline, report)
            if found is not None:
                result, final_check, final_ratio = found
    report["final"] = {"check": final_check.to_dict(), "latency_ratio": final_ratio,
                       "float_nodes": len(result.float_nodes)}
    report["seconds"] = round(time.monotonic() - started, 1)
    return result


@dataclass(frozen=True)
class _Tried:
    recipe: WeightRecipe
    path: Path
    fit: Score
    seconds: float


def _try_recipes(build: Build, split: CalibrationSplit, config: TuningConfig, scratch: Path,
                 deadline: float, isa: CpuIsa) -> list[_Tried]:
    """Build and score on the fit rows: both int8 ranges (the saturation check), uint8 only when
    neither int8 recipe comes near the threshold (it is the slower kernel everywhere). Where the
    CPU's int8 kernel sums into int32 (VNNI, AMX, ARM) and the first recipe already reaches the
    goal, no other is built: 7-bit weights only help against int16 saturation (~1 s on MiniLM)."""
    tried: list[_Tried] = []
    for recipe in config.recipes:
        if tried and time.monotonic() > deadline:
            break
        if len(tried) == 1 and isa.int32_dot_products and tried[0].fit.cosine_min >= config.goal:
            break
        if recipe == UINT8 and tried and max(t.fit.cosine_min for t in tried) >= config.threshold - UINT8_FLOOR:
            continue
        began = time.monotonic()
        slug = recipe.label.replace(" ", "-")
        path = build(recipe, [], scratch / f"recipe-{slug}" / "model.onnx")
        tried.append(_Tried(recipe, path, _score(path, split, config.threads, part="fit"), time.monotonic() - began))
    return tried


def _choose(tried: list[_Tried]) -> _Tried:
    """The first recipe (the CPU's hint), unless another is clearly closer on the fit rows: a tenth less
    tail error and no lower minimum. A slight edge is not trusted, since saturation depends on the data
    and one more row can flip it."""
    chosen = tried[0]
    for other in tried[1:]:
        if other.fit.tail_error < 0.9 * chosen.fit.tail_error and other.fit.cosine_min >= chosen.fit.cosine_min:
            chosen = other
    return chosen


def _keep_nodes_float(float_model: Path, quant_input: Path, build: Build, split: CalibrationSplit,
                      config: TuningConfig, scratch: Path, chosen: _Tried, int8_ratio: dict, deadline: float,
                      report: dict) -> tuple[TuningResult, Score, dict] | None:
    """Search, build and measure the float nodes: the model, its check score and latency ratio; None
    (reported) when no better model came of it."""
    recipe = chosen.recipe
    try:
        search = _search(quant_input, chosen.path, split, config, scratch / "switch", int8_ratio, deadline)
    except Exception as exc:  # the search only improves a valid model: report, never fail the variant
        report["stopped"] = f"float-node search failed: {type(exc).__name__}: {one_line(exc)}"
        return None
    report["search"] = search.to_dict()
    report["stopped"] = search.stopped
    nodes = search.nodes[:search.best_prefix(config.goal)]
    while nodes:
        path = build(recipe, [node.name for node in nodes], scratch / f"float-{len(nodes)}" / "model.onnx")
        check = _score(path, split, config.threads)
        ratio = paired_ratio(float_model, path, split.all_rows, config.threads)
        if not _clearly_above(ratio, config.max_latency_ratio):
            report["float_nodes"] = _node_costs(search, nodes)
            return TuningResult(path, recipe, nodes, report), check, ratio
        report.setdefault("dropped", []).append({"nodes": len(nodes), "latency_ratio": ratio})
        nodes = nodes[:-1]
    return None


def _search(quant_input: Path, quantized: Path, split: CalibrationSplit, config: TuningConfig, folder: Path,
            int8_ratio: dict, deadline: float) -> IslandSearch:
    """The float-node search on a switch model, which is gone (file and session) when this returns."""
    try:
        switch = SwitchModel(quant_input, quantized, folder / "model.onnx", threads=config.threads)
        cost = CostModel(min(int8_ratio["ratio"], 1.0), sum(node.macs for node in switch.nodes))
        return search_float_islands(switch, split, config.goal, cost, max_nodes=config.max_float_ops,
                                    max_ratio=config.max_latency_ratio, deadline=deadline)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _node_costs(search: IslandSearch, nodes: list[WeightNode]) -> list[dict]:
    """Per kept node: the check rows' cosine-min gained when it went float, and the predicted latency ratio."""
    costs, before = [], search.start_check
    for step in search.steps[:len(nodes)]:
        costs.append({"node": step.node.short, "op": step.node.op_type,
                      "check_cosine_min_gain": round(step.check.cosine_min - before.cosine_min, 5),
                      "check_cosine_min": round(step.check.cosine_min, 5),
                      "predicted_latency_ratio": round(step.predicted_ratio, 4)})
        before = step.check
    return costs


def _score(model: Path, split: CalibrationSplit, threads: int, *, part: str = "check") -> Score:
    from shared.inference.runtime import load_session

    session = load_session(model, threads=threads)
    if part == "fit":
        return score(split.fit_reference, session.run(split.fit))
    return score(split.check_reference, session.run(split.check))


def paired_ratio(float_model: Path, model: Path, feeds: dict, threads: int, *, max_seconds: float = 20.0) -> dict:
    """``model``'s latency over ``float_model``'s, timed interleaved in this process (a few rounds)."""
    from shared.inference.paired import PairedPlan, measure_paired
    from shared.inference.runtime import load_session

    base, candidate = load_session(float_model, threads=threads), load_session(model, threads=threads)
    base_feeds, candidate_feeds = base._prepare(feeds), candidate._prepare(feeds)
    plan = PairedPlan(runs_per_round=2, min_rounds=5, max_rounds=12, max_seconds=max_seconds)
    measured = measure_paired({"float": lambda: base._run(base_feeds), "int8": lambda: candidate._run(candidate_feeds)},
                              "float", plan)
    ratio = measured["ratios"]["int8"]
    return {"ratio": round(ratio["ratio"], 4), "low": _round(ratio["low"]), "high": _round(ratio["high"]),
            "rounds": ratio["rounds"], "float_p50_ms": round(measured["models"]["float"]["p50_ms"], 2),
            "int8_p50_ms": round(measured["models"]["int8"]["p50_ms"], 2)}


def _clearly_above(ratio: dict, limit: float) -> bool:
    """Whether a measured latency ratio is above ``limit`` beyond its interval's doubt (a shared host is noisy)."""
    low = ratio.get("low")
    return (low if low is not None else ratio["ratio"]) > limit


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _show_ratio(ratio: dict) -> str:
    if ratio.get("low") is None:
        return f"{ratio['ratio']:.3f}x float ({ratio.get('rounds', 0)} rounds)"
    return f"{ratio['ratio']:.3f}x float ({ratio['low']:.3f}-{ratio['high']:.3f}, {ratio['rounds']} rounds, paired)"
