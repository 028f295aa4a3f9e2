"""FP16 weights and activations, float32 inputs and outputs (``keep_io_types=True``).

Uses ``onnxruntime.transformers.float16``: ``onnxconverter_common``'s converter of the same
name emits a model ONNX Runtime refuses to load for BERT-like graphs (a float16 ``Cast``).
Halves the size; no faster on CPU, meant for GPUs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from shared.errors import UserInputError, one_line
from worker.plugins.base import Optimizer, OptimizeRequest


class Fp16(Optimizer):
    name = "fp16"
    applies_to = ("onnx",)
    gpu_benefit = True

    def optimize(self, request: OptimizeRequest) -> Path:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        from shared.inference.runtime import check_loads, save_onnx

        output = Path(request.workdir).absolute() / "model.onnx"
        try:
            proto = onnx.load(str(request.model), load_external_data=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                converted = convert_float_to_float16(proto, keep_io_types=True)
        except Exception as exc:
            message = one_line(exc)
            raise UserInputError(
                f"fp16 could not convert {Path(request.model).name}: {type(exc).__name__}: {message}"
            ) from None
        save_onnx(converted, output)
        check_loads(output, self.name)
        return output
