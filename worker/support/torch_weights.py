"""A PyTorch architecture from an allowed factory, and weights loaded into it without running code.

Shared by the ``torch-state-dict`` converter and the compress stage (which prunes such a model).

The job names the factory as ``model.factory: package.module:callable`` (e.g.
``torchvision.models:resnet18``); it is called with no arguments and must return an
``nn.Module`` whose ``load_state_dict(strict=True)`` accepts the weights. Importing a module runs
its code, so the factory must match a pattern in the ``MODELYARD_ALLOWED_FACTORIES`` setting
(default ``["torchvision.models:*"]``), checked before anything is imported.

Weights: ``.safetensors`` (a format with no code in it), or a ``torch.save`` file
(``.pt`` / ``.pth`` / ``.bin``) read only with ``torch.load(weights_only=True)``, whose
restricted unpickler refuses any global outside torch's tensor types. A checkpoint holding the
weights under ``state_dict`` or ``model`` is unwrapped.
"""

from __future__ import annotations

import fnmatch
import importlib
from pathlib import Path

from shared.errors import UserInputError, one_line

SAFETENSORS = (".safetensors",)
TORCH_SAVE = (".pt", ".pth", ".bin")
SETTING = "MODELYARD_ALLOWED_FACTORIES"


def check_factory(factory: str | None, allowed: list[str]) -> str:
    """The factory, when it matches an allowed pattern; UserInputError naming the setting otherwise."""
    if not factory:
        raise UserInputError(
            "model.factory is required for format torch-state-dict: the importable callable that builds the "
            "architecture, e.g. factory: torchvision.models:resnet18"
        )
    if not any(fnmatch.fnmatchcase(factory, pattern) for pattern in allowed):
        raise UserInputError(
            f"model.factory {factory!r} is not allowed on this worker: factories must match one of "
            f"{', '.join(allowed) or '(none)'} (setting {SETTING}); importing a module runs its code, "
            "so an operator has to allow it"
        )
    return factory


def weights_file(source: Path, label: str) -> Path:
    """The one weights file of a source (a file, or a folder holding exactly one)."""
    if source.is_dir():
        found = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in SAFETENSORS + TORCH_SAVE)
        if len(found) != 1:
            raise UserInputError(
                f"{label}: a folder source must hold exactly one weights file (.safetensors, .pt, .pth, .bin); "
                f"found: {', '.join(p.name for p in found) or 'none'}"
            )
        return found[0]
    if not source.is_file():
        raise UserInputError(f"{label}: not found")
    if source.suffix.lower() not in SAFETENSORS + TORCH_SAVE:
        raise UserInputError(f"{label}: weights must be .safetensors, .pt, .pth or .bin, got {source.name}")
    return source


def load_weights(path: Path, label: str) -> dict:
    """A flat {name: tensor} state dict, read without unpickling arbitrary objects."""
    import torch

    if path.suffix.lower() in SAFETENSORS:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise UserInputError(f"{label}: not a readable safetensors file: {one_line(exc)}") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        from worker.support.pickle_scan import weights_only_reason

        if "can't allocate memory" in str(exc) or isinstance(exc, MemoryError):
            raise MemoryError(f"{label}: out of memory loading {path.name}") from None  # the sandbox names its limit

        raise UserInputError(
            f"{label}: torch.load(weights_only=True) refuses the file ({weights_only_reason(exc)}). It holds more "
            "than plain tensors (pickled objects can run code when loaded); save model.state_dict() with safetensors"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"{label}: expected a state dict of tensors, got {type(state).__name__}")
    return dict(state)


def build_module(factory: str, label: str):
    """Call the (already allowed) factory; the nn.Module it returns."""
    import torch

    module_name, _, attr = factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserInputError(f"model.factory {factory!r}: cannot import {module_name} on this worker: {exc}") from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise UserInputError(f"model.factory {factory!r}: {module_name} has no callable {attr}")
    try:
        model = builder()
    except Exception as exc:
        raise UserInputError(
            f"model.factory {factory!r} failed when called with no arguments: {one_line(exc)}"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise UserInputError(f"model.factory {factory!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_state(module, state: dict, label: str, factory: str) -> None:
    """load_state_dict(strict=True), a mismatch reported as the user's."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserInputError(
            f"{label}: the weights do not fit the architecture from {factory}: {one_line(exc)}"
        ) from None
