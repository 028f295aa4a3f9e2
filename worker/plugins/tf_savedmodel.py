"""A TensorFlow SavedModel (a folder, or a ``.tar`` / ``.tar.gz`` of one) -> ONNX or TFLite.

The model is its ``serving_default`` signature (or its only signature): inputs and outputs
are the signature's, by name, the batch dimension symbolic. Reference outputs come from
TensorFlow running that signature.

Safety: a SavedModel is a program, not data. An archive is unpacked by ``worker.archives``
(no ``..``, no absolute paths, no links or devices, a streaming cap on the unpacked size).
Before TensorFlow loads anything, ``saved_model.pb`` is parsed as a protobuf and refused when
any function in it uses an operation that touches files or calls back into Python
(``ReadFile``, ``WriteFile``, ``PyFunc``, file readers and datasets, summary writers, ...), or
when the serving signature itself saves or restores checkpoints; those run on load or on the
first call and could read or write anything the worker can. This is a deny-list: run workers
with least privilege all the same.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from shared.errors import UserInputError
from worker.archives import extract_tar, is_tar
from worker.plugins.base import Converter, ConvertRequest, ConvertResult, TensorInfo
from worker.tf_export import one_line

# Operations no inference graph needs and that read or write files or run Python.
DENIED_OPS = {
    "ReadFile", "WriteFile", "MatchingFiles", "ImmutableConst", "PrintV2",
    "PyFunc", "PyFuncStateless", "EagerPyFunc",
    "Save", "SaveSlices", "Restore", "RestoreSlice", "LoadAndRemapMatrix", "GenerateVocabRemapping",
    "InitializeTableFromTextFile", "InitializeTableFromTextFileV2",
    "DecodeProtoV2", "EncodeProto",
}
DENIED_PATTERNS = re.compile(r"(Reader|Dataset|Summary|Debug|FileWriter)")
# Checkpoint ops every SavedModel has for its own variables: allowed, but not in the serving signature.
CHECKPOINT_OPS = {"SaveV2", "RestoreV2", "MergeV2Checkpoints"}


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
        from worker.plugins.onnx_passthrough import _input_infos
        from worker.samples import samples_for
        from worker.tf_export import (
            export,
            import_tensorflow,
            serving_function,
            symbolic_shape,
        )

        tf = import_tensorflow(request.settings.bench_threads)
        key = _check_graph(folder, label)
        try:
            loaded = tf.saved_model.load(str(folder), tags=["serve"])
        except Exception as exc:  # noqa: BLE001 - TF raises many types for a damaged SavedModel
            raise UserInputError(f"{label}: TensorFlow cannot load the SavedModel: {one_line(exc)}") from None
        signature = loaded.signatures[key]
        args, kwargs = signature.structured_input_signature
        if args:
            raise UserInputError(f"{label}: signature {key!r} takes positional inputs; named inputs are required")
        names = list(kwargs)
        declared = [TensorInfo(n, kwargs[n].dtype.name, symbolic_shape(kwargs[n].shape)) for n in names]
        inputs = _input_infos(declared, request, label)
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


def _check_graph(folder: Path, label: str) -> str:
    """Refuse dangerous operations; return the signature key to serve."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString((folder / "saved_model.pb").read_bytes())
    except DecodeError as exc:
        raise UserInputError(f"{label}: saved_model.pb is not a SavedModel protobuf: {exc}") from None
    graphs = [g for g in saved.meta_graphs if "serve" in g.meta_info_def.tags]
    if not graphs:
        raise UserInputError(f"{label}: the SavedModel has no graph tagged 'serve'")
    graph = graphs[0]
    functions = {f.signature.name: f for f in graph.graph_def.library.function}
    for where, node in _all_nodes(graph.graph_def, functions.values()):
        if node.op in DENIED_OPS or DENIED_PATTERNS.search(node.op):
            raise UserInputError(
                f"{label}: {where} uses operation {node.op!r}, which reads or writes files or runs Python; "
                "SavedModels with such operations are refused"
            )
    signatures = [k for k in graph.signature_def if not k.startswith("__")]
    if not signatures:
        raise UserInputError(f"{label}: the SavedModel has no signature to serve")
    key = "serving_default" if "serving_default" in signatures else signatures[0] if len(signatures) == 1 else None
    if key is None:
        raise UserInputError(
            f"{label}: no 'serving_default' signature and several others ({', '.join(sorted(signatures))})"
        )
    for op in _reachable_ops(graph, key, functions):
        if op in CHECKPOINT_OPS:
            raise UserInputError(f"{label}: signature {key!r} uses operation {op!r} (checkpoint I/O); refused")
    return key


def _all_nodes(graph_def, functions):
    for node in graph_def.node:
        yield "the graph", node
    for function in functions:
        for node in function.node_def:
            yield f"function {function.signature.name!r}", node


def _called(node) -> list[str]:
    names = []
    for value in node.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        names.extend(f.name for f in value.list.func)
    return names


def _reachable_ops(graph, key: str, functions: dict) -> set[str]:
    """Op types in the nodes the signature's outputs depend on, through called functions."""
    nodes = {n.name: n for n in graph.graph_def.node}
    pending = [t.name.split(":")[0] for t in graph.signature_def[key].outputs.values()]
    seen_nodes: set[str] = set()
    seen_functions: set[str] = set()
    ops: set[str] = set()
    calls: list[str] = []
    while pending:
        name = pending.pop().lstrip("^")
        if name in seen_nodes or name not in nodes:
            continue
        seen_nodes.add(name)
        node = nodes[name]
        ops.add(node.op)
        calls.extend(_called(node))
        pending.extend(i.split(":")[0] for i in node.input)
    while calls:
        name = calls.pop()
        if name in seen_functions or name not in functions:
            continue
        seen_functions.add(name)
        for node in functions[name].node_def:
            ops.add(node.op)
            calls.extend(_called(node))
    return ops
