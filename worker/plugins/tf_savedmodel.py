"""A TensorFlow SavedModel (a folder, or a ``.tar`` / ``.tar.gz`` of one) -> ONNX or TFLite.

The model is its ``serving_default`` signature (or its only signature): inputs and outputs
are the signature's, by name, the batch dimension symbolic. Reference outputs come from
TensorFlow running that signature.

Safety: a SavedModel is a program, not data. An archive is unpacked by ``worker.support.archives``
(no ``..``, no absolute paths, no links or devices, a streaming cap on the unpacked size).
Before TensorFlow loads anything, ``worker.support.savedmodel_check`` parses ``saved_model.pb``
and inspects every MetaGraph, every function in its library, its init ops, saver and assets:
operations that touch files, the network or Python are refused anywhere, checkpoint I/O anywhere
but the saver's own save and restore paths, and tag sets that do not pick exactly one MetaGraph.
TensorFlow then loads with exactly the tag set that was checked.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from shared.errors import UserInputError, one_line
from worker.plugins.base import Converter, ConvertRequest, ConvertResult, TensorInfo
from worker.support.archives import extract_tar, is_tar
from worker.support.onnx_inputs import input_infos
from worker.support.samples import samples_for
from worker.support.savedmodel_check import check_saved_model


class TfSavedModel(Converter):
    name = "tf-savedmodel"
    targets = ("onnx", "tflite")
    source_is_folder = True
    tools = ("tensorflow-cpu", "tf2onnx", "ai-edge-litert", "onnx", "onnxruntime")

    def convert(self, request: ConvertRequest) -> ConvertResult:
        label = f"model.source {request.model.source}"
        source = Path(request.source)
        with tempfile.TemporaryDirectory(prefix="modelyard-savedmodel-") as tmp:
            if source.is_file():
                if not is_tar(source):
                    raise UserInputError(
                        f"{label}: format tf-savedmodel needs a SavedModel folder or a .tar / .tar.gz of one"
                    )
                source = extract_tar(
                    source, Path(tmp) / "unpacked", max_bytes=request.settings.max_archive_bytes, label=label
                )
            return self._convert_folder(_model_folder(source, label), request, label)

    def _convert_folder(self, folder: Path, request: ConvertRequest, label: str) -> ConvertResult:
        from worker.support.tf_export import export, import_tensorflow, serving_function, symbolic_shape

        tf = import_tensorflow(request.settings.bench_threads)
        checked = check_saved_model(folder, label)
        key = checked.signature
        try:
            loaded = tf.saved_model.load(str(folder), tags=checked.tags)
        except Exception as exc:
            raise UserInputError(f"{label}: TensorFlow cannot load the SavedModel: {one_line(exc)}") from None
        signature = loaded.signatures[key]
        args, kwargs = signature.structured_input_signature
        if args:
            raise UserInputError(f"{label}: signature {key!r} takes positional inputs; named inputs are required")
        names = list(kwargs)
        declared = [TensorInfo(n, kwargs[n].dtype.name, symbolic_shape(kwargs[n].shape)) for n in names]
        inputs = input_infos(declared, request, label)
        samples, _origin = samples_for(request, inputs)

        function = serving_function(lambda *tensors: dict(signature(**dict(zip(names, tensors)))), inputs)
        extra = {"tensorflow": tf.__version__, "signature": key, "source_format": self.name}
        return export(loaded, function, inputs, samples, request, label, extra)


def _model_folder(folder: Path, label: str) -> Path:
    """The folder holding saved_model.pb: the source itself or its only subfolder."""
    for candidate in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
        if (candidate / "saved_model.pb").is_file():
            return candidate
    raise UserInputError(f"{label}: no saved_model.pb in the folder or in a folder directly below it")
