"""A model's inputs as the job describes them (``model.inputs``), checked against the model's own.

The ``onnx``, ``keras`` and ``tf-savedmodel`` converters read the inputs the model declares;
a job may still list them, to name symbolic dimensions (``batch``, ``sequence``) that the
sample generator and the exported graph then use. The names must match exactly and fixed
dimensions must agree; the model decides the dtype (the runtime casts to it).
"""

from __future__ import annotations

from shared.arrays import TensorInfo
from shared.errors import UserInputError
from worker.support.plugin_io import ConvertRequest


def input_infos(declared: list[TensorInfo], request: ConvertRequest, label: str) -> list[TensorInfo]:
    """``model.inputs`` reconciled with the model's ``declared`` inputs; the declared ones when the job has none."""
    spec = request.model.inputs
    if not spec:
        return list(declared)
    by_name = {t.name: t for t in declared}
    named = {t.name for t in spec}
    unknown = sorted(named - by_name.keys())
    missing = sorted(by_name.keys() - named)
    if unknown or missing:
        detail = []
        if unknown:
            detail.append(f"not in the model: {', '.join(unknown)}")
        if missing:
            detail.append(f"not described: {', '.join(missing)}")
        raise UserInputError(
            f"model.inputs does not match {label} ({'; '.join(detail)}; the model takes: {', '.join(by_name)})"
        )
    result = []
    for tensor in spec:
        graph = by_name[tensor.name]
        if len(tensor.shape) != len(graph.shape):
            raise UserInputError(
                f"model.inputs: {tensor.name} has {len(tensor.shape)} dimensions, the model's has {len(graph.shape)} "
                f"{graph.shape}"
            )
        for dim, want in zip(tensor.shape, graph.shape, strict=True):
            if isinstance(dim, int) and isinstance(want, int) and dim != want:
                raise UserInputError(
                    f"model.inputs: {tensor.name} shape {tensor.shape} conflicts with the model's {graph.shape}"
                )
        result.append(TensorInfo(tensor.name, graph.dtype, list(tensor.shape)))
    return result
