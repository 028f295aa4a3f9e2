"""``trt-int8``: the model served by ONNX Runtime's TensorRT execution provider in INT8 (FP16 fallback).

A model that already holds QuantizeLinear/DequantizeLinear pairs (``int8-static+trt-int8``) is
built as it is (explicit quantization). Otherwise activation ranges are calibrated here with
ONNX Runtime's MinMax calibrator on the job's samples, on the CPU, and written as
``trt_cache/calibration.flatbuffers``, the table the TensorRT provider reads
(``trt_int8_calibration_table_name``). The engine and the table are stored with the model, as
for ``trt-fp16``.

Refused with a UserInputError on a worker whose ONNX Runtime has no TensorRT execution provider.
"""

from __future__ import annotations

from pathlib import Path

from shared.errors import UserInputError
from worker.plugins.base import Optimizer, OptimizeRequest
from worker.support.tensorrt import build_engine, write_calibration


class TrtInt8(Optimizer):
    name = "trt-int8"
    applies_to = ("onnx",)
    gpu_benefit = True
    tensorrt = "int8"  # read by worker.gpu.Execution
    tools = ("onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt")

    def optimize(self, request: OptimizeRequest) -> Path:
        if not request.samples:
            raise UserInputError(f"optimize variant {self.name} needs calibration samples (model.samples)")
        return build_engine(request, self.tensorrt,
                            prepare=lambda model, cache: write_calibration(model, request.samples, cache))
