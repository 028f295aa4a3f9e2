"""Look inside untrusted PyTorch zip archives without unpickling anything.

PyTorch's file formats (``torch.save``, TorchScript, ``torch.export`` ``.pt2``) are zip archives
holding pickles. A pickle names the callables it wants called with GLOBAL / STACK_GLOBAL / INST
opcodes; ``pickle_imports`` lists those names by walking the opcodes with ``pickletools.genops``,
which decodes the stream without executing it. Archives themselves are read only through
``worker.support.zip_check`` (one copy of each member, names and sizes checked), so a pickle
scanned here is the pickle the loader gets.

``check_torchscript_archive`` applies this to a TorchScript archive (why that is enough before
``torch.jit.load`` is in ``worker/plugins/torchscript.py``).
"""

from __future__ import annotations

import pickletools
import re

from shared.errors import UserInputError
from worker.support.zip_check import CheckedZip

TORCHSCRIPT_MODULES = ("torch", "__torch__")  # what a TorchScript archive's pickles may import
TORCHSCRIPT_GLOBALS = {("collections", "OrderedDict"), ("builtins", "set")}
REFUSED_CODE = (b"from_file",)  # TorchScript source calling these reads files on the worker
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
               "SHORT_BINSTRING"}


def pickle_imports(data: bytes, label: str) -> list[tuple[str, str]]:
    """Every (module, name) the pickle would import, in order. Unreadable streams are refused.

    STACK_GLOBAL takes its module and name from the stack; they are followed through the memo.
    A STACK_GLOBAL whose operands are not plain strings is reported as ``("?", "?")`` so that
    an allow-list check refuses it.
    """
    found: list[tuple[str, str]] = []
    memo: dict[int, object] = {}
    recent: list[object] = []  # values pushed, as far as a string-tracking walk can tell
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append((module, attr))
                recent.append(None)
            elif name == "STACK_GLOBAL":
                attr = recent.pop() if recent else None
                module = recent.pop() if recent else None
                if isinstance(module, str) and isinstance(attr, str):
                    found.append((module, attr))
                else:
                    found.append(("?", "?"))
                recent.append(None)
            elif name in _STRING_OPS:
                recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = recent[-1] if recent else None
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                recent.append(memo.get(int(arg)))
            elif name not in ("PROTO", "FRAME"):
                recent.append(None)
            if len(recent) > 64:
                del recent[:-8]
    except Exception as exc:
        raise UserInputError(f"{label}: not a readable pickle stream ({' '.join(str(exc).split())[:200]})") from None
    return found


def archive_root(names: list[str], label: str) -> str:
    """The one top-level folder every member of a PyTorch archive lies in, with a trailing '/'."""
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or not all("/" in name for name in names):
        raise UserInputError(f"{label}: not a PyTorch archive (its members do not share one top-level folder)")
    return roots.pop() + "/"


def weights_only_reason(exc: BaseException) -> str:
    """The part of a ``torch.load(weights_only=True)`` refusal that says what was refused."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"WeightsUnpickler error:\s*([^\n]*?)(?: was not an allowed global by default|\. |\n|$)", text)
    line = match.group(1) if match else text
    line = " ".join(line.split())
    return line if len(line) <= 200 else line[:197] + "..."


def check_torchscript_archive(archive: CheckedZip, label: str) -> None:
    """Refuse an archive whose pickles import anything outside torch, or that is not TorchScript."""
    names = archive.names()
    root = archive_root(names, label)
    if f"{root}data.pkl" not in archive or not any(n.startswith(f"{root}code/") for n in names):
        hint = ""
        if any(n.startswith(f"{root}models/") for n in names):
            hint = " (it looks like a torch.export .pt2 program: use format torch-exported)"
        elif f"{root}data.pkl" in archive:
            hint = " (it looks like a torch.save file: use format torch-state-dict)"
        raise UserInputError(f"{label}: not a TorchScript archive (no data.pkl and code/){hint}")
    for name in names:
        if name.endswith((".pkl", ".debug_pkl")):
            for module, attr in pickle_imports(archive.read(name), f"{label}: {name}"):
                top = module.split(".", 1)[0]
                if top not in TORCHSCRIPT_MODULES and (module, attr) not in TORCHSCRIPT_GLOBALS:
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
