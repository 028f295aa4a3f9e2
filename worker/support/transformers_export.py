"""A Hugging Face model as one exportable module, and its export to ONNX (TorchScript exporter).

``task_module`` wraps the model so that it takes the inputs positionally and returns the one
output the task exports (``transformers_models.task_output``). ``export_onnx`` writes
``model.onnx`` into the workdir; a model over protobuf's 2 GiB cap gets ``model.onnx.data``
beside it (the TorchScript exporter writes one file per tensor there: they are gathered).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from shared.errors import UserInputError, one_line
from worker.support.transformers_models import task_output


def task_module(model, input_names: list[str], task: str, pooling: dict | None = None):
    """An nn.Module taking the inputs positionally and returning the one output tensor."""
    import torch

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            return task_output(self.model, dict(zip(input_names, tensors, strict=True)), task, pooling)

    return Wrapper().eval()


def export_onnx(module, args: tuple, workdir: Path, input_names: list[str], output_name: str,
                dynamic_axes: dict[str, dict[int, str]], opset: int) -> str:
    """Export to workdir/model.onnx (+ model.onnx.data over 2 GiB); returns the model file's name."""
    import torch

    from shared.inference.runtime import PROTO_LIMIT

    workdir = Path(workdir)
    staging = workdir / ".export"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    target = workdir / "model.onnx"
    try:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    args,
                    str(staging / "model.onnx"),
                    input_names=list(input_names),
                    output_names=[output_name],
                    dynamic_axes=dynamic_axes,
                    opset_version=opset,
                    dynamo=False,
                    do_constant_folding=True,
                )
        except Exception as exc:
            message = one_line(exc)
            raise UserInputError(f"the model could not be exported to ONNX (opset {opset}): {message}") from None
        files = [p for p in staging.iterdir() if p.name != "model.onnx"]
        params = sum(t.numel() * t.element_size() for t in module.parameters())
        if not files and params < PROTO_LIMIT:
            (staging / "model.onnx").replace(target)
        else:
            import onnx

            from shared.inference.runtime import save_onnx

            save_onnx(onnx.load(str(staging / "model.onnx"), load_external_data=True), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return "model.onnx"
