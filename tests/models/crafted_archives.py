"""Zip archives that show a checker and a loader different bytes: one member name, two copies.

``zipfile`` returns the *last* copy of a duplicated name. PyTorch's reader (miniz) finds a name by
binary search over the sorted central directory, so which copy it returns depends on how many
members the archive has: ``padding`` extra members (harmless ``extra/`` files) put the search on
the first copy. The paddings below are what torch 2.13 needs for these archives; the control tests
in tests/reliability/test_malicious_models.py fail if that ever changes.

Crafted: a ``.pt2`` whose first copy of its sample inputs is a pickle payload, and a TorchScript
archive whose first copy of its model code reads a worker file with ``torch.from_file`` and
returns the bytes as a second output.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch

from tests.models.torch_files import OpenMarker

PT2_PADDING = 1  # a ResNet-18 .pt2 (tests.models.torch_files.save_program)
TORCHSCRIPT_PADDING = 0  # tests.models.torch_files.SmallCNN, scripted


def duplicate_member(source: Path, target: Path, suffix: str, first: bytes, *, padding: int) -> Path:
    """Copy an archive, writing the member whose name ends with ``suffix`` twice: ``first``, then the original."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as out:
        root = src.namelist()[0].split("/", 1)[0]
        for i in range(padding):
            out.writestr(zipfile.ZipInfo(f"{root}/extra/pad{i}"), b"")
        for info in src.infolist():
            if info.filename.endswith(suffix):
                out.writestr(zipfile.ZipInfo(info.filename), first)
            out.writestr(zipfile.ZipInfo(info.filename), src.read(info))
    return target


def sample_inputs(*values) -> bytes:
    """What torch.export.save stores as a program's sample inputs: torch.save((args, kwargs))."""
    buffer = io.BytesIO()
    torch.save((tuple(values), {}), buffer)
    return buffer.getvalue()


def pt2_with_payload_first(honest: Path, target: Path, marker: Path) -> Path:
    """A .pt2 whose first copy of its sample inputs creates ``marker`` when unpickled; the last is honest."""
    return duplicate_member(honest, target, "/data/sample_inputs/model.pt", sample_inputs(OpenMarker(marker)),
                            padding=PT2_PADDING)


def torchscript_reading_a_file_first(honest: Path, target: Path, secret: Path) -> Path:
    """A TorchScript SmallCNN whose first copy of its code also returns ``secret``'s bytes (``torch.from_file``)."""
    with zipfile.ZipFile(honest) as src:
        name = next(n for n in src.namelist() if n.endswith("code/__torch__/tests/models/torch_files.py"))
        code = src.read(name).decode()
    size = secret.stat().st_size
    evil = code.replace("    x: Tensor) -> Tensor:\n", "    x: Tensor) -> Tuple[Tensor, Tensor]:\n").replace(
        "    return _0\n", f"    _1 = torch.from_file({str(secret)!r}, False, {size}, dtype=0)\n    return (_0, _1)\n")
    assert evil != code and "from_file" in evil
    return duplicate_member(honest, target, "code/__torch__/tests/models/torch_files.py", evil.encode(),
                            padding=TORCHSCRIPT_PADDING)
