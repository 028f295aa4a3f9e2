"""Weight-only INT4 for text-generation models: block-wise MatMulNBits, built by ONNX Runtime GenAI's model builder.

Every linear layer's weights (and the language-model head's) become 4-bit integers with one
float scale per ``block_size`` input channels; activations stay float. ``method: rtn`` is the
builder's round-to-nearest; ``k_quant`` its k-quant search of each block's scale (no data
needed). The token embeddings stay float unless ``embeddings: true`` (GatherBlockQuantized):
with a large vocabulary they are much of what is left. ``accuracy_level`` is the precision
MatMulNBits computes in on the CPU: 4 quantizes the activations to int8 on the fly (the fast
path the builder picks for the CPU), 1 keeps them fp32.

``block_size`` defaults to 128, not the builder's 32: on a 0.41 B Llama (2-core AVX2 EPYC,
paired against fp32 in one process) block 32 decoded 3.8x fp32's tokens/s but took 1.08x its
time to first token (128-token prompt); block 128 decoded 4.1x with the same time to first token
and fewer bytes (one scale per 128 weights). On the tiny trained Llama its perplexity is 1.019x
fp32's (block 32: 1.014x; ``k_quant`` at block 32: 1.005x).

Built from the source model the convert stage keeps beside the fp32 export, as the builder
does for ``-p int4``: quantizing the source weights, not the exported graph.
"""

from __future__ import annotations

from pathlib import Path

from worker.plugins.base import Optimizer, OptimizeRequest, Param
from worker.support.genai_builder import BUILDER_TOOLS, rebuild_variant


class GenaiInt4(Optimizer):
    name = "int4"
    applies_to = ("onnx",)
    generation = True
    tools = BUILDER_TOOLS
    params = {
        "block_size": Param(int, 128, "input channels per quantization scale", choices=(16, 32, 64, 128, 256)),
        "accuracy_level": Param(int, 4, "MatMulNBits compute precision: 1 fp32, 2 fp16, 3 bf16, 4 int8",
                                choices=(1, 2, 3, 4)),
        "method": Param(str, "rtn", "rtn: round to nearest; k_quant: k-quant scale search", choices=("rtn", "k_quant")),
        "symmetric": Param(bool, True, "symmetric int4 (no zero points); false: uint4 with zero points"),
        "embeddings": Param(bool, False, "also quantize the token embedding table (GatherBlockQuantized): "
                            "the float bytes left in a model with a large vocabulary"),
    }

    def optimize(self, request: OptimizeRequest) -> Path:
        params = request.params
        options: dict[str, object] = {"block_size": params["block_size"], "accuracy_level": params["accuracy_level"],
                                      "is_symmetric": params["symmetric"]}
        if params["method"] != "rtn":  # rtn: the builder's default quantizer
            options["algo_config"] = params["method"]
        if params["embeddings"]:
            options["op_types_to_quantize"] = "MatMul/Gather"
        return rebuild_variant(request.model, request.workdir, request.settings, variant=self.name,
                               precision="int4", options=options)
