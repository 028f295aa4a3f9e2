"""Reading and writing named arrays as .npz, never with pickle."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.errors import UserInputError

Arrays = dict[str, np.ndarray]


def save_arrays(path: Path, arrays: Arrays) -> Path:
    np.savez(path, **arrays)
    return path


def load_arrays(path: Path, *, what: str = "arrays") -> Arrays:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (ValueError, OSError, EOFError) as exc:
        raise UserInputError(f"{what} {path.name}: not a readable .npz of plain arrays ({exc})") from None
