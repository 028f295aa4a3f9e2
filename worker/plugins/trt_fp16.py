"""``trt-fp16``: the model served by ONNX Runtime's TensorRT execution provider in FP16.

The ONNX file stays as it is (FP32); TensorRT builds an FP16 engine for it. The engine is built
here, on the samples, into ``trt_cache/`` beside the model, and is stored as an artifact with it
(``trt_engine_cache_enable``), so the measurement and a server on the same GPU model and
TensorRT version load it instead of building it again. TensorRT engines are specific to the GPU
model and the TensorRT version: the step key of a gpu-pool variant includes the GPU's name.

Refused with a UserInputError (an error row in the select table, not a failed job) on a worker
whose ONNX Runtime has no TensorRT execution provider.
"""

from __future__ import annotations

from pathlib import Path

from worker.plugins.base import Optimizer, OptimizeRequest
from worker.support.tensorrt import build_engine


class TrtFp16(Optimizer):
    name = "trt-fp16"
    applies_to = ("onnx",)
    gpu_benefit = True
    tensorrt = "fp16"  # read by worker.gpu.Execution: run this variant under TensorRT at this precision
    tools = ("onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt")

    def optimize(self, request: OptimizeRequest) -> Path:
        return build_engine(request, self.tensorrt)

