"""What the PyTorch converters share: input specs, sample inputs, the reference run and the ONNX export.

Inputs come from ``model.inputs`` in the job, else from the user's samples ``.npz`` (names and
dtypes from the arrays, the first axis taken as the batch), else from what the format itself
declares (a ``.pt2`` program). Generated samples are drawn with ``convert.samples.seed``; a
symbolic dim is ``convert.samples.batch`` when its name says batch (or it is the first axis),
``convert.samples.sequence`` otherwise.

The export is ``torch.onnx.export(dynamo=False)`` with every symbolic input dim a dynamic axis.
When the batch axis is dynamic the exported model is also run at a different batch size and
compared with the torch module there: a model traced with a fixed batch baked into a reshape
fails that check instead of being deployed with a dynamic axis it does not have.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np

from shared.arrays import Arrays, TensorInfo
from shared.errors import UserInputError, one_line
from worker.support.plugin_io import ConvertRequest, ConvertResult
from worker.support.samples import samples_for


def input_specs(request: ConvertRequest, *, declared: list[TensorInfo] | None = None) -> list[TensorInfo]:
    """The model's inputs: model.inputs, else the samples .npz, else what the format declares."""
    if request.model.inputs:
        return [TensorInfo(t.name, t.dtype, list(t.shape)) for t in request.model.inputs]
    if request.samples is not None:
        return [
            TensorInfo(name, np.asarray(value).dtype.name,
                       ["batch" if i == 0 else int(d) for i, d in enumerate(np.shape(value))])
            for name, value in request.samples.items()
        ]
    if declared is not None:
        return declared
    raise UserInputError(
        f"model.inputs is required for format {request.model.format} (the file does not record its inputs): "
        "e.g. inputs: [{name: x, dtype: float32, shape: [batch, 3, 224, 224]}], "
        "or give sample inputs with model.samples"
    )


def run_module(module, samples: Arrays, inputs: list[TensorInfo], label: str) -> tuple[list[str], Arrays]:
    """Run the torch module on the samples: (output names, outputs as float/int numpy arrays)."""
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(samples[t.name])) for t in inputs)
    try:
        with torch.inference_mode():
            out = module(*args)
    except Exception as exc:
        shapes = ", ".join(f"{t.name} {list(samples[t.name].shape)}" for t in inputs)
        raise UserInputError(f"{label}: the model fails on the sample inputs ({shapes}): {one_line(exc)}") from None
    return _flatten_outputs(out, label)


def _flatten_outputs(out, label: str) -> tuple[list[str], Arrays]:
    import torch

    if isinstance(out, torch.Tensor):
        items = [("output", out)]
    elif isinstance(out, (tuple, list)) and out and all(isinstance(v, torch.Tensor) for v in out):
        items = [(f"output_{i}", v) for i, v in enumerate(out)]
    elif isinstance(out, dict) and out and all(isinstance(v, torch.Tensor) for v in out.values()):
        items = [(str(k), v) for k, v in out.items()]
    else:
        raise UserInputError(
            f"{label}: the model returns {type(out).__name__}; supported outputs are a tensor, "
            "a tuple or list of tensors, or a dict of tensors"
        )
    return [name for name, _ in items], {name: value.detach().cpu().numpy().copy() for name, value in items}


