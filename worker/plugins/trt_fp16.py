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

import socket
from pathlib import Path

from worker.plugins.base import Optimizer, OptimizeRequest
from worker.plugins.int8_dynamic import check_params, stage_copy


class TrtFp16(Optimizer):
    name = "trt-fp16"
    applies_to = ("onnx",)
    gpu_benefit = True
    tensorrt = "fp16"  # read by worker.gpu.Execution: run this variant under TensorRT at this precision
    tools = ("onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt")

    def optimize(self, request: OptimizeRequest) -> Path:
        check_params(self.name, dict(request.params), {})
        return build_engine(request, self.tensorrt)


def build_engine(request: OptimizeRequest, precision: str, prepare=None) -> Path:
    """Copy the model into the workdir and build its TensorRT engine into workdir/trt_cache."""
    import onnxruntime

    from worker.gpu import ENGINE_CACHE, choose_providers
    from worker.runtime import load_session

    available = onnxruntime.get_available_providers()
    engine_cache = Path(request.workdir).absolute() / ENGINE_CACHE
    providers = choose_providers("gpu", available, tensorrt=precision, engine_cache=engine_cache,
                                 worker=socket.gethostname())  # refuses first when TensorRT is absent
    model = stage_copy(Path(request.model).absolute(), Path(request.workdir).absolute())
    engine_cache.mkdir(exist_ok=True)
    if prepare is not None:
        prepare(model, engine_cache)
        providers = choose_providers("gpu", available, tensorrt=precision, engine_cache=engine_cache)
    session = load_session(model, threads=1, providers=providers)
    session.run(request.samples)  # builds the engine and writes it to the cache
    return model
