"""How sentence-transformers turns token states into one vector per row: pooling and normalization.

Read from a model folder's ``modules.json`` (a ``Normalize`` module) and its Pooling module's
``config.json``; a folder without them gets mean pooling and no normalization. ``pool`` is the
same computation in torch, so the exported ``sentence_embedding`` is what
sentence-transformers' ``encode`` returns.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.errors import UserInputError

POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


def pooling_of(folder: Path, source: str) -> dict:
    """How sentence-transformers turns this folder's token states into one vector: {mode, normalize}."""

    def read(path: Path):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserInputError(f"model.source {source}: {path.name} is not readable JSON ({exc})") from None

    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return {"mode": "mean", "normalize": False}
    modules = read(modules_file)
    if not isinstance(modules, list):
        raise UserInputError(f"model.source {source}: modules.json is not a list of modules")
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: str(m.get("path", "")) for m in modules if isinstance(m, dict)}
    extra = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if extra:
        raise UserInputError(f"model.source {source}: sentence-transformers module(s) {', '.join(extra)} are not "
                             "supported for task sentence-embedding (supported: Transformer, Pooling, Normalize)")
    mode = "mean"
    if "Pooling" in kinds:
        folder_path = (folder / kinds["Pooling"]).resolve()
        if not folder_path.is_relative_to(folder.resolve()):
            raise UserInputError(f"model.source {source}: modules.json's Pooling path leaves the model folder")
        config = read(folder_path / "config.json")
        modes = [name for key, name in POOLING_MODES.items() if config.get(key)]
        others = [key for key, value in config.items() if key.startswith("pooling_mode_") and value
                  and key not in POOLING_MODES]
        if len(modes) != 1 or others:
            asked = ", ".join(modes + others) or "no mode"
            raise UserInputError(f"model.source {source}: the Pooling module asks for {asked}; task "
                                 f"sentence-embedding supports exactly one of {', '.join(POOLING_MODES.values())}")
        mode = modes[0]
    return {"mode": mode, "normalize": "Normalize" in kinds}


def pool(hidden, mask, pooling: dict):
    """[batch, sequence, dim] token states -> [batch, dim], padding (mask 0) left out."""
    import torch

    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    if pooling["mode"] == "cls":
        vector = hidden[:, 0]
    elif pooling["mode"] == "max":
        vector = hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    else:
        vector = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)
    if pooling["normalize"]:
        vector = torch.nn.functional.normalize(vector, p=2.0, dim=-1)
    return vector