def export_onnx(
    module,
    samples: Arrays,
    inputs: list[TensorInfo],
    request: ConvertRequest,
    label: str,
    *,
    preserve_training: bool = False,
) -> tuple[str, Arrays, list[TensorInfo]]:
    """Compute the reference outputs and export ``request.workdir/model.onnx``.

    Returns (model file relative to workdir, reference outputs by name, output infos).
    ``preserve_training`` leaves the module's train/eval mode alone (``torch.export`` modules
    refuse ``.train()``; the caller sets ``training = False`` on them beforehand).
    """
    import torch

    output_names, reference = run_module(module, samples, inputs, label)
    dynamic_axes: dict[str, dict[int, str]] = {}
    sizes: dict[str, int] = {}
    for tensor in inputs:
        axes = {i: dim for i, dim in enumerate(tensor.shape) if isinstance(dim, str)}
        if axes:
            dynamic_axes[tensor.name] = axes
        for i, dim in axes.items():
            sizes.setdefault(dim, int(samples[tensor.name].shape[i]))
    batch = _batch_dim(inputs)
    by_size: dict[int, list[str]] = {}
    for dim, size in sizes.items():
        by_size.setdefault(size, []).append(dim)
    for name in output_names:
        axes = {}
        for i, size in enumerate(reference[name].shape):
            if i == 0 and batch is not None and size == sizes[batch]:
                axes[0] = batch
            elif i > 0 and len(by_size.get(size, [])) == 1 and by_size[size][0] != batch:
                axes[i] = by_size[size][0]
        if axes:
            dynamic_axes[name] = axes

    workdir = Path(request.workdir)
    staging = workdir / ".export"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    target = workdir / "model.onnx"
    args = tuple(torch.from_numpy(np.ascontiguousarray(samples[t.name])) for t in inputs)
    mode = torch.onnx.TrainingMode.PRESERVE if preserve_training else torch.onnx.TrainingMode.EVAL
    opset = request.convert.opset
    try:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module, args, str(staging / "model.onnx"),
                    input_names=[t.name for t in inputs], output_names=output_names,
                    dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
                    do_constant_folding=True, training=mode,
                )
        except Exception as exc:
            raise UserInputError(f"{label}: the model could not be exported to ONNX (opset {opset}): "
                                 f"{one_line(exc)}") from None
        if any(p.name != "model.onnx" for p in staging.iterdir()):
            import onnx

            from shared.inference.runtime import save_onnx

            save_onnx(onnx.load(str(staging / "model.onnx"), load_external_data=True), target)
        else:
            (staging / "model.onnx").replace(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    outputs = [
        TensorInfo(name, reference[name].dtype.name,
                   [dynamic_axes.get(name, {}).get(i, int(d)) for i, d in enumerate(reference[name].shape)])
        for name in output_names
    ]
    if batch is not None:
        _check_batch_is_dynamic(module, target, samples, inputs, batch, request, label)
    return "model.onnx", reference, outputs


def _batch_dim(inputs: list[TensorInfo]) -> str | None:
    for tensor in inputs:
        if tensor.shape and isinstance(tensor.shape[0], str):
            return tensor.shape[0]
    return None


def _check_batch_is_dynamic(module, model: Path, samples: Arrays, inputs, batch: str, request, label: str) -> None:
    """Run torch and the ONNX model at another batch size; they must still agree."""
    from shared.inference.fidelity import compare
    from shared.inference.runtime import load_session

    size = next(int(samples[t.name].shape[0]) for t in inputs if t.shape and t.shape[0] == batch)
    other = 1 if size > 1 else 2
    resized = {}
    for tensor in inputs:
        value = samples[tensor.name]
        if tensor.shape and tensor.shape[0] == batch:
            value = value[:other] if other < size else np.concatenate([value] * other, axis=0)
        resized[tensor.name] = np.ascontiguousarray(value)
    try:
        _, expected = run_module(module, resized, inputs, label)
        actual = load_session(model, threads=request.settings.bench_threads).run(resized)
        figures = compare(expected, actual)
    except UserInputError as exc:
        failure = str(exc).removeprefix(f"{label}: ")
    else:
        tolerance = request.convert.tolerance
        failure = None
        if (tolerance.max_abs is not None and figures["max_abs"] > tolerance.max_abs) or (
            figures["cosine_min"] < tolerance.cosine_min
        ):
            failure = f"max_abs {figures['max_abs']:.3g}, cosine_min {figures['cosine_min']:.5f}"
    if failure:
        raise UserInputError(
            f"{label}: the exported model does not handle another batch size: at {batch}={other} it differs from "
            f"the source model ({one_line(failure)}). The model fixes its batch size (e.g. it was traced at batch "
            f"{size}); give the batch as a number in model.inputs, or export the model with a dynamic batch"
        )


def single_file(source: Path, label: str, what: str, suffixes: tuple[str, ...] = ()) -> Path:
    """The source file itself, or the only matching file of a folder source."""
    if source.is_dir():
        found = sorted(p for p in source.iterdir() if p.is_file() and (not suffixes or p.suffix.lower() in suffixes))
        if len(found) != 1:
            raise UserInputError(f"{label}: a folder source must hold exactly one {what} "
                                 f"(found: {', '.join(p.name for p in found) or 'none'})")
        return found[0]
    if not source.is_file():
        raise UserInputError(f"{label}: not found")
    return source


def convert_module(module, inputs: list[TensorInfo], request: ConvertRequest, label: str,
                   extra: dict | None = None, **export_options) -> ConvertResult:
    """Samples, the module's reference outputs and the ONNX export, as a ConvertResult."""
    import torch

    samples, origin = samples_for(request, inputs)
    model_file, reference, outputs = export_onnx(module, samples, inputs, request, label, **export_options)
    return ConvertResult(
        model_file=model_file, samples=samples, reference=reference, inputs=inputs, outputs=outputs,
        extra={"torch": torch.__version__, **(extra or {}), "samples": origin, "opset": request.convert.opset},
    )
