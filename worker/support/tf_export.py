"""TensorFlow models as one serving function, and its SavedModel, ONNX and TFLite exports.

Shared by the ``keras`` and ``tf-savedmodel`` converters and the TFLite optimizers. Both
converters reduce their source to a ``tf.function`` that takes the inputs positionally (each
``TensorSpec`` named after its input, batch dimension ``None``) and returns a dict of named
outputs. From that one function:

- the reference outputs are computed by TensorFlow itself;
- ONNX is written by ``tf2onnx.convert.from_function`` (``from_keras`` fails on Keras 3);
- a normalized SavedModel with one ``serving_default`` signature is written to
  ``saved_model/`` beside the converted model. TFLite is converted from it, and the TFLite
  optimizers re-convert from it: post-training quantization needs the source graph, not a
  ``.tflite``.

Input and output names are the same in the source, the ONNX file and the TFLite signature, so
the reference outputs can be compared with either runtime by name.

TensorFlow is imported inside the functions: a prefork worker whose parent imported it
hangs in its children.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from shared.arrays import Arrays, TensorInfo
from shared.errors import UserInputError, one_line
from worker.support.plugin_io import ConvertRequest, ConvertResult

SAVED_MODEL = "saved_model"  # folder in the convert outputs: the source the TFLite optimizers re-convert
SIGNATURE = "serving_default"


def import_tensorflow(threads: int | None = None):
    """TensorFlow with its C++ log noise off and, when it is still possible, pinned thread counts."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # already initialized in this process: keep what it has
            pass
    return tf



def tensor_specs(inputs: list[TensorInfo]) -> list:
    tf = import_tensorflow()
    return [
        tf.TensorSpec([d if isinstance(d, int) else None for d in t.shape], tf.as_dtype(t.dtype), name=t.name)
        for t in inputs
    ]


def symbolic_shape(shape: Any) -> list[int | str]:
    """A TF shape as TensorInfo dims: the first unknown dim is 'batch', others 'dim<i>'."""
    dims: list[int | str] = []
    for i, dim in enumerate(list(shape)):
        if dim is None or (isinstance(dim, int) and dim < 0):
            dims.append("batch" if i == 0 else f"dim{i}")
        else:
            dims.append(int(dim))
    return dims


def serving_function(call: Callable[..., dict], inputs: list[TensorInfo]):
    """A ``tf.function`` over ``call(*tensors) -> {name: tensor}`` with a named input signature."""
    tf = import_tensorflow()
    return tf.function(lambda *tensors: call(*tensors), input_signature=tensor_specs(inputs), autograph=False)


def run_reference(function, inputs: list[TensorInfo], samples: Arrays, label: str) -> Arrays:
    """The source framework's outputs on the samples, by output name (float32 where floating)."""
    tf = import_tensorflow()
    try:
        result = function(*[tf.constant(samples[t.name]) for t in inputs])
    except (tf.errors.OpError, ValueError, TypeError) as exc:
        shapes = {name: list(value.shape) for name, value in samples.items()}
        raise UserInputError(f"{label}: the model fails on the sample inputs {shapes}: {one_line(exc)}") from None
    return {name: np.asarray(value.numpy()) for name, value in result.items()}


def output_infos(reference: Arrays) -> list[TensorInfo]:
    return [
        TensorInfo(name, value.dtype.name, ["batch", *[int(d) for d in value.shape[1:]]])
        for name, value in reference.items()
    ]


def save_signature(trackable, function, dest: Path) -> Path:
    """Write a SavedModel whose serving signature (``serving_default``) is ``function``.

    A Keras model goes through Keras's own ``ExportArchive``: saved as a plain ``tf.Module``
    attribute, its variables (all named ``kernel`` / ``bias``) load back right in TensorFlow
    but the TFLite converter freezes the wrong values into the graph (accuracy 0.11 on digits).
    """
    tf = import_tensorflow()
    import keras

    if isinstance(trackable, keras.Model):
        archive = keras.export.ExportArchive()
        archive.track(trackable)
        archive.add_endpoint(SIGNATURE, function)
        archive.write_out(str(dest), verbose=False)
        return dest
    module = tf.Module()
    module.model = trackable
    module.serve = function
    tf.saved_model.save(module, str(dest), signatures={SIGNATURE: function.get_concrete_function()})
    return dest


