"""Weight-only INT8 for text-generation models: block-wise 8-bit MatMulNBits from ONNX Runtime GenAI's builder.

As ``int4`` with 8-bit weights: about a quarter of fp32's bytes (and twice int4's), with a
fidelity close to fp32's. Named ``int8-weights`` because ``int8`` is the TFLite full-integer variant.
"""

from __future__ import annotations

from pathlib import Path

from worker.plugins.base import Optimizer, OptimizeRequest, Param
from worker.support.genai_builder import BUILDER_TOOLS, rebuild_variant


class GenaiInt8Weights(Optimizer):
    name = "int8-weights"
    applies_to = ("onnx",)
    generation = True
    tools = BUILDER_TOOLS
    params = {
        "block_size": Param(int, 32, "input channels per quantization scale", choices=(16, 32, 64, 128, 256)),
        "accuracy_level": Param(int, 4, "MatMulNBits compute precision: 1 fp32, 2 fp16, 3 bf16, 4 int8",
                                choices=(1, 2, 3, 4)),
        "embeddings": Param(bool, False, "also quantize the token embedding table (GatherBlockQuantized)"),
    }

    def optimize(self, request: OptimizeRequest) -> Path:
        params = request.params
        options: dict[str, object] = {"block_size": params["block_size"], "accuracy_level": params["accuracy_level"]}
        if params["embeddings"]:
            options["op_types_to_quantize"] = "MatMul/Gather"
        return rebuild_variant(request.model, request.workdir, request.settings, variant=self.name,
                               precision="int8", options=options)
