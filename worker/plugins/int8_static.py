"""Static INT8 quantization (QDQ): weights and activations quantized ahead of time.

Activation ranges come from calibration on the job's sample inputs (``request.samples``, or
the user's ``model.samples`` .npz when the job names one), fed one row at a time.

Parameters (all optional):
  calibrate_method: str = "percentile"   minmax | entropy | percentile
  percentile: float = 99.999             with calibrate_method percentile
  per_channel: bool = true               per-output-channel weight scales
  activation_type: str = "uint8"         uint8 | int8 (int8: symmetric activations)
  op_types: list = [MatMul, Gemm, Conv]  the operators to quantize
  smooth: bool = true                    fold SmoothQuant scales in first (see int8_dynamic)
  smooth_alpha: float = 0.75

Measured on all-MiniLM-L6-v2 (AVX2, no VNNI): static QDQ loses far more fidelity than the
dynamic recipe on transformers (one fixed activation scale per tensor for every input), so
the fidelity gate usually rejects it there; it suits CNNs, whose activations are tame.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from shared.errors import UserInputError
from worker.plugins.base import OptimizeRequest, Optimizer
from worker.plugins.int8_dynamic import _smooth, check_params, stage_copy

PARAMS = {
    "calibrate_method": str,
    "percentile": float,
    "per_channel": bool,
    "activation_type": str,
    "op_types": list,
    "smooth": bool,
    "smooth_alpha": float,
}
METHODS = ("minmax", "entropy", "percentile")


class Int8Static(Optimizer):
    name = "int8-static"
    applies_to = ("onnx",)

    def optimize(self, request: OptimizeRequest) -> Path:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        from worker.runtime import check_loads

        raw = {k: float(v) if PARAMS.get(k) is float and type(v) is int else v for k, v in request.params.items()}
        params = check_params(self.name, raw, PARAMS)
        method = params.get("calibrate_method", "percentile")
        if method not in METHODS:
            raise UserInputError(f"optimize variant {self.name}: calibrate_method must be one of {', '.join(METHODS)}")
        activation = params.get("activation_type", "uint8")
        if activation not in ("uint8", "int8"):
            raise UserInputError(f"optimize variant {self.name}: activation_type must be uint8 or int8")
        if not request.samples:
            raise UserInputError(f"optimize variant {self.name} needs calibration samples (model.samples)")

        workdir = Path(request.workdir).absolute()
        scratch = workdir / ".static-scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        source = stage_copy(Path(request.model).absolute(), scratch / "input")
        if params.get("smooth", True):
            smoothed = _smooth(source, scratch / "smooth" / "model.onnx", request.samples,
                               params.get("smooth_alpha", 0.75))
            source = smoothed or source

        rows = len(next(iter(request.samples.values())))
        feeds = [{name: np.ascontiguousarray(value[i:i + 1]) for name, value in request.samples.items()}
                 for i in range(rows)]

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._rows = iter(feeds)

            def get_next(self):
                return next(self._rows, None)

        output = workdir / "model.onnx"
        try:
            quantize_static(
                model_input=str(source),
                model_output=str(output),
                calibration_data_reader=Reader(),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=params.get("op_types", ["MatMul", "Gemm", "Conv"]),
                per_channel=params.get("per_channel", True),
                activation_type=QuantType.QInt8 if activation == "int8" else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                                  "percentile": CalibrationMethod.Percentile}[method],
                extra_options={"ActivationSymmetric": activation == "int8",
                               "CalibPercentile": params.get("percentile", 99.999),
                               "CalibTensorRangeSymmetric": activation == "int8"},
            )
        except Exception as exc:  # noqa: BLE001
            message = " ".join(str(exc).split())[:300]
            raise UserInputError(f"int8-static could not quantize {Path(request.model).name}: "
                                 f"{type(exc).__name__}: {message}") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return check_loads(output, self.name)
