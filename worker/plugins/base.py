"""Plugin base classes. A plugin is one file that subclasses one of these and sets ``name``.

Subclasses register themselves by name when their module is imported. Heavy libraries
(torch, tensorflow, onnxruntime) are imported inside the methods, never at module level:
a prefork worker whose parent process touched them before forking hangs in the child.

A plugin declares what it is up front, as class attributes: the formats it reads and writes,
the facts a job file is checked against (``worker.plugins.catalog``) and, for an optimizer,
its parameters (``params``: a ``Param`` each). A plugin module imports this module, ``shared``
and ``worker.support``, never another plugin module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from shared.arrays import Arrays, TensorInfo
from shared.errors import UserInputError
from worker.support.plugin_io import ConvertRequest, ConvertResult, OptimizeRequest

__all__ = [
    "TEXT_SAMPLES", "Arrays", "ConvertRequest", "ConvertResult", "Converter", "OptimizeRequest", "Optimizer",
    "Param", "TensorInfo",
]

TEXT_SAMPLES = (".txt",)  # model.samples with this suffix is text, one example per line (Converter.text_samples)
PARAM_TYPES: dict[type, str] = {bool: "bool", int: "int", float: "float", str: "str", list: "list[str]"}


@dataclass(frozen=True)
class Param:
    """One parameter an optimizer takes from a variant's ``params``: its type, default and meaning.

    ``type`` is bool, int, float, str or list (a list of strings). An int is accepted where a
    float is declared (YAML reads ``1`` as an int) and becomes a float; a bool is never taken
    for a number. ``choices`` limits the values; ``min`` / ``max`` bound a number, inclusive.
    """

    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise TypeError(f"Param type must be one of {', '.join(PARAM_TYPES.values())}, not {self.type!r}")

    @property
    def type_name(self) -> str:
        return PARAM_TYPES[self.type]

    def check(self, value: Any, *, name: str, where: str) -> Any:
        """``value`` as this type (an int given for a float becomes a float); UserInputError naming it otherwise."""
        typed = self._typed(value)
        if typed is None:
            article = "an" if self.type_name[0] in "aeiou" else "a"
            raise UserInputError(f"{where}: parameter {name} must be {article} {self.type_name}, got {value!r}")
        if self.choices is not None and typed not in self.choices:
            raise UserInputError(
                f"{where}: parameter {name} must be one of {', '.join(map(str, self.choices))}, got {value!r}"
            )
        too_low = self.min is not None and typed < self.min
        too_high = self.max is not None and typed > self.max
        if too_low or too_high:
            if self.min is not None and self.max is not None:
                bounds = f"within {self.min:g}..{self.max:g}"
            else:
                bounds = f"at least {self.min:g}" if too_low else f"at most {self.max:g}"
            raise UserInputError(f"{where}: parameter {name} must be {bounds}, got {value!r}")
        return typed

    def _typed(self, value: Any) -> Any:
        """The value converted to the declared type, or None when it is not of that type."""
        if self.type is bool:
            return value if isinstance(value, bool) else None
        if isinstance(value, bool):  # bool is an int subclass: never a number here
            return None
        if self.type is float and isinstance(value, (int, float)):
            return float(value)
        if self.type is list:
            return list(value) if isinstance(value, list) and all(isinstance(v, str) for v in value) else None
        return value if isinstance(value, self.type) else None

    def describe(self, name: str) -> dict[str, Any]:
        """The declaration as plain data, for listings (``modelyard plugins``)."""
        return {"name": name, "type": self.type_name, "default": self.default, "help": self.help,
                "choices": list(self.choices) if self.choices is not None else None,
                "min": self.min, "max": self.max}


class Converter:
    """Turns a source model of one format into a deployable model plus reference outputs."""

    name: ClassVar[str]
    targets: ClassVar[tuple[str, ...]] = ("onnx",)
    source_is_folder: ClassVar[bool] = False  # True: the source is a directory of files
    tools: ClassVar[tuple[str, ...]] = ("onnx", "onnxruntime")  # packages whose versions key the cache
    text_samples: ClassVar[bool] = False  # True: model.samples may be a .txt (TEXT_SAMPLES), one example per line
    prune_methods: ClassVar[tuple[str, ...]] = ()  # compress.prune.method values this format's models support
    # False only for test plugins whose faults must hit the worker process itself (tests/plugins/fault.py):
    # a converter that reads a user's file runs in the sandbox (worker.sandbox).
    sandboxed: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            from worker.plugins.registry import registry

            registry.add_converter(cls)

    def convert(self, request: ConvertRequest) -> ConvertResult:
        raise NotImplementedError


class Optimizer:
    """Turns one model file into a variant of it (quantized, fused, ...).

    ``params`` declares every parameter a variant may set. A subclass's ``optimize`` is wrapped
    when the class is created so that it receives ``request.params`` checked against them and
    completed with their defaults: the defaults live in the declaration, not in the code.
    """

    name: ClassVar[str]
    applies_to: ClassVar[tuple[str, ...]] = ("onnx",)  # model file suffixes without the dot
    gpu_benefit: ClassVar[bool] = False  # routed to the gpu pool when the job says device: gpu
    tools: ClassVar[tuple[str, ...]] = ("onnx", "onnxruntime")  # packages whose versions key the cache
    params: ClassVar[dict[str, Param]] = {}  # the parameters a variant may set; none by default
    # True: applies to text-generation models (ONNX Runtime GenAI folders), and only to them
    generation: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "optimize" in cls.__dict__:
            cls.optimize = _receiving_checked_params(cls.__dict__["optimize"])  # type: ignore[method-assign]
        if "name" in cls.__dict__:
            from worker.plugins.registry import registry

            registry.add_optimizer(cls)

    @classmethod
    def checked_params(cls, given: Mapping[str, Any], *, where: str | None = None) -> dict[str, Any]:
        """``given`` checked against ``params`` and completed with their defaults, in declaration order.

        Raises UserInputError naming ``where`` (default: ``optimize variant <name>``) and the
        parameter: an unknown one (listing the known ones), a wrong type, a value outside its
        choices or bounds.
        """
        where = where or f"optimize variant {getattr(cls, 'name', cls.__qualname__)}"
        unknown = [key for key in given if key not in cls.params]
        if unknown:
            raise UserInputError(
                f"{where}: unknown parameter {unknown[0]!r} (known: {', '.join(cls.params) or 'none'})"
            )
        return {
            key: param.check(given[key], name=key, where=where) if key in given else _fresh(param.default)
            for key, param in cls.params.items()
        }

    def optimize(self, request: OptimizeRequest) -> Path:
        """Write the variant into request.workdir and return its model file's path."""
        raise NotImplementedError


def _fresh(default: Any) -> Any:
    """A copy of a mutable default, so that no call can change the declaration."""
    return list(default) if isinstance(default, list) else default


OptimizeMethod = Callable[[Any, OptimizeRequest], Path]


def _receiving_checked_params(optimize: OptimizeMethod) -> OptimizeMethod:
    """``optimize`` called with ``request.params`` checked and completed (a copy of the request: the caller's stays)."""
    @functools.wraps(optimize)
    def checked(self: Optimizer, request: OptimizeRequest) -> Path:
        return optimize(self, replace(request, params=self.checked_params(request.params)))

    return checked
