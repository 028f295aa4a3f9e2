"""An ONNX model as the source: validate it, copy it, and compute reference outputs with ONNX Runtime.

The source is an ``.onnx`` file, or a folder holding exactly one ``.onnx`` file, with any
external data files beside it. External data locations must be plain relative paths inside
the model's folder: absolute paths, ``..`` components and symlinks are refused, since a
crafted location could make the worker read any file on the machine.

Every tensor in the model is checked, wherever it sits: initializers, the values and indices of
sparse initializers, node attributes, subgraphs and functions (``onnx``'s own tensor walk skips
sparse tensors, so the model's protobuf is walked here field by field).

The copy in the workdir is always ``model.onnx``, plus ``model.onnx.data`` when the weights
were external (they are gathered into that one file whatever they were called before).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

from shared.errors import UserInputError, one_line
from worker.plugins.base import Converter, ConvertRequest, ConvertResult
from worker.support.onnx_inputs import input_infos
from worker.support.samples import samples_for


class OnnxPassthrough(Converter):
    name = "onnx"
    targets = ("onnx",)
    source_is_folder = False

    def convert(self, request: ConvertRequest) -> ConvertResult:
        import onnx
        import onnxruntime

        from shared.inference.runtime import load_session, save_onnx

        source = _model_file(Path(request.source), request.model.source)
        label = f"model.source {request.model.source}"
        try:
            proto = onnx.load(str(source), load_external_data=False)
        except Exception as exc:
            raise UserInputError(f"{label}: not a readable ONNX file: {one_line(exc)}") from None
        external = _check_external_data(proto, source.parent, label)
        try:
            onnx.checker.check_model(str(source))  # path-based: handles external data and > 2 GiB
        except Exception as exc:
            raise UserInputError(f"{label}: the ONNX checker rejects the model: {one_line(exc)}") from None

        session = load_session(source, threads=request.settings.bench_threads)
        inputs = input_infos(session.inputs, request, label)
        samples, _origin = samples_for(request, inputs)
        reference = session.run(samples)
        outputs = list(session.outputs)
        del session

        target = Path(request.workdir) / "model.onnx"
        if external:
            # Gathered into model.onnx.data, or inlined when small enough for one file.
            save_onnx(_with_external_data(source), target)
        else:
            shutil.copyfile(source, target)
        return ConvertResult(
            model_file="model.onnx",
            samples=samples,
            reference=reference,
            inputs=inputs,
            outputs=outputs,
            extra={
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "opset": _opset(proto),
                "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
            },
        )


def _model_file(source: Path, label: str) -> Path:
    if source.is_dir():
        found = sorted(p for p in source.iterdir() if p.suffix.lower() == ".onnx" and p.is_file())
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise UserInputError(
                f"model.source {label}: a folder source must hold exactly one .onnx file (found: {names})"
            )
        return found[0]
    if not source.is_file():
        raise UserInputError(f"model.source {label}: not found")
    return source


def _check_external_data(proto, folder: Path, label: str) -> bool:
    """Refuse unsafe external data locations; True when the model has external data."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    base = folder.resolve()
    seen: dict[str, int] = {}
    for tensor in all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = ExternalDataInfo(tensor)
        location = info.location or ""
        where = f"{label}: tensor {tensor.name!r} has external data location {location!r}"
        if not location or "\0" in location:
            raise UserInputError(f"{where}: it must name a file")
        parts = set(PurePosixPath(location).parts) | set(PureWindowsPath(location).parts)
        if (
            PurePosixPath(location).is_absolute()
            or PureWindowsPath(location).is_absolute()
            or location.startswith(("/", "\\"))
            or re.match(r"^[A-Za-z]:", location)
        ):
            raise UserInputError(f"{where}: absolute paths are refused; use a file name beside the model")
        if ".." in parts:
            raise UserInputError(f"{where}: '..' is refused; external data must lie beside the model")
        path = folder / location
        walk = folder
        for part in PurePosixPath(location.replace("\\", "/")).parts:
            walk = walk / part
            if walk.is_symlink():
                raise UserInputError(f"{where}: symlinks are refused")
        if not path.is_file():
            raise UserInputError(f"{where}: the file is missing from the upload")
        if not path.resolve().is_relative_to(base):
            raise UserInputError(f"{where}: it resolves outside the model's folder")
        size = seen.setdefault(location, path.stat().st_size)
        offset = int(info.offset or 0)
        length = info.length
        if offset < 0 or (length is not None and (int(length) < 0 or offset + int(length) > size)):
            raise UserInputError(
                f"{where}: offset {offset} + length {length} lies beyond the file's {size} bytes"
            )
    return bool(seen)


def all_tensors(message) -> Iterator:
    """Every TensorProto in an ONNX message, at any depth (sparse tensors' values and indices too)."""
    import onnx
    from google.protobuf.message import Message

    if isinstance(message, onnx.TensorProto):
        yield message
        return
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        for item in (value,) if isinstance(value, Message) else value:
            yield from all_tensors(item)


def _with_external_data(source: Path):
    """The model with every external tensor read in (checked beforehand by ``_check_external_data``)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    proto = onnx.load(str(source), load_external_data=False)
    for tensor in all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            load_external_data_for_tensor(tensor, str(source.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return proto


def _opset(proto) -> int | None:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None