def to_onnx(function, inputs: list[TensorInfo], path: Path, opset: int, label: str) -> Path:
    """tf2onnx of the serving function; symbolic dims keep the inputs' names (tf2onnx says ``unk__12``)."""
    import tf2onnx

    from shared.inference.runtime import save_onnx

    try:
        proto, _ = tf2onnx.convert.from_function(function, input_signature=tensor_specs(inputs), opset=opset)
    except Exception as exc:
        raise UserInputError(
            f"{label}: tf2onnx cannot convert the model: {type(exc).__name__}: {one_line(exc)}") from None
    shapes = {t.name: t.shape for t in inputs}
    for value in proto.graph.input:
        for dim, want in zip(value.type.tensor_type.shape.dim, shapes.get(value.name, [])):
            if isinstance(want, str):
                dim.dim_param = want
    for value in proto.graph.output:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_param"):
            dims[0].dim_param = "batch"
    save_onnx(proto, path)
    return path


def to_tflite(
    saved_model: Path,
    path: Path,
    label: str,
    *,
    configure: Callable[[Any], None] | None = None,
) -> Path:
    """Convert the SavedModel's serving signature to ``path``; ``configure(converter)`` sets options."""
    tf = import_tensorflow()
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=[SIGNATURE])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if configure is not None:
        configure(converter)
    try:
        flatbuffer = converter.convert()
    except Exception as exc:
        raise UserInputError(
            f"{label}: the TFLite converter refuses the model (only built-in TFLite ops are supported): "
            f"{one_line(exc, 500)}"
        ) from None
    Path(path).write_bytes(flatbuffer)
    return Path(path)


def representative_batches(samples: Arrays, inputs: list[TensorInfo], limit: int = 200) -> Callable[[], Iterator]:
    """A TFLite representative dataset: one sample at a time (batch 1), at most ``limit`` of them."""

    def generate() -> Iterator[dict[str, np.ndarray]]:
        count = min(len(samples[inputs[0].name]), limit)
        for i in range(count):
            yield {t.name: np.asarray(samples[t.name][i : i + 1]).astype(t.dtype) for t in inputs}

    return generate


def requantize(request, variant: str, configure: Callable[[Any], None]) -> Path:
    """A TFLite optimizer's work: re-convert the SavedModel stored beside ``request.model``.

    The convert stage for ``to: tflite`` writes ``saved_model/`` next to ``model.tflite`` and the
    optimize stage downloads every convert output into one folder, so it is found there.
    """
    from shared.inference.runtime import load_session
    from worker.support.savedmodel_check import check_saved_model

    saved = Path(request.model).parent / SAVED_MODEL
    if not (saved / "saved_model.pb").is_file():
        raise UserInputError(
            f"optimize variant {variant}: needs the SavedModel the convert stage stores beside a .tflite it "
            f"converts (keras / tf-savedmodel sources); {Path(request.model).name} has none"
        )
    # The converter loads it (init ops and all): checked like a user's SavedModel, whoever wrote it.
    check_saved_model(saved, f"optimize variant {variant}: {SAVED_MODEL}")
    output = Path(request.workdir) / "model.tflite"
    with warnings.catch_warnings():  # int8 calibration runs TF's own (deprecated) interpreter, which says so
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated", category=UserWarning)
        to_tflite(saved, output, f"optimize variant {variant}", configure=configure)
    try:
        load_session(output, threads=1)
    except UserInputError as exc:
        raise UserInputError(f"optimize variant {variant} produced a model that cannot be run: {exc}") from None
    return output


def export(trackable, function, inputs: list[TensorInfo], samples: Arrays, request: ConvertRequest, label: str,
           extra: dict) -> ConvertResult:
    """Run the source function for the reference, then write model.onnx or model.tflite (+ its SavedModel)."""
    reference = run_reference(function, inputs, samples, label)
    workdir = Path(request.workdir)
    if request.convert.to == "onnx":
        to_onnx(function, inputs, workdir / "model.onnx", request.convert.opset, label)
        model_file = "model.onnx"
    else:
        saved = save_signature(trackable, function, workdir / SAVED_MODEL)
        to_tflite(saved, workdir / "model.tflite", label)
        model_file = "model.tflite"
    return ConvertResult(model_file=model_file, samples=samples, reference=reference, inputs=inputs,
                         outputs=output_infos(reference), extra=extra)
