"""The workdir a sandboxed load leaves behind: plain files only, and a model that reads nothing outside it.

The parent uploads every file under the workdir and opens the model with ONNX Runtime, as a
worker user that can read more than the sandbox could. A compromised load could leave a symlink
to a worker file (its bytes would become an artifact), a FIFO (the upload would block forever),
or an ONNX model whose external data location points outside the folder (ONNX Runtime would read
that file into the model's weights). All of those are refused here, before the parent touches
a byte. Nothing in the sandbox runs any more at this point: its pid namespace ended with it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

from shared.errors import UserInputError


def check_workdir(workdir: Path, model_file: str) -> Path:
    """The model file's path in workdir; UserInputError for anything but plain files and folders."""
    check_plain(workdir)
    model = _inside(workdir, model_file, "model file")
    if not model.is_file():
        raise UserInputError(f"the sandboxed model load named {model_file!r} as its model, which it did not write")
    if model.suffix.lower() == ".onnx":
        _check_external_data(model, workdir)
    return model


def check_plain(workdir: Path) -> None:
    """UserInputError unless everything under workdir is a plain file or folder."""
    for folder, dirs, files in os.walk(workdir, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                kind = "a symlink" if stat.S_ISLNK(mode) else "a special file"
                raise UserInputError(
                    f"the sandboxed model load left {kind} in its output ({path.relative_to(workdir)}); refused"
                )


def _inside(workdir: Path, relative: str, what: str) -> Path:
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts or "\\" in relative:
        raise UserInputError(f"the sandboxed model load named {what} {relative!r}, outside its output folder")
    return workdir.joinpath(*pure.parts)


def _check_external_data(model: Path, workdir: Path) -> None:
    from shared.inference.runtime import external_data_files

    try:
        locations = external_data_files(model)
    except Exception as exc:
        raise UserInputError(f"the converted model {model.name} is not a readable ONNX file: {exc}") from None
    for location in locations:
        data = _inside(model.parent, location.as_posix(), "external data")
        if workdir not in data.parents or not data.is_file():
            raise UserInputError(f"the converted model {model.name} names external data {location} that is not "
                                 "a file beside it; refused")
