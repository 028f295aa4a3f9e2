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

So before loading, the archive is opened as a zip (member paths and unpacked size checked)
and every pickle in it is walked with ``pickletools.genops``, never unpickled: a GLOBAL naming
a module outside torch is refused. Source code calling ``from_file`` is refused too.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from shared.errors import UserInputError
from worker.plugins.base import Converter, ConvertRequest, ConvertResult

ALLOWED_MODULES = ("torch", "__torch__")
ALLOWED_GLOBALS = {("collections", "OrderedDict"), ("builtins", "set")}
REFUSED_CODE = (b"from_file",)


class TorchScript(Converter):
    name = "torchscript"
    targets = ("onnx",)
    tools = ("torch", "onnx", "onnxruntime")

    def convert(self, request: ConvertRequest) -> ConvertResult:
        import torch

        from worker.torch_onnx import convert_module, input_specs, one_line, single_file

        label = f"model.source {request.model.source}"
        source = single_file(Path(request.source), label, "TorchScript archive")
        inputs = input_specs(request)
        check_archive(source, label, max_bytes=request.settings.max_archive_bytes)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # "torch.jit.load is deprecated"
                module = torch.jit.load(str(source), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - the C++ loader raises RuntimeError with long traces
            raise UserInputError(f"{label}: torch.jit.load cannot load the archive: {one_line(exc)}") from None
        module.eval()
        return convert_module(module, inputs, request, label)


def check_archive(path: Path, label: str, *, max_bytes: int) -> None:
    """Refuse an archive whose pickles import anything outside torch, or that is not TorchScript."""
    from worker.pickle_scan import archive_root, open_zip, pickle_imports

    with open_zip(path, label, max_bytes=max_bytes) as archive:
        root = archive_root(archive, label)
        names = archive.namelist()
        if f"{root}data.pkl" not in names or not any(n.startswith(f"{root}code/") for n in names):
            hint = ""
            if f"{root}models/" in {n[: len(root) + 7] for n in names}:
                hint = " (it looks like a torch.export .pt2 program: use format torch-exported)"
            elif f"{root}data.pkl" in names:
                hint = " (it looks like a torch.save file: use format torch-state-dict)"
            raise UserInputError(f"{label}: not a TorchScript archive (no data.pkl and code/){hint}")
        for name in names:
            if name.endswith((".pkl", ".debug_pkl")):
                for module, attr in pickle_imports(archive.read(name), f"{label}: {name}"):
                    top = module.split(".", 1)[0]
                    if top not in ALLOWED_MODULES and (module, attr) not in ALLOWED_GLOBALS:
                        raise UserInputError(
                            f"{label}: {name[len(root):]} imports {module}.{attr}, outside torch; "
                            "a TorchScript archive never needs that, so the file is refused as unsafe"
                        )
            elif name.startswith(f"{root}code/") and name.endswith(".py"):
                text = archive.read(name)
                for word in REFUSED_CODE:
                    if word in text:
                        raise UserInputError(
                            f"{label}: {name[len(root):]} calls {word.decode()}, which reads files on the worker; "
                            "refused"
                        )
