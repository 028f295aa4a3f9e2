"""PyTorch model files for the converter tests, honest and crafted, all built in seconds.

Honest: ResNet-18 (seeded random init, tests/models/resnet.py) as safetensors, as a ``.pt``
state dict and as a ``torch.export`` program with a dynamic batch; a small TorchScript CNN.
Crafted: the same files with a pickle payload that would create ``marker`` when unpickled
(``open(marker, 'w')``), so a test can assert the payload never ran.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from tests.models.resnet import resnet18

IMAGE = (3, 64, 64)


class OpenMarker:
    """Unpickling this calls ``open(marker, 'w')``: the marker file appears iff the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def seeded_resnet18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return resnet18().eval()


def save_safetensors(model: nn.Module, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def save_program(model: nn.Module, path: Path, *, batch: int = 2) -> Path:
    """torch.export with a dynamic batch axis, saved as .pt2."""
    example = (torch.randn(batch, *IMAGE),)
    program = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return path


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        return self.fc(y.mean(dim=(2, 3)))


def save_torchscript(path: Path, seed: int = 0) -> tuple[Path, nn.Module]:
    torch.manual_seed(seed)
    model = SmallCNN().eval()
    torch.jit.script(model).save(str(path))
    return path, model


class FixedBatchView(nn.Module):
    """Flattens with a batch size baked in: fine at batch 2, wrong at any other."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(2, 3 * 8 * 8))


def save_traced_fixed_batch(path: Path) -> Path:
    torch.manual_seed(0)
    torch.jit.trace(FixedBatchView().eval(), torch.randn(2, 3, 8, 8)).save(str(path))
    return path


# ---------------------------------------------------------------------------------------------
# Crafted files


def rewrite_zip(source: Path, target: Path, replace: dict[str, bytes | None]) -> Path:
    """Copy a zip archive, replacing members whose name ends with a key (None deletes them)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as out:
        for info in src.infolist():
            match = next((key for key in replace if info.filename.endswith(key)), None)
            if match is None:
                out.writestr(info, src.read(info))
            elif replace[match] is not None:
                out.writestr(info, replace[match])
    return target


def poisoned_state_dict(model: nn.Module, path: Path, marker: Path) -> Path:
    """A torch.save state dict with one extra entry whose unpickling creates marker."""
    state = dict(model.state_dict())
    state["extra"] = OpenMarker(marker)
    torch.save(state, str(path))
    return path


def poisoned_torchscript(path: Path, target: Path, marker: Path) -> Path:
    """A TorchScript archive whose data.pkl is a pickle with a GLOBAL io.open payload."""
    return rewrite_zip(path, target, {"/data.pkl": pickle.dumps(OpenMarker(marker), protocol=2)})


def poisoned_program(path: Path, target: Path, marker: Path) -> Path:
    """A .pt2 whose sample inputs are a torch.save pickle with a payload.

    torch.export.load tries weights_only=True on them, then falls back to weights_only=False.
    """
    buffer = io.BytesIO()
    torch.save(((OpenMarker(marker),), {}), buffer)
    return rewrite_zip(path, target, {"/data/sample_inputs/model.pt": buffer.getvalue()})


def tampered_program_json(path: Path, target: Path, edit) -> Path:
    """A .pt2 whose models/model.json is passed through ``edit(dict) -> None``."""
    with zipfile.ZipFile(path) as src:
        name = next(n for n in src.namelist() if n.endswith("/models/model.json"))
        model = json.loads(src.read(name))
    edit(model)
    return rewrite_zip(path, target, {"/models/model.json": json.dumps(model).encode()})
