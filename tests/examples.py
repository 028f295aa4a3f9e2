"""Load a script from examples/ as a module (examples/ is a folder of scripts, not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(script: str) -> ModuleType:
    """examples/<script>.py, executed as module ``modelyard_example_<script>``."""
    spec = importlib.util.spec_from_file_location(f"modelyard_example_{script}", EXAMPLES / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
