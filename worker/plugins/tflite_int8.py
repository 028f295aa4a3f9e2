"""TFLite full-integer quantization: int8 weights and activations, float32 inputs and outputs.

Calibrated on a representative dataset drawn from the job's samples (the ``.npz`` the job
gave, else the generated ones), one sample at a time, at most ``calibration_samples`` (200).
Every operator must have an int8 kernel (``TFLITE_BUILTINS_INT8``): a model with one that
has none is refused rather than silently left in float.

Inputs and outputs are kept float32 (a quantize op at the entry, a dequantize at the exit),
so the model is a drop-in replacement and its outputs compare directly with the reference;
int8 inputs/outputs would make every caller quantize by hand with the model's scale and zero
point. Re-converted from the SavedModel the convert stage stores beside the ``.tflite``.
"""

from __future__ import annotations

from pathlib import Path

from worker.plugins.base import Optimizer, OptimizeRequest, Param


class TfliteInt8(Optimizer):
    name = "int8"
    applies_to = ("tflite",)
    tools = ("tensorflow-cpu", "ai-edge-litert")
    params = {"calibration_samples": Param(int, 200, "the most samples the calibration runs on", min=1)}

    def optimize(self, request: OptimizeRequest) -> Path:
        from worker.support.tf_export import import_tensorflow, representative_batches, requantize

        limit = request.params["calibration_samples"]
        tf = import_tensorflow()

        def configure(converter) -> None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative_batches(request.samples, request.inputs, limit)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.float32
            converter.inference_output_type = tf.float32

        return requantize(request, self.name, configure)
