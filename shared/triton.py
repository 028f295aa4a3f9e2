"""Triton model configuration (``config.pbtxt``) for the versions of a model in the repository.

Triton reads one ``config.pbtxt`` per model, not one per version, and every version it loads
runs under it. So each version carries the configuration that matches *it*
(``manifest["triton"]``, a :class:`TritonConfig`, and a rendered ``<version>/config.pbtxt``
beside its files, which Triton ignores), and the model-level ``config.pbtxt`` is rendered from
one served version's configuration with ``version_policy: { specific { versions: [...] } }``
naming the versions that aliases point to. :func:`plan_served` decides which:

* The **primary alias** is ``production`` when it is set, else the alias created first. The
  model-level configuration is its version's (platform, inputs, outputs, TensorRT block).
* Other aliased versions are listed only when their configuration equals the primary's; one
  that differs (another format, other inputs, its own TensorRT engine) cannot run under that
  configuration, so Triton does not load it and ``modelyard serve`` serves it.
* Versions no alias points to are never listed: Triton does not keep every deployed version in
  memory, and a version being uploaded or left half-uploaded by a crash (no manifest, so no
  alias can point to it) is never loaded.

TFLite versions name ``backend: "tflite"``, a backend standard Triton images do not ship: they
are served by ``modelyard serve`` only, which their config comment and manifest (``served_by``)
say. So are text-generation versions (an ONNX Runtime GenAI folder): Triton's onnxruntime
backend would run one forward pass, not the generation loop with its KV cache.

TensorRT variants (``trt-fp16``, ``trt-int8``) are an ONNX file plus the engine cache they were
measured with; their configuration carries the ONNX Runtime backend's TensorRT accelerator
with the engine cache path where Triton sees the version's ``trt_cache`` folder on local disk
(``MODELYARD_TRITON_MODEL_ROOT``, default ``/mnt/models``, where KServe's storage initializer
puts the repository).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from shared.errors import UserInputError

TRITON_DTYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "float64": "TYPE_FP64", "bfloat16": "TYPE_BF16",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int16": "TYPE_INT16", "int8": "TYPE_INT8",
    "uint64": "TYPE_UINT64", "uint32": "TYPE_UINT32", "uint16": "TYPE_UINT16", "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL", "str": "TYPE_STRING",
}
PLATFORMS = {"onnx": 'platform: "onnxruntime_onnx"', "tflite": 'backend: "tflite"'}
TRITON_FORMATS = ("onnx",)  # formats a standard Triton image (tritonserver:<yy.mm>-py3) can load
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MODEL_ROOT = "/mnt/models"  # KServe's storage initializer downloads storageUri here
PRIMARY_ALIAS = "production"
MODELYARD_SERVE = "modelyard serve"
TRITON = "triton"
TFLITE_NOTE = "served by `modelyard serve` only: standard Triton images have no TFLite backend"
GENERATION_TASK = "text-generation"  # shared.inference.generation.GENERATION_TASK (not imported: numpy-free here)
GENERATION_NOTE = ("served by `modelyard serve` only: a text-generation model runs a generation loop "
                   "(ONNX Runtime GenAI), which Triton's onnxruntime backend does not")


def has_batch_axis(tensors: list[dict]) -> bool:
    """True when every tensor's first dimension is the symbolic 'batch' axis."""
    return bool(tensors) and all(t["shape"] and t["shape"][0] == "batch" for t in tensors)


@dataclass(frozen=True)
class TensorRT:
    """The ONNX Runtime backend's TensorRT accelerator for a ``trt-fp16`` / ``trt-int8`` version."""

    precision: str  # "FP16" or "INT8"
    engine_cache: str  # absolute path of the version's trt_cache folder where Triton sees it
    calibration_table: str | None = None  # INT8 ranges, a file inside engine_cache

    def parameters(self) -> list[tuple[str, str]]:
        params = [("precision_mode", self.precision), ("trt_engine_cache_enable", "1"),
                  ("trt_engine_cache_path", self.engine_cache)]
        if self.calibration_table:
            params.append(("int8_calibration_table_name", self.calibration_table))
        return params


