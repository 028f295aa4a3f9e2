"""Sample inputs for a conversion: the user's .npz checked against the model's inputs, or
generated from the input shapes (seeded), with symbolic dims set from ``convert.samples``."""

from __future__ import annotations

import numpy as np

from shared.arrays import Arrays, TensorInfo
from shared.errors import UserInputError
from worker.support.plugin_io import ConvertRequest

DTYPES = {"float32", "float16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool"}


def dim_size(dim: int | str, index: int, spec) -> int:
    """A fixed dim as is; a symbolic (or unknown) one from convert.samples: batch, else sequence."""
    if isinstance(dim, int) and dim > 0:
        return dim
    name = str(dim).lower()
    if "batch" in name or (index == 0 and not any(w in name for w in ("seq", "len", "token"))):
        return spec.batch
    return spec.sequence


def generate(inputs: list[TensorInfo], spec) -> Arrays:
    rng = np.random.default_rng(spec.seed)
    arrays: Arrays = {}
    for tensor in inputs:
        shape = tuple(dim_size(dim, i, spec) for i, dim in enumerate(tensor.shape))
        dtype = tensor.dtype if tensor.dtype in DTYPES else "float32"
        name = tensor.name.lower()
        if dtype == "bool":
            value = rng.integers(0, 2, size=shape).astype(bool)
        elif np.issubdtype(np.dtype(dtype), np.floating):
            value = rng.standard_normal(size=shape).astype(dtype)
        elif "mask" in name:
            value = np.ones(shape, dtype=dtype)
        elif "type" in name or "segment" in name or "position" in name:
            value = np.zeros(shape, dtype=dtype)
        else:
            value = rng.integers(0, 100, size=shape).astype(dtype)  # ids valid for any vocabulary >= 100
        arrays[tensor.name] = value
    return arrays


def check_user_samples(samples: Arrays, inputs: list[TensorInfo], origin: str) -> Arrays:
    names = [t.name for t in inputs]
    missing = [n for n in names if n not in samples]
    unknown = [n for n in samples if n not in names]
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(unknown)}"] if unknown else [])
        raise UserInputError(f"model.samples {origin}: {'; '.join(parts)} (the model takes: {', '.join(names)})")
    arrays: Arrays = {}
    for tensor in inputs:
        value = np.asarray(samples[tensor.name])
        if value.ndim != len(tensor.shape) or any(
            isinstance(want, int) and want > 0 and got != want for got, want in zip(value.shape, tensor.shape)
        ):
            raise UserInputError(
                f"model.samples {origin}: {tensor.name} has shape {list(value.shape)}, the model takes {tensor.shape}"
            )
        dtype = tensor.dtype if tensor.dtype in DTYPES else value.dtype
        arrays[tensor.name] = np.ascontiguousarray(value.astype(dtype))
    return arrays


def samples_for(request: ConvertRequest, inputs: list[TensorInfo]) -> tuple[Arrays, str]:
    """The user's samples checked against the inputs ('user'), or generated ones ('generated')."""
    if request.samples is not None:
        return check_user_samples(request.samples, inputs, request.model.samples or "samples"), "user"
    return generate(inputs, request.convert.samples), "generated"
