"""Weights + an architecture factory -> ONNX.

The job names the factory as ``model.factory: package.module:callable`` (e.g.
``torchvision.models:resnet18``); it is called with no arguments and must return an
``nn.Module`` whose ``load_state_dict(strict=True)`` accepts the weights. Importing a module runs
its code, so the factory must match a pattern in the ``MODELYARD_ALLOWED_FACTORIES`` setting
(default ``["torchvision.models:*"]``), checked before anything is imported.

Weights: ``.safetensors`` (a format with no code in it), or a ``torch.save`` file
(``.pt`` / ``.pth`` / ``.bin``) read only with ``torch.load(weights_only=True)``, whose
restricted unpickler refuses any global outside torch's tensor types. A checkpoint holding the
weights under ``state_dict`` or ``model`` is unwrapped. The checks and the loading live in
``worker.support.torch_weights``, which the compress stage (channel pruning) shares.
"""

from __future__ import annotations

from pathlib import Path

from worker.plugins.base import Converter, ConvertRequest, ConvertResult
from worker.support.torch_weights import build_module, check_factory, load_state, load_weights, weights_file


class TorchStateDict(Converter):
    name = "torch-state-dict"
    targets = ("onnx",)
    tools = ("torch", "safetensors", "onnx", "onnxruntime")
    prune_methods = ("channels",)

    def convert(self, request: ConvertRequest) -> ConvertResult:
        from worker.support.torch_onnx import convert_module, input_specs

        label = f"model.source {request.model.source}"
        factory = check_factory(request.model.factory, request.settings.allowed_factories)
        weights = weights_file(Path(request.source), label)
        inputs = input_specs(request)
        state = load_weights(weights, label)
        module = build_module(factory, label)
        load_state(module, state, label, factory)
        module.eval()
        return convert_module(module, inputs, request, label, {
            "factory": factory, "architecture": type(module).__name__, "weights": weights.suffix.lower()})
