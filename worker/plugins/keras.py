"""A Keras 3 ``.keras`` file -> ONNX or TFLite, with reference outputs from Keras itself.

Safety: a ``.keras`` file is a zip of a JSON config and HDF5 weights, loaded with
``safe_mode=True`` (a ``Lambda`` layer's Python bytecode is refused). Before Keras sees it,
the config is read as JSON and every ``module`` it names must be under ``keras``: a config that
points deserialization at another module (``os``, ``subprocess``, a custom package) is refused
without importing anything. The zip is read by ``worker.support.zip_check`` (duplicate names,
hidden or overlapping data, unsafe paths refused; unpacked size capped by
``MODELYARD_MAX_ARCHIVE_BYTES``), and Keras loads a fresh archive written from the checked
members, so the config it deserializes is the config that was checked. Legacy ``.h5`` / HDF5
model files are refused: Keras loads them through a separate path that ``safe_mode`` does not
cover.

Inputs come from ``model.inputs`` (their names and shapes; the first dimension is the batch
and stays symbolic); ``model.inputs`` in the job file may rename the symbolic dims. Outputs are
named after the layers that produce them. A model with several inputs is called with a list
in ``model.inputs`` order.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from shared.errors import UserInputError, one_line
from worker.plugins.base import Converter, ConvertRequest, ConvertResult, TensorInfo
from worker.support.onnx_inputs import input_infos
from worker.support.samples import samples_for
from worker.support.tf_export import symbolic_shape

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"
ALLOWED_MODULES = ("keras",)  # config "module" entries must be keras or keras.*


class KerasConverter(Converter):
    name = "keras"
    targets = ("onnx", "tflite")
    source_is_folder = False
    tools = ("tensorflow-cpu", "keras", "tf2onnx", "ai-edge-litert", "onnx", "onnxruntime")

    def convert(self, request: ConvertRequest) -> ConvertResult:
        from worker.support.tf_export import export, import_tensorflow, serving_function

        label = f"model.source {request.model.source}"
        with tempfile.TemporaryDirectory(prefix="modelyard-keras-") as scratch:
            path = _checked_file(Path(request.source), label, request.settings.max_archive_bytes, Path(scratch))
            tf = import_tensorflow(request.settings.bench_threads)
            import keras

            model = _load(path, label)
        declared = _model_inputs(model, label)
        inputs = input_infos(declared, request, label)
        samples, _origin = samples_for(request, inputs)
        output_names = _output_names(model)

        def call(*tensors):
            result = model(tensors[0] if len(tensors) == 1 else list(tensors), training=False)
            flat = tf.nest.flatten(result)
            if isinstance(result, dict):
                return dict(result)
            names = output_names if len(output_names) == len(flat) else [f"output_{i}" for i in range(len(flat))]
            return dict(zip(names, flat))

        function = serving_function(call, inputs)
        extra = {"tensorflow": tf.__version__, "keras": keras.__version__, "source_format": self.name}
        return export(model, function, inputs, samples, request, label, extra)


def _checked_file(source: Path, label: str, max_bytes: int, scratch: Path) -> Path:
    """A clean ``.keras`` copy in ``scratch`` of the source, after the format and config checks (no Keras)."""
    from worker.support.zip_check import open_checked_zip

    if source.is_dir():
        raise UserInputError(
            f"{label}: format keras needs a .keras file, got a folder (a SavedModel? use tf-savedmodel)")
    if not source.is_file():
        raise UserInputError(f"{label}: not found")
    with open(source, "rb") as handle:
        head = handle.read(8)
    if head.startswith(HDF5_MAGIC) or source.suffix.lower() in (".h5", ".hdf5"):
        raise UserInputError(
            f"{label}: legacy HDF5 (.h5) Keras models are refused: Keras loads them through a path that "
            "safe_mode does not protect, so a crafted file can run code. Re-save the model as a Keras 3 "
            "file (model.save('model.keras')) and resubmit"
        )
    if not head.startswith(ZIP_MAGIC):
        raise UserInputError(f"{label}: not a Keras 3 .keras file (a .keras file is a zip archive)")
    with open_checked_zip(source, label, max_bytes=max_bytes) as archive:
        try:
            config = json.loads(archive.read("config.json"))
        except KeyError:
            raise UserInputError(f"{label}: the .keras archive has no config.json") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserInputError(f"{label}: config.json is not valid JSON: {exc}") from None
        _check_modules(config, label)
        return archive.rewrite(scratch / "model.keras")  # Keras picks its loader by the suffix


def _check_modules(node: object, label: str, where: str = "config") -> None:
    if isinstance(node, dict):
        module = node.get("module")
        if isinstance(module, str) and not any(module == m or module.startswith(m + ".") for m in ALLOWED_MODULES):
            raise UserInputError(
                f"{label}: {where} names module {module!r} (class {node.get('class_name')!r}); only Keras's own "
                "classes may be deserialized, custom or foreign modules are refused"
            )
        for key, value in node.items():
            _check_modules(value, label, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_modules(value, label, f"{where}[{i}]")


def _load(path: Path, label: str):
    import keras

    try:
        return keras.saving.load_model(str(path), safe_mode=True, compile=False)
    except ValueError as exc:
        text = one_line(exc)
        if "safe_mode" in text or "lambda" in text.lower():
            raise UserInputError(
                f"{label}: refused by Keras safe_mode (the file holds Python code, e.g. a Lambda layer, that would "
                f"run on load): {text}"
            ) from None
        raise UserInputError(f"{label}: Keras cannot load the model: {text}") from None
    except (TypeError, KeyError, OSError, ImportError, AttributeError) as exc:
        raise UserInputError(f"{label}: Keras cannot load the model: {type(exc).__name__}: {one_line(exc)}") from None


def _model_inputs(model, label: str) -> list[TensorInfo]:
    try:
        tensors = list(model.inputs)
    except (AttributeError, ValueError):
        tensors = []
    if not tensors:
        raise UserInputError(
            f"{label}: the model has no defined inputs (a subclassed model that was never built); build it on "
            "an Input before saving"
        )
    infos = []
    for i, tensor in enumerate(tensors):
        name = str(getattr(tensor, "name", "") or f"input_{i}").split(":")[0]
        infos.append(TensorInfo(name, str(tensor.dtype), symbolic_shape(tensor.shape)))
    return infos


def _output_names(model) -> list[str]:
    names = []
    for i, tensor in enumerate(getattr(model, "outputs", None) or []):
        history = getattr(tensor, "_keras_history", None)
        operation = getattr(history, "operation", None)
        names.append(getattr(operation, "name", None) or f"output_{i}")
    return names if len(set(names)) == len(names) else [f"output_{i}" for i in range(len(names))]