@dataclass(frozen=True)
class TritonConfig:
    """What one version needs from its ``config.pbtxt``; equal configs can share one."""

    name: str
    format: str
    inputs: list[dict]
    outputs: list[dict]
    max_batch_size: int  # 0: the model has no batch axis
    tensorrt: TensorRT | None = None
    task: str | None = None  # "text-generation": served by modelyard serve only
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # unknown keys, kept as read

    @classmethod
    def for_model(cls, name: str, model_format: str, inputs: list[dict], outputs: list[dict], *,
                  max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, tensorrt: TensorRT | None = None,
                  task: str | None = None) -> TritonConfig:
        if model_format not in PLATFORMS:
            raise UserInputError(f"model {name!r}: no Triton configuration for format {model_format!r} "
                                 f"(known: {', '.join(PLATFORMS)})")
        batched = has_batch_axis(inputs + outputs)
        return cls(name=name, format=model_format, inputs=[dict(t) for t in inputs],
                   outputs=[dict(t) for t in outputs], max_batch_size=max_batch_size if batched else 0,
                   tensorrt=tensorrt, task=task if task == GENERATION_TASK else None)

    @classmethod
    def from_manifest(cls, name: str, manifest: Mapping[str, Any]) -> TritonConfig:
        """The version's own config; a manifest from before configs were stored gets one derived."""
        stored = manifest.get("triton")
        if isinstance(stored, Mapping):
            return cls.from_dict(stored)
        model_format = manifest.get("format") or str(manifest.get("model_file", "model.onnx")).rsplit(".", 1)[-1]
        return cls.for_model(name, model_format, list(manifest.get("inputs", [])), list(manifest.get("outputs", [])),
                             task=manifest.get("task"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TritonConfig:
        known = {"name", "format", "inputs", "outputs", "max_batch_size", "tensorrt", "task"}
        tensorrt = TensorRT(**data["tensorrt"]) if data.get("tensorrt") else None
        return cls(name=data["name"], format=data["format"], inputs=list(data["inputs"]),
                   outputs=list(data["outputs"]), max_batch_size=int(data["max_batch_size"]), tensorrt=tensorrt,
                   task=data.get("task"), extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("extra")
        return {**self.extra, **data}

    @property
    def triton_loads(self) -> bool:
        """True when a standard Triton image can serve this version."""
        return self.format in TRITON_FORMATS and self.task != GENERATION_TASK

    @property
    def served_by(self) -> list[str]:
        return [MODELYARD_SERVE, TRITON] if self.triton_loads else [MODELYARD_SERVE]

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0

    def render(self, versions: Sequence[int], comments: Sequence[str] = ()) -> str:
        """The config.pbtxt text for Triton to load ``versions`` of this model under this config."""
        notes = list(comments)
        if self.task == GENERATION_TASK:
            notes.append(f"{self.task}: {GENERATION_NOTE}")
        elif not self.triton_loads:
            notes.append(f"{self.format}: {TFLITE_NOTE if self.format == 'tflite' else 'not loadable by Triton'}")
        lines = [f"# {' '.join(note.split())}" for note in notes]
        lines += [f"name: {_quote(self.name)}", PLATFORMS[self.format], f"max_batch_size: {self.max_batch_size}"]
        for section, tensors in (("input", self.inputs), ("output", self.outputs)):
            lines.append(f"{section} [\n" + ",\n".join(self._tensor(t) for t in tensors) + "\n]")
        if self.batched:
            lines.append("dynamic_batching { }")
        lines.append(f"version_policy: {{ specific {{ versions: [ {', '.join(str(v) for v in versions)} ] }} }}")
        if self.tensorrt is not None:
            params = "".join(f"\n    parameters {{ key: {_quote(k)} value: {_quote(v)} }}"
                             for k, v in self.tensorrt.parameters())
            lines.append("optimization { execution_accelerators {\n  gpu_execution_accelerator : [ {\n"
                         f'    name : "tensorrt"{params}\n  }} ]\n}}}}')
        return "\n".join(lines) + "\n"

    def _tensor(self, tensor: dict) -> str:
        dtype = TRITON_DTYPES.get(tensor["dtype"])
        if dtype is None:
            raise UserInputError(f"model {self.name!r}: tensor {tensor['name']!r} has dtype {tensor['dtype']!r}, "
                                 "which Triton has no type for")
        dims = tensor["shape"][1:] if self.batched else tensor["shape"]
        dims_text = ", ".join(str(d) if isinstance(d, int) and d >= 0 else "-1" for d in dims)
        return f"  {{\n    name: {_quote(tensor['name'])}\n    data_type: {dtype}\n    dims: [ {dims_text} ]\n  }}"


def _quote(text: str) -> str:
    """A protobuf text-format string literal (JSON's escapes are a subset it reads)."""
    return json.dumps(str(text), ensure_ascii=False)


def config_pbtxt(name: str, model_format: str, inputs: list[dict], outputs: list[dict], *,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, versions: Sequence[int] = (1,)) -> str:
    """One version's config.pbtxt from its format and io (a shortcut for scripts and tests)."""
    config = TritonConfig.for_model(name, model_format, inputs, outputs, max_batch_size=max_batch_size)
    return config.render(versions)


# -- which versions the model-level config lists ----------------------------------------------


@dataclass(frozen=True)
class ServedPlan:
    """The model-level config's choice: its primary version, the versions listed, those left out."""

    primary_alias: str | None  # None: no alias yet, the latest version stands in
    primary: int
    versions: tuple[int, ...]  # what version_policy lists, ascending
    aliases: dict[str, int]  # every alias and its version
    left_out: dict[str, str]  # alias -> why Triton does not load its version

    def comments(self, config: TritonConfig) -> list[str]:
        notes = ["Written by modelyard on every deploy, promote and rollback; edits are overwritten."]
        if self.primary_alias is None:
            notes.append(f"No alias yet: Triton loads the latest version, {self.primary}.")
        else:
            loaded = ", ".join(f"{a} -> {v}" for a, v in sorted(self.aliases.items()) if a not in self.left_out)
            notes.append(f"Triton loads the versions aliases point to: {loaded}; "
                         f"this config is {self.primary_alias}'s (version {self.primary}).")
        for alias, reason in sorted(self.left_out.items()):
            notes.append(f"Not loaded by Triton ({MODELYARD_SERVE} serves it): {alias} -> "
                         f"{self.aliases[alias]}, {reason}.")
        if not config.triton_loads:
            notes.append(f"Version {self.primary} is {config.task or config.format}: Triton cannot load this model "
                         f"until {self.primary_alias or 'an alias'} points at a version Triton serves.")
        return notes


def primary_alias(aliases: Mapping[str, Mapping[str, Any]]) -> str | None:
    """``production`` when it is set, else the alias created first (its first move), then by name."""
    set_aliases = {name: entry for name, entry in aliases.items() if entry.get("version") is not None}
    if PRIMARY_ALIAS in set_aliases:
        return PRIMARY_ALIAS
    if not set_aliases:
        return None

    def created(name: str) -> tuple[float, str]:
        history = set_aliases[name].get("history") or [{}]
        return float(history[0].get("at", 0.0)), name

    return min(set_aliases, key=created)


def plan_served(aliases: Mapping[str, Mapping[str, Any]], configs: Mapping[int, TritonConfig],
                latest: int | None) -> ServedPlan | None:
    """Which versions the model-level config lists; None when the model has no version at all.

    ``configs`` holds the config of every aliased version (and of ``latest``).
    """
    primary_name = primary_alias(aliases)
    pointed = {name: int(entry["version"]) for name, entry in aliases.items() if entry.get("version") is not None}
    if primary_name is None:
        if latest is None:
            return None
        return ServedPlan(primary_alias=None, primary=latest, versions=(latest,), aliases={}, left_out={})
    primary = pointed[primary_name]
    primary_config = configs[primary]
    left_out: dict[str, str] = {}
    listed = {primary}
    for name, version in pointed.items():
        config = configs[version]
        if config == primary_config:
            listed.add(version)
        elif config.format != primary_config.format:
            left_out[name] = f"a {config.format} version under a {primary_config.format} config"
        elif config.task != primary_config.task:
            left_out[name] = f"a {config.task or 'model'} version under a {primary_config.task or 'model'} config"
        elif config.tensorrt != primary_config.tensorrt:
            left_out[name] = "its own TensorRT engine" if config.tensorrt else "no TensorRT engine"
        else:
            left_out[name] = "other inputs or outputs than the config's"
    return ServedPlan(primary_alias=primary_name, primary=primary, versions=tuple(sorted(listed)),
                      aliases=pointed, left_out=left_out)
