"""The inference runtime every stage uses to run a converted or optimized model.

``load_session(path)`` opens an ``.onnx`` file with ONNX Runtime, or a ``.tflite`` file with
LiteRT (``ai_edge_litert``) when that package is installed, and returns a session with the
same small interface either way: ``.inputs`` / ``.outputs`` (``TensorInfo``), ``.provider``
and ``.run(feeds) -> {output name: array}``.

The runtimes are imported inside the functions: a prefork worker whose parent process
imported them before forking can hang in the child.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from shared.arrays import Arrays, TensorInfo
from shared.errors import UserInputError, one_line

# ONNX Runtime's type strings -> numpy dtype names.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(uint32)": "uint32",
    "tensor(int64)": "int64",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "str",
}



class Session:
    """A loaded model. Subclasses fill in ``inputs``, ``outputs``, ``provider`` and ``_run``."""

    path: Path
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    provider: str
    _fixed_dims_are_binding = True  # LiteRT can resize fixed dims; ONNX Runtime cannot

    def _prepare(self, feeds: Arrays) -> Arrays:
        """Check the feed names against the model's inputs and cast to the input dtypes."""
        expected = [t.name for t in self.inputs]
        missing = [name for name in expected if name not in feeds]
        extra = [name for name in feeds if name not in expected]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing input(s) {', '.join(missing)}")
            if extra:
                parts.append(f"unexpected input(s) {', '.join(extra)}")
            raise UserInputError(
                f"{self.path.name}: {'; '.join(parts)} (the model takes: {', '.join(expected) or 'nothing'})"
            )
        prepared = {}
        for info in self.inputs:
            value = np.asarray(feeds[info.name])
            if info.dtype not in ("str", "bfloat16") and value.dtype != np.dtype(info.dtype):
                value = value.astype(info.dtype)
            if len(value.shape) != len(info.shape):
                raise UserInputError(
                    f"{self.path.name}: input {info.name} has {value.ndim} dimension(s) {list(value.shape)}, "
                    f"the model expects {len(info.shape)} {info.shape}"
                )
            for got, want in zip(value.shape, info.shape):
                if self._fixed_dims_are_binding and isinstance(want, int) and want > 0 and got != want:
                    raise UserInputError(
                        f"{self.path.name}: input {info.name} has shape {list(value.shape)}, "
                        f"the model expects {info.shape}"
                    )
            prepared[info.name] = np.ascontiguousarray(value)
        return prepared

    def run(self, feeds: Arrays) -> Arrays:
        return self._run(self._prepare(feeds))

    def _run(self, feeds: Arrays) -> Arrays:
        raise NotImplementedError


class OnnxSession(Session):
    def __init__(self, path: Path, *, threads: int, providers: list | None) -> None:
        import onnxruntime as ort

        self.path = path
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only: warnings go to stderr otherwise
        available = ort.get_available_providers()
        wanted = providers or ["CPUExecutionProvider"]
        names = [p[0] if isinstance(p, tuple) else p for p in wanted]  # a provider may come with its options
        usable = [p for p, name in zip(wanted, names) if name in available]
        if not usable:
            raise UserInputError(
                f"none of the execution providers {', '.join(names)} is available here "
                f"(available: {', '.join(available)})"
            )
        try:
            self._session = ort.InferenceSession(str(path), sess_options=options, providers=usable)
        except Exception as exc:
            raise UserInputError(f"cannot load model file {path.name}: {one_line(exc)}") from None
        used = self._session.get_providers()
        self.provider = used[0] if used else "CPUExecutionProvider"
        self.inputs = [_ort_info(arg) for arg in self._session.get_inputs()]
        self.outputs = [_ort_info(arg) for arg in self._session.get_outputs()]
        self._names = [t.name for t in self.outputs]

    def _run(self, feeds: Arrays) -> Arrays:
        try:
            values = self._session.run(self._names, feeds)
        except Exception as exc:
            raise UserInputError(f"{self.path.name} failed to run on the given inputs: {one_line(exc)}") from None
        return dict(zip(self._names, values))


def _ort_info(arg) -> TensorInfo:
    shape: list[int | str] = []
    for i, dim in enumerate(arg.shape or []):
        if isinstance(dim, int) and dim >= 0:
            shape.append(dim)
        elif isinstance(dim, str) and dim:
            shape.append(dim)
        else:
            shape.append(f"dim{i}")
    return TensorInfo(name=arg.name, dtype=_ORT_TYPES.get(arg.type, arg.type), shape=shape)


