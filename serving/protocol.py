"""The Open Inference Protocol (KServe v2 / Triton REST) on the wire: requests and responses.

Plain functions over bytes and dicts, with no web framework and no model runtime, so the
server's request handling can be read and tested on its own. A request body is JSON, or with
Triton's binary tensor extension a JSON header of ``Inference-Header-Content-Length`` bytes
followed by the raw tensors that its ``binary_data_size`` parameters measure out; it may be
gzip or deflate compressed. One tensor's data is decoded and encoded by :mod:`serving.tensors`.
Everything a client can get wrong raises :class:`RequestError` with a message that names the
input and what was wrong with it.
"""

from __future__ import annotations

import json
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.errors import RequestError
from serving.tensors import (
    binary_data,
    datatype_name,
    datatype_of,
    decode_tensor,
    float_text,
    json_data,
    protocol_shape,
)
from shared.arrays import TensorInfo

__all__ = ["HEADER_LENGTH", "InferenceRequest", "RequestError", "check_batch", "decompress", "encode_response",
           "parse_request", "split_body", "tensor_metadata"]

HEADER_LENGTH = "inference-header-content-length"


@dataclass
class InferenceRequest:
    """A parsed inference request: the model's feeds and how each output is to be returned."""

    feeds: dict[str, np.ndarray]
    outputs: list[str]  # the outputs to return, in order: those asked for by name, else all
    binary_outputs: dict[str, bool] = field(default_factory=dict)  # "*": the request-wide default
    echo: dict[str, Any] = field(default_factory=dict)  # {"id": ...} when the request has an id

    def wants_binary(self, output: str) -> bool:
        return self.binary_outputs.get(output, self.binary_outputs.get("*", False))


def tensor_metadata(tensors: Sequence[TensorInfo]) -> list[dict]:
    return [{"name": t.name, "datatype": datatype_name(t.dtype), "shape": protocol_shape(t.shape)}
            for t in tensors]


# -- requests --------------------------------------------------------------------------------


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The body undone from its Content-Encoding, refused past ``limit`` bytes (a gzip bomb)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise RequestError(f"Content-Encoding {encoding!r} is not supported (use gzip, deflate or none)")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestError(f"the {encoding} request body does not decompress: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise RequestError(f"the decompressed request body is over the {limit}-byte limit")
    return data


def split_body(body: bytes, headers: Mapping[str, str]) -> tuple[dict, bytes]:
    """The JSON request header and the binary tensor section after it."""
    length = headers.get(HEADER_LENGTH)
    if length is not None:
        if not length.strip().isdigit() or int(length) > len(body):
            raise RequestError(f"Inference-Header-Content-Length {length!r} is not a length within the "
                               f"{len(body)}-byte body")
        head, binary = body[: int(length)], body[int(length):]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise RequestError("the request body must be a JSON object with an 'inputs' list")
    return request, binary


def check_batch(name: str, shape: Any, max_batch_size: int) -> None:
    """Refuse an input whose first dimension (the batch) is over ``max_batch_size`` (0: no cap)."""
    if max_batch_size <= 0 or not isinstance(shape, list) or not shape:
        return
    rows = shape[0]
    if isinstance(rows, int) and not isinstance(rows, bool) and rows > max_batch_size:
        raise RequestError(f"input {name!r} has a batch of {rows} rows, over this model's max_batch_size "
                           f"{max_batch_size}: send at most {max_batch_size} rows per request")


def parse_request(request: dict, binary: bytes, inputs: Sequence[TensorInfo],
                  outputs: Sequence[TensorInfo], *, max_batch_size: int = 0) -> InferenceRequest:
    """Check a request against the model's inputs and outputs and decode its tensors.

    A batch over ``max_batch_size`` is refused from the declared shapes, before any data is decoded.
    """
    tensors = request.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise RequestError("the request needs an 'inputs' list with one entry per model input")
    for tensor in tensors:
        if isinstance(tensor, dict):
            check_batch(str(tensor.get("name")), tensor.get("shape"), max_batch_size)
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError("'parameters' must be a JSON object")
    feeds = _feeds(tensors, binary, inputs)
    binary_all = parameters.get("binary_data_output", False)
    if not isinstance(binary_all, bool):
        raise RequestError("parameter binary_data_output must be true or false")
    known = [t.name for t in outputs]
    wanted, binary_outputs = _requested_outputs(request.get("outputs"), known, binary_all)
    echo = {"id": request["id"]} if "id" in request else {}
    return InferenceRequest(feeds=feeds, outputs=wanted or known, binary_outputs=binary_outputs, echo=echo)


def _feeds(tensors: list, binary: bytes, inputs: Sequence[TensorInfo]) -> dict[str, np.ndarray]:
    by_name = {t.name: t for t in inputs}
    feeds: dict[str, np.ndarray] = {}
    offset = 0
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, dict):
            raise RequestError(f"inputs[{index}] must be a JSON object")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"inputs[{index}] has no 'name'")
        info = by_name.get(name)
        if info is None:
            raise RequestError(f"unexpected input {name!r}: the model takes {', '.join(by_name) or 'nothing'}")
        if name in feeds:
            raise RequestError(f"input {name!r} is given twice")
        feeds[name], used = decode_tensor(tensor, info, binary, offset)
        offset += used
    missing = [n for n in by_name if n not in feeds]
    if missing:
        raise RequestError(f"missing input(s) {', '.join(missing)}: the model takes {', '.join(by_name)}")
    if offset != len(binary):
        raise RequestError(f"the body has {len(binary)} bytes of binary tensor data, the inputs use {offset}")
    return feeds


