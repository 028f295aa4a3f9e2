"""ONNX model files on disk: private copies, the cwd some ONNX tools need, and metadata entries.

A model file may have external data beside it (weights over protobuf's 2 GiB cap), so a copy
carries those files too. ``working_directory`` exists because ``onnx`` checks an external data
file's name against the process cwd above 2 GiB; the cwd is process-wide, so changing it is
serialized by one lock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

CWD_LOCK = threading.RLock()


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """chdir for the block, under a process-wide lock; restores the previous cwd."""
    with CWD_LOCK:
        previous = os.getcwd()
        os.chdir(path)
        try:
            yield
        finally:
            os.chdir(previous)


def stage_copy(model: Path, scratch: Path) -> Path:
    """Copy a model file and its external data into scratch; returns the copy's path.

    Tools that write scratch files beside their input (ONNX Runtime's quantizer writes
    ``<name>-inferred.onnx``) then never touch a shared or read-only input folder.
    """
    from shared.inference.runtime import external_data_files

    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / model.name
    shutil.copyfile(model, target)
    for location in external_data_files(model):
        (scratch / location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model.parent / location, scratch / location)
    return target


def set_metadata(path: Path, values: Mapping[str, object]) -> None:
    """Add or replace ``metadata_props`` entries (values as strings); external weights stay where they are."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    existing = {entry.key: entry for entry in proto.metadata_props}
    for key, value in values.items():
        if key in existing:
            existing[key].value = str(value)
        else:
            proto.metadata_props.add(key=key, value=str(value))
    onnx.save_model(proto, str(path))


def drop_shape_annotations(path: Path) -> None:
    """Remove the graph's ``value_info`` (intermediate tensors' types and shapes), as an exporter leaves it.

    The quantizers run onnx's shape inference and keep what it found. With those shapes known, ONNX
    Runtime's ``SkipLayerNormFusion`` turns every residual ``Add`` + ``LayerNormalization`` into
    ``SkipLayerNormalization``, whose CPU kernel (ONNX Runtime 1.32) is about 5x slower than the two ops
    it replaces: 0.96 vs 0.13 + 0.07 ms at 8 x 128 x 384 on 2 threads; 1.85 vs 0.23 ms for the
    LayerNormalization alone on one (AMX Xeon).
    MiniLM's INT8 ran 0.476x its fp32 with them, 0.418x without (paired). ONNX Runtime infers the
    shapes it needs itself; the fp32 export never had them, so both sides are now served alike.
    """
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    if len(proto.graph.value_info):
        del proto.graph.value_info[:]
        onnx.save_model(proto, str(path))


def metadata(path: Path) -> dict[str, str]:
    """The model's ``metadata_props`` as a dict (weights not loaded)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
