"""Named arrays and tensor descriptions, and reading a job's data files: .npz (never with pickle), text as lines."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import UserInputError

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output: dims are ints or symbolic names such as 'batch'."""

    name: str
    dtype: str
    shape: list[int | str]

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict) -> TensorInfo:
        return cls(name=data["name"], dtype=data["dtype"], shape=list(data["shape"]))


def save_arrays(path: Path, arrays: Arrays) -> Path:
    np.savez(path, **arrays)
    return path


def load_arrays(path: Path, *, what: str = "arrays") -> Arrays:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (ValueError, OSError, EOFError) as exc:
        raise UserInputError(f"{what} {path.name}: not a readable .npz of plain arrays ({exc})") from None


def text_lines(path: Path, what: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserInputError(f"{what} {path.name}: not UTF-8 text ({exc.reason})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserInputError(f"{what} {path.name}: no text lines")
    return lines
