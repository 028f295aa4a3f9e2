"""Stage plugins, one file each. Importing this package registers all of them."""

from __future__ import annotations

import importlib
import pkgutil

from worker.plugins.registry import registry

__all__ = ["registry"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in ("base", "registry"):
        importlib.import_module(f"{__name__}.{_module.name}")
