"""A job checked against the plugins it names, and the plugins described for a listing.

``shared.jobspec`` is the schema alone: it knows nothing of the formats and variants that exist.
``check_job`` is the other half, asked of every parsed job by the producer before it submits and
by the worker when it reads the job record, so both sides refuse the same job files with the
same messages: the format must be a converter, text samples and the prune method must suit that
converter, every part of every variant must be an optimizer, and each variant's params must fit
that optimizer's declarations (``Optimizer.params``).

``describe`` lists every plugin as plain data (``modelyard plugins`` prints it).
"""

from __future__ import annotations

import sys
from typing import Any

from shared.errors import UserInputError
from shared.inference.generation import GENERATION_TASK
from shared.jobspec import JobSpec
from worker.plugins import registry
from worker.plugins.base import TEXT_SAMPLES, Converter, Optimizer


def check_job(spec: JobSpec, *, origin: str = "job file") -> JobSpec:
    """The job unchanged when the plugins accept it; UserInputError naming ``origin`` and the field otherwise."""
    try:
        _check_model(spec)
        _check_variants(spec)
    except UserInputError as exc:
        raise UserInputError(f"{origin} is invalid: {exc}") from None
    return spec


def _check_model(spec: JobSpec) -> None:
    model = spec.model
    converter = registry.converters.get(model.format)
    if converter is None:
        known = ", ".join(sorted(registry.converters))
        raise UserInputError(f"model.format {model.format!r} is not a known format (known: {known})")
    if model.samples and model.samples.lower().endswith(TEXT_SAMPLES) and not converter.text_samples:
        takers = _formats(lambda cls: cls.text_samples)
        raise UserInputError(f"model.samples {model.samples}: text samples (.txt) are for {takers}; "
                             f"give format {model.format!r} an .npz of its inputs")
    if spec.compress and spec.compress.prune.method not in converter.prune_methods:
        method = spec.compress.prune.method
        owners = _formats(lambda cls: method in cls.prune_methods)
        raise UserInputError(f"compress.prune.method {method!r} applies to {owners} models, not {model.format!r}")


def _check_variants(spec: JobSpec) -> None:
    for variant in spec.optimize.variants if spec.optimize else []:
        for part in variant.parts:
            optimizer = registry.optimizers.get(part)
            if optimizer is None:
                known = ", ".join(sorted(registry.optimizers))
                raise UserInputError(f"optimize.variants: {variant.of!r} is not a known variant (known: {known})")
            where = f"optimize variant {variant.id}" + (f" ({part})" if part != variant.id else "")
            generating = spec.model.task == GENERATION_TASK
            if optimizer.generation != generating:  # GenAI folders and tensor models take different variants
                takers = sorted(name for name, cls in registry.optimizers.items() if cls.generation == generating)
                kind = "text-generation models" if generating else f"task {spec.model.task or 'default'} models"
                raise UserInputError(f"{where}: {part!r} does not apply to {kind} (variants for them: "
                                     f"{', '.join(takers) or 'none'})")
            optimizer.checked_params(variant.params_for(part), where=where)


def _formats(test) -> str:
    """The converters passing ``test``, as words: format 'a', or formats 'a' or 'b'."""
    names = sorted(name for name, cls in registry.converters.items() if test(cls))
    if not names:
        return "no format"
    quoted = " or ".join(repr(name) for name in names)
    return f"format {quoted}" if len(names) == 1 else f"formats {quoted}"


def describe() -> list[dict[str, Any]]:
    """Every registered plugin as plain data: converters, then optimizers, each sorted by name.

    One dict per plugin: ``name``, ``kind`` ("converter" | "optimizer"), ``summary`` (the first
    line of its docstring, else of its module's), ``params`` (``Param.describe`` each: name, type,
    default, help, choices, min, max), ``module``, ``tools``, and the kind's facts: ``targets``,
    ``source_is_folder``, ``text_samples`` and ``prune_methods`` for a converter; ``applies_to``
    and ``gpu_benefit`` for an optimizer.
    """
    converters = [_describe_converter(registry.converters[name]) for name in sorted(registry.converters)]
    optimizers = [_describe_optimizer(registry.optimizers[name]) for name in sorted(registry.optimizers)]
    return converters + optimizers


def _describe_converter(cls: type[Converter]) -> dict[str, Any]:
    return {**_common(cls, "converter", params=[]), "targets": list(cls.targets),
            "source_is_folder": cls.source_is_folder, "text_samples": cls.text_samples,
            "prune_methods": list(cls.prune_methods)}


def _describe_optimizer(cls: type[Optimizer]) -> dict[str, Any]:
    params = [param.describe(name) for name, param in cls.params.items()]
    return {**_common(cls, "optimizer", params=params), "applies_to": list(cls.applies_to),
            "gpu_benefit": cls.gpu_benefit}


def _common(cls: type, kind: str, *, params: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": cls.name, "kind": kind, "summary": _summary(cls), "params": params,
            "module": cls.__module__, "tools": list(cls.tools)}


def _summary(cls: type) -> str:
    """The first line of the class's own docstring, else of its module's; reST ``literals`` unmarked."""
    doc = cls.__dict__.get("__doc__") or getattr(sys.modules.get(cls.__module__), "__doc__", None) or ""
    lines = doc.strip().splitlines()
    return lines[0].replace("``", "") if lines else ""
