"""An ONNX model as the source: validate it, copy it, and compute reference outputs with ONNX Runtime.

The source is an ``.onnx`` file, or a folder holding exactly one ``.onnx`` file, with any
external data files beside it. External data locations must be plain relative paths inside
the model's folder: absolute paths, ``..`` components and symlinks are refused, since a
crafted location could make the worker read any file on the machine.

The copy in the workdir is always ``model.onnx``, plus ``model.onnx.data`` when the weights
were external (they are gathered into that one file whatever they were called before).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath


from shared.errors import UserInputError
from worker.plugins.base import Converter, ConvertRequest, ConvertResult, TensorInfo
from worker.samples import samples_for



class OnnxPassthrough(Converter):
    name = "onnx"
    targets = ("onnx",)
    source_is_folder = False

    def convert(self, request: ConvertRequest) -> ConvertResult:
        import onnx
        import onnxruntime

        from worker.runtime import load_session, save_onnx

        source = _model_file(Path(request.source), request.model.source)
        label = f"model.source {request.model.source}"
        try:
            proto = onnx.load(str(source), load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise UserInputError(f"{label}: not a readable ONNX file: {_one_line(exc)}") from None
        external = _check_external_data(proto, source.parent, label)
        try:
            onnx.checker.check_model(str(source))  # path-based: handles external data and > 2 GiB
        except Exception as exc:  # noqa: BLE001
            raise UserInputError(f"{label}: the ONNX checker rejects the model: {_one_line(exc)}") from None

        session = load_session(source, threads=request.settings.bench_threads)
        inputs = _input_infos(session.inputs, request, label)
        samples, _origin = samples_for(request, inputs)
        reference = session.run(samples)
        outputs = list(session.outputs)
        del session

        target = Path(request.workdir) / "model.onnx"
        if external:
            # Gathered into model.onnx.data, or inlined when small enough for one file.
            save_onnx(onnx.load(str(source), load_external_data=True), target)
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


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


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
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    base = folder.resolve()
    seen: dict[str, int] = {}
    for tensor in _get_all_tensors(proto):
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


def _input_infos(session_inputs: list[TensorInfo], request: ConvertRequest, label: str) -> list[TensorInfo]:
    spec = request.model.inputs
    if not spec:
        return list(session_inputs)
    by_name = {t.name: t for t in session_inputs}
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
        for dim, want in zip(tensor.shape, graph.shape):
            if isinstance(dim, int) and isinstance(want, int) and dim != want:
                raise UserInputError(f"model.inputs: {tensor.name} shape {tensor.shape} conflicts with the model's {graph.shape}")
        # The graph decides the dtype (the runtime casts to it); the spec names the dims.
        result.append(TensorInfo(tensor.name, graph.dtype, list(tensor.shape)))
    return result


def _opset(proto) -> int | None:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None