class TfliteSession(Session):
    """LiteRT interpreter. Not thread safe: ``run`` holds a lock."""

    _fixed_dims_are_binding = False

    def __init__(self, path: Path, *, threads: int) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise UserInputError(
                f"cannot run {path.name}: .tflite models need the 'ai-edge-litert' package, "
                "which is not installed on this worker"
            ) from None
        self.path = path
        self.provider = "LiteRT-CPU"
        self._lock = threading.Lock()
        try:
            self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
            self._interpreter.allocate_tensors()
        except Exception as exc:
            raise UserInputError(f"cannot load model file {path.name}: {one_line(exc)}") from None
        names = _signature_names(self._interpreter)
        self._in = [{**d, "name": names.get(d["index"], d["name"])} for d in self._interpreter.get_input_details()]
        self._out = [{**d, "name": names.get(d["index"], d["name"])} for d in self._interpreter.get_output_details()]
        self.inputs = [_tflite_info(d) for d in self._in]
        self.outputs = [_tflite_info(d) for d in self._out]
        self._shapes: dict[str, tuple[int, ...]] = {d["name"]: tuple(d["shape"]) for d in self._in}

    def _run(self, feeds: Arrays) -> Arrays:
        with self._lock:
            interp = self._interpreter
            try:
                resized = False
                for detail in self._in:
                    shape = tuple(feeds[detail["name"]].shape)
                    if self._shapes[detail["name"]] != shape:
                        interp.resize_tensor_input(detail["index"], list(shape), strict=False)
                        self._shapes[detail["name"]] = shape
                        resized = True
                if resized:
                    interp.allocate_tensors()
                for detail in self._in:
                    interp.set_tensor(detail["index"], feeds[detail["name"]])
                interp.invoke()
                return {d["name"]: np.array(interp.get_tensor(d["index"])) for d in self._out}
            except UserInputError:
                raise
            except Exception as exc:
                raise UserInputError(
                    f"{self.path.name} failed to run on the given inputs: {one_line(exc)}"
                ) from None


def _signature_names(interpreter) -> dict[int, str]:
    """Tensor index -> its name in the model's signature, when it has one (``serving_default`` or its only one).

    A converter names the tensors themselves ``serving_default_x:0`` / ``StatefulPartitionedCall:0``;
    the signature keeps the source model's input and output names, which the reference outputs use.
    """
    signatures = interpreter.get_signature_list()
    key = "serving_default" if "serving_default" in signatures else next(iter(signatures), None)
    if key is None or (len(signatures) > 1 and key != "serving_default"):
        return {}
    runner = interpreter.get_signature_runner(key)
    names = {}
    for details in (runner.get_input_details(), runner.get_output_details()):
        for name, detail in details.items():
            names[int(detail["index"])] = name
    return names


def _tflite_info(detail: dict) -> TensorInfo:
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    names = ["batch", "sequence"]
    shape: list[int | str] = []
    for i, dim in enumerate(dims):
        dim = int(dim)
        shape.append(dim if dim >= 0 else (names[i] if i < len(names) else f"dim{i}"))
    return TensorInfo(name=detail["name"], dtype=np.dtype(detail["dtype"]).name, shape=shape)


def load_session(model_path: Path, *, threads: int = 2, providers: list | None = None) -> Session:
    """Open a model file for inference. A file that will not load raises UserInputError.

    ``providers``: ONNX Runtime provider names, or ``(name, options)`` pairs, best first.
    """
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserInputError(f"model file {model_path.name} does not exist or is not a file")
    suffix = model_path.suffix.lower()
    if suffix == ".onnx":
        return OnnxSession(model_path, threads=threads, providers=providers)
    if suffix == ".tflite":
        return TfliteSession(model_path, threads=threads)
    raise UserInputError(f"cannot run {model_path.name}: unknown model file type {suffix or '(none)'} "
                         "(supported: .onnx, .tflite)")


# ---------------------------------------------------------------------------------------------
# ONNX file helpers shared by the ONNX plugins.

PROTO_LIMIT = 1800 * 2**20  # protobuf caps a serialized model at 2 GiB; leave room for the graph


def external_data_files(model_path: Path) -> list[Path]:
    """The external data files an .onnx file refers to (relative locations, as written)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    proto = onnx.load(str(model_path), load_external_data=False)
    locations: list[str] = []
    for tensor in _get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = ExternalDataInfo(tensor).location
            if location not in locations:
                locations.append(location)
    return [Path(location) for location in locations]


def model_bytes(model_path: Path) -> int:
    """Bytes on disk of a model file plus the external data files it refers to."""
    model_path = Path(model_path)
    total = model_path.stat().st_size
    if model_path.suffix.lower() == ".onnx":
        for location in external_data_files(model_path):
            total += (model_path.parent / location).stat().st_size
    return total


def save_onnx(proto, path: Path) -> Path:
    """Save a ModelProto; above protobuf's size cap the weights go to ``<name>.data`` beside it.

    Written by hand rather than with ``onnx.save_model(save_as_external_data=True, location=...)``:
    that refuses a location that exists *relative to the process cwd*, and appends to an
    existing data file instead of replacing it.
    """
    import onnx
    from onnx.external_data_helper import _get_all_tensors, set_external_data

    path = Path(path).absolute()
    data = path.with_name(path.name + ".data")
    path.unlink(missing_ok=True)
    data.unlink(missing_ok=True)
    tensors = list(_get_all_tensors(proto))
    if sum(len(t.raw_data) for t in tensors if t.HasField("raw_data")) > PROTO_LIMIT:
        for tensor in tensors:
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
                set_external_data(tensor, data.name)
    onnx.save_model(proto, str(path))
    return path


def check_loads(model_path: Path, variant: str) -> Path:
    """Raise UserInputError when an optimizer's output does not load in ONNX Runtime."""
    try:
        load_session(model_path, threads=1)
    except UserInputError as exc:
        raise UserInputError(f"optimize variant {variant} produced a model that cannot be run: {exc}") from None
    return Path(model_path)
