"""Stage plugins, one file each. Importing this package registers all of them.

Plugins kept outside this package are loaded by naming their modules in
``MODELYARD_PLUGIN_MODULES`` (comma-separated, importable from the worker's and the producer's
``sys.path``), e.g. ``MODELYARD_PLUGIN_MODULES=mycompany.modelyard_plugins``. They are imported
after the built-in ones, register the same way, and must be set for the producer too, since it
validates job files against the same registry.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

from worker.plugins.registry import registry

__all__ = ["registry"]

PLUGIN_MODULES_ENV = "MODELYARD_PLUGIN_MODULES"
NOT_PLUGINS = ("base", "registry", "catalog")  # the framework around the plugins, in this package too

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in NOT_PLUGINS:
        importlib.import_module(f"{__name__}.{_module.name}")

for _name in filter(None, (part.strip() for part in os.environ.get(PLUGIN_MODULES_ENV, "").split(","))):
    importlib.import_module(_name)
