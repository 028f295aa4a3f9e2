"""TFLite dynamic-range quantization (``Optimize.DEFAULT``, no representative data).

Weights are stored as int8 (about 4x smaller); activations stay float and are quantized on
the fly by kernels that support it. Inputs and outputs stay float32. Re-converted from the
SavedModel the convert stage stores beside the ``.tflite``.
"""

from __future__ import annotations

from pathlib import Path

from worker.plugins.base import Optimizer, OptimizeRequest


class TfliteDynamicRange(Optimizer):
    name = "dynamic-range"
    applies_to = ("tflite",)
    tools = ("tensorflow-cpu", "ai-edge-litert")

    def optimize(self, request: OptimizeRequest) -> Path:
        from worker.support.tf_export import import_tensorflow, requantize

        tf = import_tensorflow()

        def configure(converter) -> None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]

        return requantize(request, self.name, configure)
