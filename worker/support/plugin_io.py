"""What a stage hands a plugin and gets back: ``ConvertRequest``, ``ConvertResult``, ``OptimizeRequest``.

They are the plugins' interface (``worker.plugins.base`` re-exports them, and plugins and stages
import them from there), kept here so that the support modules can take and return them without
importing ``worker.plugins``, whose import loads every plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.arrays import Arrays, TensorInfo
from shared.jobspec import ConvertSpec, ModelSpec
from shared.settings import Settings


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
    samples: Arrays  # the calibration part of the sample inputs (never the rows the gate measures on)
    task: str | None
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    params: dict[str, Any] = field(default_factory=dict)  # inside Optimizer.optimize: checked, every declared one set
    # The source model's outputs on ``samples`` (by output name), for plugins that tune themselves
    # against the source: compare a candidate's outputs with these, not with the gate rows.
    reference: Arrays = field(default_factory=dict)
    # The job's gate thresholds (``shared.jobspec.Gate`` as a dict: cosine_min, max_abs, top1_min,
    # accuracy_drop_max; None where unset), for plugins that search for the cheapest model that passes.
    gate: dict[str, Any] = field(default_factory=dict)
    # The worker's settings (the sandbox a plugin that reads the user's source runs its load in);
    # None: read from the environment when needed.
    settings: Settings | None = None