def _requested_outputs(entries: Any, known: list[str], binary_all: bool) -> tuple[list[str], dict[str, bool]]:
    binary_outputs: dict[str, bool] = {"*": binary_all}
    wanted: list[str] = []
    if entries is None:
        return wanted, binary_outputs
    if not isinstance(entries, list):
        raise RequestError("'outputs' must be a list of {\"name\": ...} objects")
    for index, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise RequestError(f"outputs[{index}] must be an object with a 'name'")
        if name not in known:
            raise RequestError(f"unknown output {name!r}: the model gives {', '.join(known)}")
        if name in wanted:
            raise RequestError(f"output {name!r} is requested twice")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestError(f"outputs[{index}].parameters must be a JSON object")
        if params.get("classification"):
            raise RequestError("the classification extension is not supported")
        flag = params.get("binary_data", binary_all)
        if not isinstance(flag, bool):
            raise RequestError(f"outputs[{index}].parameters.binary_data must be true or false")
        binary_outputs[name] = flag
        wanted.append(name)
    return wanted, binary_outputs


# -- responses -------------------------------------------------------------------------------


def encode_response(model: str, version: int, request: InferenceRequest,
                    results: Mapping[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (``content-type`` among them) for ``request``'s outputs.

    Binary outputs follow the JSON header, whose length ``Inference-Header-Content-Length``
    gives. Float JSON data is spliced in as preformatted text (see :func:`float_text`).
    """
    outputs = []
    buffers = []
    texts: dict[str, str] = {}  # placeholder -> preformatted JSON array text
    for name in request.outputs:
        array = np.asarray(results[name])
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if request.wants_binary(name):
            raw = binary_data(array)
            entry["parameters"] = {"binary_data_size": len(raw)}
            buffers.append(raw)
        else:
            text = float_text(array)
            if text is None:
                entry["data"] = json_data(array)
            else:
                token = f"\0{uuid.uuid4().hex}\0"
                texts[json.dumps(token)] = text
                entry["data"] = token
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model, "model_version": str(version), "outputs": outputs,
                                **request.echo}
    document = json.dumps(response, separators=(",", ":"))
    for token, data in texts.items():
        document = document.replace(token, data, 1)
    head = document.encode()
    if not buffers:
        return head, {"content-type": "application/json"}
    return head + b"".join(buffers), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}


