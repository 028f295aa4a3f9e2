"""A TorchScript archive (``torch.jit.save``) -> ONNX.

What ``torch.jit.load`` does with an archive (torch 2.13, ``torch/csrc/jit/serialization``):
it compiles ``code/**.py`` with the TorchScript compiler (a restricted language: no Python
``exec``, ``import`` or ``open``; it can call only registered torch operators) and unpickles
``data.pkl``, ``constants.pkl`` and the ``*.debug_pkl`` files with TorchScript's own C++
unpickler, which resolves a GLOBAL only to torch's tensor rebuilders and TorchScript classes and
fails on anything else ("Unknown type name"); no Python object is unpickled, no Python code
runs. What it does not protect against: torch operators with side effects reachable from
TorchScript code (``aten::from_file`` reads a file into a tensor), resource exhaustion, and
bugs in the C++ deserializer itself.

So before loading, the archive is read by ``worker.support.zip_check`` (duplicate names,
hidden or overlapping data and unsafe paths refused; unpacked size capped) and every pickle in it
is walked with ``pickletools.genops``, never unpickled: a GLOBAL naming a module outside torch is
refused. Source code calling ``from_file`` is refused too
(``worker.support.pickle_scan.check_torchscript_archive``). ``torch.jit.load`` then gets a fresh
archive written from the checked members: the bytes it compiles and unpickles are the bytes that
were checked (a duplicated member once let the check read one copy and torch the other).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from shared.errors import UserInputError, one_line
from worker.plugins.base import Converter, ConvertRequest, ConvertResult
from worker.support.pickle_scan import check_torchscript_archive
from worker.support.zip_check import open_checked_zip


class TorchScript(Converter):
    name = "torchscript"
    targets = ("onnx",)
    tools = ("torch", "onnx", "onnxruntime")

    def convert(self, request: ConvertRequest) -> ConvertResult:
        import torch

        from worker.support.torch_onnx import convert_module, input_specs, single_file

        label = f"model.source {request.model.source}"
        source = single_file(Path(request.source), label, "TorchScript archive")
        inputs = input_specs(request)
        with tempfile.TemporaryDirectory(prefix="modelyard-torchscript-") as scratch:
            with open_checked_zip(source, label, max_bytes=request.settings.max_archive_bytes) as archive:
                check_torchscript_archive(archive, label)
                clean = archive.rewrite(Path(scratch) / "model.pt")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # "torch.jit.load is deprecated"
                    module = torch.jit.load(str(clean), map_location="cpu")
            except Exception as exc:
                raise UserInputError(f"{label}: torch.jit.load cannot load the archive: {one_line(exc)}") from None
        module.eval()
        return convert_module(module, inputs, request, label)

