"""Plugins by name. Importing ``worker.plugins`` imports every plugin module in the package."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.plugins.base import Converter, Optimizer


class Registry:
    def __init__(self) -> None:
        self.converters: dict[str, type[Converter]] = {}
        self.optimizers: dict[str, type[Optimizer]] = {}

    def add_converter(self, cls: type[Converter]) -> None:
        self._add(self.converters, cls)

    def add_optimizer(self, cls: type[Optimizer]) -> None:
        self._add(self.optimizers, cls)

    @staticmethod
    def _add(table: dict, cls: type) -> None:
        existing = table.get(cls.name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise RuntimeError(f"plugin name {cls.name!r} is taken by {existing.__module__}.{existing.__qualname__}")
        table[cls.name] = cls

    def converter(self, name: str) -> Converter:
        return self.converters[name]()

    def optimizer(self, name: str) -> Optimizer:
        return self.optimizers[name]()


registry = Registry()
