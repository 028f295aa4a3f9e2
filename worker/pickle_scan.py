"""Look inside untrusted PyTorch zip archives without unpickling anything.

PyTorch's file formats (``torch.save``, TorchScript, ``torch.export`` ``.pt2``) are zip archives
holding pickles. A pickle names the callables it wants called with GLOBAL / STACK_GLOBAL / INST
opcodes; ``pickle_imports`` lists those names by walking the opcodes with ``pickletools.genops``,
which decodes the stream without executing it. ``open_zip`` opens an archive after checking its
member names and its total unpacked size.
"""

from __future__ import annotations

import pickletools
import re
import zipfile
from pathlib import Path, PurePosixPath

from shared.errors import UserInputError

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
    except Exception as exc:  # noqa: BLE001 - genops raises ValueError and friends on garbage
        raise UserInputError(f"{label}: not a readable pickle stream ({' '.join(str(exc).split())[:200]})") from None
    return found


def open_zip(path: Path, label: str, *, max_bytes: int) -> zipfile.ZipFile:
    """Open a zip archive whose members are plain relative paths and whose unpacked size is capped."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UserInputError(f"{label}: not a zip archive ({exc})") from None
    total = 0
    for info in archive.infolist():
        name = info.filename
        parts = PurePosixPath(name).parts
        if name.startswith(("/", "\\")) or "\\" in name or ".." in parts or (parts and ":" in parts[0]):
            archive.close()
            raise UserInputError(f"{label}: archive member {name!r} has an unsafe path")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            archive.close()
            raise UserInputError(f"{label}: archive member {name!r} is a symbolic link")
        total += info.file_size
        if total > max_bytes:
            archive.close()
            raise UserInputError(
                f"{label}: the archive unpacks to more than {max_bytes} bytes (MODELYARD_MAX_ARCHIVE_BYTES)"
            )
    return archive


def archive_root(archive: zipfile.ZipFile, label: str) -> str:
    """The one top-level folder every member of a PyTorch archive lies in, with a trailing '/'."""
    roots = {name.split("/", 1)[0] for name in archive.namelist()}
    if len(roots) != 1 or not all("/" in name for name in archive.namelist()):
        raise UserInputError(f"{label}: not a PyTorch archive (its members do not share one top-level folder)")
    return roots.pop() + "/"


def weights_only_reason(exc: BaseException) -> str:
    """The part of a ``torch.load(weights_only=True)`` refusal that says what was refused."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: was not an allowed global by default|\. |\n|$)", text)
    line = match.group(1) if match else text
    line = " ".join(line.split())
    return line if len(line) <= 200 else line[:197] + "..."
