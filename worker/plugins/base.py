"""Plugin base classes. A plugin is one file that subclasses one of these and sets ``name``.

Subclasses register themselves by name when their module is imported. Heavy libraries
(torch, tensorflow, onnxruntime) are imported inside the methods, never at module level:
a prefork worker whose parent process touched them before forking hangs in the child.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from shared.jobspec import ConvertSpec, ModelSpec
from shared.settings import Settings

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


@dataclass
class ConvertRequest:
    source: Path  # the downloaded source: a file, or a folder for multi-file formats
    model: ModelSpec
    convert: ConvertSpec
    workdir: Path  # write outputs here (an empty per-task temporary folder)
    settings: Settings
    samples: Arrays | None = None  # user-supplied sample inputs, if the job named a .npz
    sample_text: list[str] | None = None  # user-supplied sample text (one example per line), if it named a .txt


@dataclass
class ConvertResult:
    model_file: str  # path of the converted model, relative to workdir
    samples: Arrays  # the inputs the reference was computed on
    reference: Arrays  # the source framework's outputs on samples, by output name
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the framework version used


@dataclass
class OptimizeRequest:
    model: Path  # the input model file (its external data, if any, lies beside it)
    workdir: Path  # write the optimized model here
    samples: Arrays  # sample inputs, usable as calibration data
    task: str | None
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    params: dict[str, Any] = field(default_factory=dict)


class Converter:
    """Turns a source model of one format into a deployable model plus reference outputs."""

    name: ClassVar[str]
    targets: ClassVar[tuple[str, ...]] = ("onnx",)
    source_is_folder: ClassVar[bool] = False  # True: the source is a directory of files
    tools: ClassVar[tuple[str, ...]] = ("onnx", "onnxruntime")  # packages whose versions key the cache

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            from worker.plugins.registry import registry

            registry.add_converter(cls)

    def convert(self, request: ConvertRequest) -> ConvertResult:
        raise NotImplementedError


class Optimizer:
    """Turns one model file into a variant of it (quantized, fused, ...)."""

    name: ClassVar[str]
    applies_to: ClassVar[tuple[str, ...]] = ("onnx",)  # model file suffixes without the dot
    gpu_benefit: ClassVar[bool] = False  # routed to the gpu pool when the job says device: gpu
    tools: ClassVar[tuple[str, ...]] = ("onnx", "onnxruntime")  # packages whose versions key the cache

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            from worker.plugins.registry import registry

            registry.add_optimizer(cls)

    def optimize(self, request: OptimizeRequest) -> Path:
        """Write the variant into request.workdir and return its model file's path."""
        raise NotImplementedError
