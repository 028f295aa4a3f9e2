"""FP16 text-generation model for CUDA (the gpu pool): ONNX Runtime GenAI's builder at ``-p fp16 -e cuda``.

Half the bytes of fp32, weights and KV cache in float16, with the builder's CUDA graph choices;
its genai_config.json asks for the CUDA execution provider, so it is meant for a gpu-pool worker
and a GPU server. Routed to the gpu pool when the job says ``device: gpu``.
"""

from __future__ import annotations

from pathlib import Path

from worker.plugins.base import Optimizer, OptimizeRequest
from worker.support.genai_builder import BUILDER_TOOLS, rebuild_variant


class GenaiFp16Cuda(Optimizer):
    name = "fp16-cuda"
    applies_to = ("onnx",)
    generation = True
    gpu_benefit = True
    tools = BUILDER_TOOLS

    def optimize(self, request: OptimizeRequest) -> Path:
        return rebuild_variant(request.model, request.workdir, request.settings, variant=self.name,
                               precision="fp16", provider="cuda")
