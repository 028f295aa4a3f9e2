"""TFLite with float16 weights (``Optimize.DEFAULT`` + ``supported_types=[float16]``).

Re-converted from the SavedModel the convert stage stores beside the ``.tflite``. Inputs and
outputs stay float32; weights are stored as float16 (about half the size) and dequantized to
float32 on a CPU, so it is no faster there: it is meant for GPU delegates.
"""

from __future__ import annotations

from pathlib import Path

from worker.plugins.base import Optimizer, OptimizeRequest


class TfliteFloat16(Optimizer):
    name = "float16"
    applies_to = ("tflite",)
    gpu_benefit = True
    tools = ("tensorflow-cpu", "ai-edge-litert")

    def optimize(self, request: OptimizeRequest) -> Path:
        from worker.support.tf_export import import_tensorflow, requantize

        tf = import_tensorflow()

        def configure(converter) -> None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]

        return requantize(request, self.name, configure)
