"""Dynamic INT8 quantization (weights INT8 ahead of time, activations quantized at run time), accuracy-aware.

The recipe, each step measured on all-MiniLM-L6-v2 (batch 8 x 128, 2 threads, ORT 1.32; see
``scripts/bench/result.py`` and ``scripts/bench/int8_recipe.py``). Figures are per-token
cosine-min against the torch model on rows no step saw (gate rows / natural / generated
sentences), 2-core Xeon with AMX unless marked:

1. **Calibration rows split** into fit and check parts (``worker.support.quant_calibration``):
   the choices below (weight recipe, float nodes) are made on the fit rows and judged on the
   check rows. The stage's gate measures on rows this plugin never gets.
2. **Activation smoothing** (SmoothQuant, folded into the graph, exact in float;
   ``worker.support.smoothing``) with activation statistics from *all* calibration rows (they use
   no reference outputs; the check margin covers what they share), only for activations with
   outlier channels (largest channel peak >= ``smooth_min_outlier`` x the median: MiniLM's
   attention-output inputs are not, and smoothing them was no better: 0.9907 -> 0.9926 gate rows
   without). Where a smoothed activation's range is still above ``max_range_steps`` x its RMS
   (MiniLM: the FFN down-projection inputs of layers 0-3), its few most extreme channels leave the
   int8 path and are added back by a small float MatMul: 5 of MiniLM's 27,648 activation channels
   (1, 1, 2, 1 in layers 0-3), 0.9864/0.9843/0.9820 -> 0.9948/0.9928/0.9913 at no measurable cost
   (0.378x fp32 with them, 0.376x without).
   ``smooth_alpha`` 0.6 with those channels out (0.75 without them: 0.9952/0.9904/0.9875 with).
3. **Per-channel, symmetric int8 weights**: with the outlier channels out, symmetric beat a zero
   point per channel (0.9958/0.9931/0.9932 vs 0.9948/0.9928/0.9913; with smoothing alone and
   alpha 0.75 asymmetric had been better, 0.994 vs 0.988 on a VNNI Xeon).
4. **Weight recipe chosen by measurement** (``weight_type: auto``): full-range and 7-bit int8
   (``reduce_range``) are both built and scored on the fit rows, uint8 too when neither comes near
   the threshold; the CPU's hint (``worker.support.quant_recipes``: 7-bit first without VNNI) is
   kept unless another recipe is clearly closer. On AVX2 without VNNI ONNX Runtime's U8S8 kernel
   saturates its int16 pair sums: smoothed full-range int8 measured cosine-min -0.05 on the fit
   rows of an AMD EPYC, 7-bit 0.994; the report says "saturation: detected". (7-bit weights with
   this recipe, emulated here: 0.9904/0.9917/0.9894.)
5. **Accuracy-aware float nodes** (``accuracy_aware``): while the check rows miss the job's gate
   threshold (``request.gate``, else ``target_cosine``) plus ``margin``, keep the most sensitive
   MatMuls float, re-ranked after each choice, and stop when the speed advantage is gone
   (``max_latency_ratio`` of the float model, measured paired in this process)
   (``worker.support.quant_tuning``). MiniLM on the AMX Xeon needs none now: 0.387x fp32 paired,
   23.0 MB (one float FFN output dense had cost ~0.03x).
6. **No shape annotations** in the output (``onnx_files.drop_shape_annotations``): with them ONNX
   Runtime fuses the residual Add + LayerNormalization into its slower SkipLayerNormalization
   (MiniLM INT8 0.476x fp32 with, 0.418x without).

Parameters: ``Int8Dynamic.params`` (all optional). The recipe, the float nodes and what each
cost, the check figures and the paired latency ratio go into the model's metadata
(``modelyard.int8.*``; ``modelyard.int8.tuning`` holds the whole report as JSON).

Scratch files. The quantizer writes ``<name>-inferred.onnx`` beside its *input* model and deletes
it again: that fails on a read-only input folder and races when two tasks quantize the same
cached file, so the input is first copied into a scratch folder in the workdir. Above 2 GiB
(external data) ``onnx`` checks the data file's name against the cwd, so only then the quantizer
runs with the cwd in the scratch folder, under a process-wide lock; the tuning is skipped there.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from shared.errors import UserInputError, one_line
from worker.plugins.base import Optimizer, OptimizeRequest, Param
from worker.support.onnx_files import drop_shape_annotations, set_metadata, stage_copy, working_directory
from worker.support.quant_recipes import WeightRecipe, cpu_isa, recipe_order
from worker.support.quant_tuning import TuningConfig, gate_threshold, tune
from worker.support.smoothing import smooth


class Int8Dynamic(Optimizer):
    name = "int8-dynamic"
    applies_to = ("onnx",)
    params = {
        "per_channel": Param(bool, True, "per-output-channel weight scales"),
        "reduce_range": Param(bool, False, "7-bit weights with weight_type int8 or uint8 (auto measures both)"),
        "smooth": Param(bool, True, "fold SmoothQuant scales into the weights first (step 2); skipped for "
                                    "models above 1.8 GB or without MatMul weights"),
        "smooth_alpha": Param(float, 0.6, "smoothing migration strength", min=0.0, max=1.0),
        "smooth_min_outlier": Param(float, 3.0, "smooth an activation only when its largest channel peak is at least "
                                               "this many times the median channel's (0: every one)", min=0.0),
        "max_range_steps": Param(float, 25.0, "where a smoothed activation's range exceeds this many times its RMS, "
                                             "its most extreme channels stay float (0: never; step 2)", min=0.0),
        "weight_type": Param(str, "auto", "int8 or uint8 weights; auto measures 8-bit int8, 7-bit int8 and uint8 "
                                          "(step 4)", choices=("auto", "int8", "uint8")),
        "weight_symmetric": Param(bool, True, "symmetric int8 weights, ONNX Runtime's default (step 3)"),
        "target_cosine": Param(float, 0.99, "the per-vector cosine-min to reach when the job's gate sets none",
                               min=-1.0, max=1.0),
        "accuracy_aware": Param(bool, True, "keep the most sensitive MatMuls/Gemms float until the check rows "
                                            "reach the gate (step 5)"),
        "margin": Param(float, 0.003, "how far above the threshold the check rows must be", min=0.0, max=0.1),
        "max_float_ops": Param(int, 8, "the most MatMuls/Gemms kept in float", min=0),
        "max_latency_ratio": Param(float, 0.9, "stop keeping nodes float when the model would be slower than this "
                                              "fraction of the float model", min=0.05, max=1.0),
        "tuning_budget_s": Param(float, 180.0, "seconds the recipe trials and the float-node search may take "
                                               "(the first recipe is always built)", min=0.0),
        "check_fraction": Param(float, 0.5, "the share of the calibration rows kept for checking",
                                min=0.1, max=0.9),
    }

    def optimize(self, request: OptimizeRequest) -> Path:
        from shared.inference.runtime import PROTO_LIMIT, check_loads, model_bytes
        from shared.settings import Settings
        from worker.support.quant_calibration import split_calibration

        params = request.params
        workdir = Path(request.workdir).absolute()
        output = workdir / "model.onnx"
        scratch = workdir / ".int8-scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        isa = cpu_isa()
        meta: dict = {"per_channel": params["per_channel"], "weight_symmetric": params["weight_symmetric"],
                      "smooth_alpha": "off"}
        if params["weight_type"] == "auto":
            recipes = tuple(recipe_order(isa))
        else:
            recipes = (WeightRecipe(params["weight_type"], params["reduce_range"]),)
        try:
            source = stage_copy(Path(request.model).absolute(), scratch / "input")
            typed = _typed_for_contrib_ops(source, scratch / "typed" / "model.onnx")
            large = model_bytes(typed) > PROTO_LIMIT
            logging.getLogger().addFilter(_drop_preprocess_hint)
            if not request.samples or large:  # nothing to measure on, or too big to measure: the first recipe
                _quantize(typed, output, recipes[0], (), params, large=large, scratch=scratch, model=request.model)
                meta.update(weight_type=recipes[0].weight_type, reduce_range=recipes[0].reduce_range,
                            tuning="skipped: " + ("model above 1.8 GB" if large else "no samples"))
            else:
                threads = Settings().bench_threads
                split = split_calibration(request.samples, request.reference or None, typed,
                                          check_fraction=params["check_fraction"], threads=threads)
                quant_input, always_float = typed, ()
                if params["smooth"]:
                    smoothed = smooth(typed, scratch / "smooth" / "model.onnx", split.all_rows, params["smooth_alpha"],
                                      params["smooth_min_outlier"], params["max_range_steps"])
                    if smoothed is not None:
                        quant_input, always_float = smoothed.path, smoothed.float_nodes
                        meta.update(smooth_alpha=params["smooth_alpha"], smoothed_activations=smoothed.activations,
                                    float_channels=smoothed.float_channels)

                def build(recipe: WeightRecipe, exclude: Sequence[str], target: Path) -> Path:
                    return _quantize(quant_input, target, recipe, (*always_float, *exclude), params, large=False,
                                     scratch=scratch, model=request.model)

                config = TuningConfig(
                    threshold=gate_threshold(request.gate, params["target_cosine"]),
                    margin=params["margin"], accuracy_aware=params["accuracy_aware"],
                    max_float_ops=params["max_float_ops"], max_latency_ratio=params["max_latency_ratio"],
                    budget_s=params["tuning_budget_s"], recipes=recipes, threads=threads)
                result = tune(source, quant_input, build, split, config, scratch / "tuning", isa)
                shutil.move(str(result.model), str(output))
                meta.update({key.removeprefix("modelyard.int8."): value for key, value in result.metadata().items()})
            if not large:
                set_metadata(output, {f"modelyard.int8.{key}": value for key, value in meta.items()})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        check_loads(output, self.name)
        return output


def _quantize(source: Path, target: Path, recipe: WeightRecipe, exclude: Sequence[str], params: dict, *,
              large: bool, scratch: Path, model: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    target.with_name(target.name + ".data").unlink(missing_ok=True)
    with working_directory(scratch) if large else contextlib.nullcontext():
        try:
            quantize_dynamic(
                model_input=str(source),
                model_output=str(target),
                per_channel=params["per_channel"],
                reduce_range=recipe.reduce_range,
                weight_type=QuantType.QUInt8 if recipe.weight_type == "uint8" else QuantType.QInt8,
                nodes_to_exclude=list(exclude),
                use_external_data_format=large,
                extra_options={"WeightSymmetric": params["weight_symmetric"]},
            )
        except Exception as exc:
            raise UserInputError(f"int8-dynamic could not quantize {Path(model).name}: "
                                 f"{type(exc).__name__}: {one_line(exc)}") from None
    if not large:
        drop_shape_annotations(target)
    return target


def _drop_preprocess_hint(record: logging.LogRecord) -> bool:
    """quantize_dynamic logs a pre-processing hint on the root logger at every call; drop it."""
    return not str(record.msg).startswith("Please consider to run pre-processing")


def _typed_for_contrib_ops(model: Path, target: Path) -> Path:
    """Give contrib-op outputs a type, or the quantizer cannot handle a graph-optimized model.

    The quantizer types tensors with onnx's shape inference, which does not know the
    com.microsoft ops (Attention, SkipLayerNormalization, ...) the graph optimizer fuses in,
    and fails with "Unable to find data type for weight_name=...". ONNX Runtime's symbolic
    shape inference knows them.
    """
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    if all(node.domain in ("", "ai.onnx") for node in proto.graph.node):
        return model
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from shared.inference.runtime import save_onnx

    try:
        inferred = SymbolicShapeInference.infer_shapes(onnx.load(str(model)), auto_merge=True)
    except Exception as exc:
        message = " ".join(str(exc).split())[:200]
        raise UserInputError(
            f"int8-dynamic cannot type the contrib ops of {model.name} (from a graph optimization?): {message}; "
            "quantize before optimizing the graph instead (variant 'int8-dynamic+graph')"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    return save_onnx(inferred, target)
