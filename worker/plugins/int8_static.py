"""Static INT8 quantization (QDQ): weights and activations quantized ahead of time, accuracy-aware.

Activation ranges are calibrated on the calibration rows the stage hands over
(``request.samples``: never the gate's rows), fed one row at a time, after SmoothQuant smoothing
(``worker.support.smoothing``), as for ``int8-dynamic``. The weight recipe (8-bit or 7-bit int8,
uint8) is chosen by measurement and, while the check rows miss the gate, the most sensitive
MatMuls/Gemms stay float, as long as the model stays faster than float
(``worker.support.quant_tuning``; the same loop as ``int8-dynamic``). The output carries no shape
annotations (``onnx_files.drop_shape_annotations``, as ``int8-dynamic``'s step 6).

Measured on all-MiniLM-L6-v2 (AVX2, no VNNI): static QDQ loses far more fidelity than the dynamic
recipe on transformers (one fixed activation scale per tensor for every input) and runs slower
than float there, so the tuning stops at once (the speed advantage is gone) and the fidelity gate
usually rejects it; it suits CNNs, whose activations are tame.

Parameters: ``Int8Static.params`` (all optional). The recipe, the float nodes and the check
figures go into the model's metadata (``modelyard.int8.*``).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shared.errors import UserInputError, one_line
from worker.plugins.base import Optimizer, OptimizeRequest, Param
from worker.support.onnx_files import drop_shape_annotations, set_metadata, stage_copy
from worker.support.quant_recipes import INT8, WeightRecipe, cpu_isa, recipe_order
from worker.support.quant_tuning import TuningConfig, gate_threshold, tune
from worker.support.smoothing import smooth


class Int8Static(Optimizer):
    name = "int8-static"
    applies_to = ("onnx",)
    params = {
        "calibrate_method": Param(str, "percentile", "how activation ranges are calibrated",
                                  choices=("minmax", "entropy", "percentile")),
        "percentile": Param(float, 99.999, "the percentile kept, with calibrate_method percentile", min=0.0, max=100.0),
        "per_channel": Param(bool, True, "per-output-channel weight scales"),
        "activation_type": Param(str, "uint8", "int8: symmetric activations", choices=("uint8", "int8")),
        "weight_type": Param(str, "auto", "int8 or uint8 weights; auto measures 8-bit int8, 7-bit int8 and uint8",
                             choices=("auto", "int8", "uint8")),
        "reduce_range": Param(bool, False, "7-bit weights with weight_type int8 or uint8 (auto measures both)"),
        "op_types": Param(list, ["MatMul", "Gemm", "Conv"], "the operators to quantize"),
        "smooth": Param(bool, True, "fold SmoothQuant scales into the weights first"),
        "smooth_alpha": Param(float, 0.75, "smoothing migration strength", min=0.0, max=1.0),
        "accuracy_aware": Param(bool, True, "keep the most sensitive MatMuls/Gemms float until the check rows "
                                            "reach the gate"),
        "target_cosine": Param(float, 0.99, "the per-vector cosine-min to reach when the job's gate sets none",
                               min=-1.0, max=1.0),
        "margin": Param(float, 0.003, "how far above the threshold the check rows must be", min=0.0, max=0.1),
        "max_float_ops": Param(int, 8, "the most MatMuls/Gemms kept in float", min=0),
        "max_latency_ratio": Param(float, 0.9, "stop keeping nodes float when the model would be slower than this "
                                              "fraction of the float model", min=0.05, max=1.0),
        "tuning_budget_s": Param(float, 180.0, "seconds the recipe trials and the float-node search may take",
                                 min=0.0),
        "check_fraction": Param(float, 0.5, "the share of the calibration rows kept for checking", min=0.1, max=0.9),
    }

    def optimize(self, request: OptimizeRequest) -> Path:
        from shared.inference.runtime import check_loads
        from shared.settings import Settings
        from worker.support.quant_calibration import split_calibration

        params = request.params
        if not request.samples:
            raise UserInputError(f"optimize variant {self.name} needs calibration samples (model.samples)")
        workdir = Path(request.workdir).absolute()
        output = workdir / "model.onnx"
        scratch = workdir / ".static-scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        isa = cpu_isa()
        recipes = (tuple(recipe_order(isa)) if params["weight_type"] == "auto"
                   else (WeightRecipe(params["weight_type"], params["reduce_range"]),))
        meta: dict = {"format": "QDQ", "per_channel": params["per_channel"], "smooth_alpha": "off",
                      "activation_type": params["activation_type"], "calibrate_method": params["calibrate_method"]}
        try:
            source = stage_copy(Path(request.model).absolute(), scratch / "input")
            threads = Settings().bench_threads
            split = split_calibration(request.samples, request.reference or None, source,
                                      check_fraction=params["check_fraction"], threads=threads)
            quant_input = source
            if params["smooth"]:
                smoothed = smooth(source, scratch / "smooth" / "model.onnx", split.all_rows, params["smooth_alpha"])
                if smoothed is not None:
                    quant_input = smoothed.path
                    meta["smooth_alpha"] = params["smooth_alpha"]
            rows = split.all_rows

            def build(recipe: WeightRecipe, exclude: Sequence[str], target: Path) -> Path:
                return _quantize(quant_input, target, rows, recipe, exclude, params, model=request.model)

            config = TuningConfig(
                threshold=gate_threshold(request.gate, params["target_cosine"]),
                margin=params["margin"], accuracy_aware=params["accuracy_aware"],
                max_float_ops=params["max_float_ops"], max_latency_ratio=params["max_latency_ratio"],
                budget_s=params["tuning_budget_s"], recipes=recipes or (INT8,), threads=threads)
            result = tune(source, quant_input, build, split, config, scratch / "tuning", isa)
            shutil.move(str(result.model), str(output))
            meta.update({key.removeprefix("modelyard.int8."): value for key, value in result.metadata().items()})
            set_metadata(output, {f"modelyard.int8.{key}": value for key, value in meta.items()})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return check_loads(output, self.name)


def _quantize(source: Path, target: Path, rows: dict, recipe: WeightRecipe, exclude: Sequence[str], params: dict, *,
              model: Path) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    count = len(next(iter(rows.values())))
    feeds = [{name: np.ascontiguousarray(value[i:i + 1]) for name, value in rows.items()} for i in range(count)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._rows = iter(feeds)

        def get_next(self):
            return next(self._rows, None)

    activation = params["activation_type"]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        quantize_static(
            model_input=str(source),
            model_output=str(target),
            calibration_data_reader=Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=params["op_types"],
            per_channel=params["per_channel"],
            reduce_range=recipe.reduce_range,
            activation_type=QuantType.QInt8 if activation == "int8" else QuantType.QUInt8,
            weight_type=QuantType.QUInt8 if recipe.weight_type == "uint8" else QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[params["calibrate_method"]],
            extra_options={"ActivationSymmetric": activation == "int8",
                           "CalibPercentile": params["percentile"],
                           "CalibTensorRangeSymmetric": activation == "int8"},
        )
    except Exception as exc:
        raise UserInputError(f"int8-static could not quantize {Path(model).name}: "
                             f"{type(exc).__name__}: {one_line(exc)}") from None
    drop_shape_annotations(target)
    return target
