"""Dynamic INT8 quantization (weights INT8 ahead of time, activations quantized at run time).

Per-channel weight scales are the default: on all-MiniLM-L6-v2 per-tensor scales lose far
more (per-token cosine min 0.84 vs 0.95 on real text) for the same size and speed.
``params: {per_channel: false}`` gives per-tensor scales.

Scratch files. Measured with onnxruntime 1.32 / onnx 1.23 and absolute paths, the quantizer
writes nothing into the process cwd, but it does write ``<name>-inferred.onnx`` beside the
*input* model and deletes it again: that fails on a read-only input folder and races when two
tasks quantize the same cached file. So the input is first copied into a scratch folder in the
workdir. Above 2 GiB (external data) ``onnx`` checks the data file's name against the cwd, so
only then the quantizer runs with the cwd in the scratch folder, under a process-wide lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from pathlib import Path

from shared.errors import UserInputError
from worker.plugins.base import Optimizer, OptimizeRequest

CWD_LOCK = threading.RLock()
PARAMS = {"per_channel": bool, "reduce_range": bool}


@contextlib.contextmanager
def working_directory(path: Path):
    """chdir for the block, under a process-wide lock; restores the previous cwd."""
    with CWD_LOCK:
        previous = os.getcwd()
        os.chdir(path)
        try:
            yield
        finally:
            os.chdir(previous)


def _drop_preprocess_hint(record: logging.LogRecord) -> bool:
    """quantize_dynamic logs a pre-processing hint on the root logger at every call; drop it."""
    return not str(record.msg).startswith("Please consider to run pre-processing")


def check_params(variant: str, params: dict, known: dict[str, type]) -> dict:
    for key, value in params.items():
        if key not in known:
            raise UserInputError(
                f"optimize variant {variant}: unknown parameter {key!r} (known: {', '.join(known) or 'none'})"
            )
        if not isinstance(value, known[key]):
            raise UserInputError(
                f"optimize variant {variant}: parameter {key} must be a {known[key].__name__}, got {value!r}"
            )
    return params


def stage_copy(model: Path, scratch: Path) -> Path:
    """Copy a model file and its external data into scratch; returns the copy's path."""
    from worker.runtime import external_data_files

    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / model.name
    shutil.copyfile(model, target)
    for location in external_data_files(model):
        (scratch / location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model.parent / location, scratch / location)
    return target


def _typed_for_contrib_ops(model: Path, target: Path) -> Path:
    """Give contrib-op outputs a type, or the quantizer cannot handle a graph-optimized model.

    The quantizer types tensors with onnx's shape inference, which does not know the
    com.microsoft ops (Attention, SkipLayerNormalization, ...) the graph optimizer fuses in,
    and fails with "Unable to find data type for weight_name=...". ONNX Runtime's symbolic
    shape inference knows them.
    """
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    if all(node.domain in ("", "ai.onnx") for node in proto.graph.node):
        return model
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from worker.runtime import save_onnx

    try:
        inferred = SymbolicShapeInference.infer_shapes(onnx.load(str(model)), auto_merge=True)
    except Exception as exc:  # noqa: BLE001
        message = " ".join(str(exc).split())[:200]
        raise UserInputError(
            f"int8-dynamic cannot type the contrib ops of {model.name} (from a graph optimization?): {message}; "
            "quantize before optimizing the graph instead (variant 'int8-dynamic+graph')"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    return save_onnx(inferred, target)


class Int8Dynamic(Optimizer):
    name = "int8-dynamic"
    applies_to = ("onnx",)

    def optimize(self, request: OptimizeRequest) -> Path:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from worker.runtime import PROTO_LIMIT, check_loads, model_bytes

        params = check_params(self.name, dict(request.params), PARAMS)
        per_channel = params.get("per_channel", True)
        workdir = Path(request.workdir).absolute()
        output = workdir / "model.onnx"
        scratch = workdir / ".int8-scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            source = stage_copy(Path(request.model).absolute(), scratch / "input")
            source = _typed_for_contrib_ops(source, scratch / "typed" / "model.onnx")
            large = model_bytes(source) > PROTO_LIMIT
            logging.getLogger().addFilter(_drop_preprocess_hint)
            output.unlink(missing_ok=True)
            output.with_name(output.name + ".data").unlink(missing_ok=True)
            with working_directory(scratch) if large else contextlib.nullcontext():
                try:
                    quantize_dynamic(
                        model_input=str(source),
                        model_output=str(output),
                        per_channel=per_channel,
                        reduce_range=params.get("reduce_range", False),
                        weight_type=QuantType.QInt8,
                        use_external_data_format=large,
                    )
                except Exception as exc:  # noqa: BLE001
                    message = " ".join(str(exc).split())[:300]
                    raise UserInputError(
                        f"int8-dynamic could not quantize {Path(request.model).name}: {type(exc).__name__}: {message}"
                    ) from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        check_loads(output, self.name)
        return output
