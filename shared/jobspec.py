"""The job file schema. Unknown keys are rejected; every error names its field.

A job names a model and the stages to run on it::

    model: {name: minilm, source: ./models/minilm, format: hf-transformers, task: feature-extraction}
    convert: {to: onnx, opset: 17}
    optimize: {variants: [int8-dynamic], gate: {cosine_min: 0.99}}
    deploy: {repository: file://./model-repo, alias: production}
    device: cpu
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.errors import UserInputError

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
DIM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
Pool = Literal["cpu", "gpu"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(Strict):
    name: str = Field(min_length=1, max_length=128)
    dtype: Literal["float32", "float16", "int64", "int32", "uint8", "int8", "bool"] = "float32"
    shape: list[Annotated[int, Field(ge=1, le=65536)] | str] = Field(min_length=0, max_length=8)

    @field_validator("shape")
    @classmethod
    def _symbolic_dims_are_names(cls, shape: list[int | str]) -> list[int | str]:
        for dim in shape:
            if isinstance(dim, str) and not DIM.match(dim):
                raise ValueError(f"symbolic dimension {dim!r} must be an identifier such as 'batch'")
        return shape


class ModelSpec(Strict):
    name: str
    source: str = Field(min_length=1)
    format: str
    task: str | None = None
    inputs: list[TensorSpec] | None = None
    factory: str | None = Field(default=None, description="module:callable building a torch architecture")
    samples: str | None = Field(default=None, description=".npz of sample inputs (keys are input names); "
                                "for hf-transformers models also a .txt, one example per line")
    eval_data: str | None = Field(default=None, min_length=1,
                                  description=".npz of the model's inputs plus 'labels' (class ids): accuracy")

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, name: str) -> str:
        if not NAME.match(name):
            raise ValueError("must be 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit")
        return name

    @field_validator("factory")
    @classmethod
    def _factory_shape(cls, factory: str | None) -> str | None:
        if factory is not None and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", factory):
            raise ValueError("must look like 'package.module:callable'")
        return factory


class Tolerance(Strict):
    max_abs: float | None = Field(default=1e-3, gt=0, le=1e6)
    cosine_min: float = Field(default=0.999, ge=-1, le=1)


class SampleSpec(Strict):
    batch: int = Field(default=8, ge=1, le=4096)
    sequence: int = Field(default=128, ge=1, le=65536)
    seed: int = Field(default=0, ge=0)


class ConvertSpec(Strict):
    to: Literal["onnx", "tflite"] = "onnx"
    opset: int = Field(default=17, ge=7, le=23)
    tolerance: Tolerance = Tolerance()
    samples: SampleSpec = SampleSpec()


class Gate(Strict):
    cosine_min: float | None = Field(default=0.99, ge=-1, le=1)
    max_abs: float | None = Field(default=None, gt=0)
    top1_min: float | None = Field(default=None, ge=0, le=1)
    accuracy_drop_max: float | None = Field(
        default=None, ge=0, le=1, description="most accuracy (0..1) a variant may lose against fp32's; needs eval_data"
    )


BASELINE = "fp32"  # the converted model as is: every job measures it as the reference point


class VariantSpec(Strict):
    """One variant: ``of`` names the optimizer plugins applied in order (``graph+int8-dynamic``).

    ``params`` go to the plugin; for a combination they are keyed by plugin name. A plain string
    in the job file is shorthand for ``{id: s, of: s}``.
    """

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._+-]{0,62}$")
    of: str = Field(pattern=r"^[a-z0-9][a-z0-9._+-]{0,126}$")
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def parts(self) -> list[str]:
        return self.of.split("+")

    def params_for(self, part: str) -> dict[str, Any]:
        if len(self.parts) == 1:
            return dict(self.params)
        return dict(self.params.get(part, {}))

    @model_validator(mode="after")
    def _combination_params_by_plugin(self) -> VariantSpec:
        extra = set(self.params) - set(self.parts)
        if len(self.parts) > 1 and extra:
            raise ValueError(f"params of a combination are keyed by plugin name ({', '.join(self.parts)}), "
                             f"not {', '.join(sorted(extra))}")
        return self


class OptimizeSpec(Strict):
    variants: list[VariantSpec] = Field(min_length=1, max_length=32)
    gate: Gate = Gate()
    objective: Literal["latency", "size"] = "latency"

    @field_validator("variants", mode="before")
    @classmethod
    def _shorthand(cls, variants: Any) -> Any:
        if isinstance(variants, list):
            return [{"id": v, "of": v} if isinstance(v, str) else v for v in variants]
        return variants

    @field_validator("variants")
    @classmethod
    def _unique(cls, variants: list[VariantSpec]) -> list[VariantSpec]:
        ids = [v.id for v in variants]
        if len(set(ids)) != len(ids):
            raise ValueError("variant ids must be distinct")
        if BASELINE in ids:
            raise ValueError(f"'{BASELINE}' is the baseline every job measures; it is not a variant to list")
        return variants

    @property
    def ids(self) -> list[str]:
        return [v.id for v in self.variants]

    def variant(self, variant_id: str) -> VariantSpec:
        if variant_id == BASELINE:
            return VariantSpec(id=BASELINE, of=BASELINE)
        return next(v for v in self.variants if v.id == variant_id)


TEXT_SAMPLES = (".txt",)  # model.samples given as text, one example per line (hf-transformers)
PRUNE_METHODS = {"layers": "hf-transformers", "heads": "hf-transformers", "ffn-neurons": "hf-transformers",
                 "channels": "torch-state-dict"}


class PruneSpec(Strict):
    """What to remove. ``keep``: an int is a count (layers kept; heads, neurons or channels kept per layer),
    a float in (0, 1) the fraction kept."""

    method: Literal["layers", "heads", "ffn-neurons", "channels"]
    keep: int | float

    @field_validator("keep")
    @classmethod
    def _count_or_ratio(cls, keep: int | float) -> int | float:
        if isinstance(keep, int) and keep < 1 or isinstance(keep, float) and not 0 < keep < 1:
            raise ValueError("must be a count (an integer >= 1) or a ratio (a number between 0 and 1)")
        return keep


class DistillSpec(Strict):
    """Train the pruned student to match the teacher (the source model) on unlabelled data.

    ``data``: a text file, one example per line, for text models; an ``.npz`` of inputs for others.
    A path relative to the job file; the producer uploads it.
    """

    data: str = Field(min_length=1)
    epochs: int = Field(default=2, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=1, le=4096)
    lr: float = Field(default=5e-5, gt=0, le=1)
    temperature: float = Field(default=2.0, gt=0, le=100, description="softens logits for classifiers")
    sequence: int = Field(default=128, ge=8, le=65536, description="text models: tokens per training row")
    seed: int = Field(default=0, ge=0)


class CompressSpec(Strict):
    prune: PruneSpec
    distill: DistillSpec | None = None


class DeploySpec(Strict):
    repository: str = Field(min_length=1)
    alias: str = "production"

    @field_validator("alias")
    @classmethod
    def _alias_is_safe(cls, alias: str) -> str:
        if not NAME.match(alias):
            raise ValueError("must be lowercase letters, digits, '.', '_' or '-'")
        return alias


class JobSpec(Strict):
    model: ModelSpec
    compress: CompressSpec | None = None
    convert: ConvertSpec = ConvertSpec()
    optimize: OptimizeSpec | None = None
    deploy: DeploySpec | None = None
    device: Pool = "cpu"
    pools: dict[Literal["compress", "convert", "optimize", "deploy"], Pool] = Field(
        default_factory=dict, description="pin a stage to a pool, overriding the device rule"
    )

    @model_validator(mode="after")
    def _known_plugins(self) -> JobSpec:
        from worker.plugins import registry  # light: plugins import their frameworks lazily

        if self.model.format not in registry.converters:
            known = ", ".join(sorted(registry.converters))
            raise ValueError(f"model.format {self.model.format!r} is not a known format (known: {known})")
        if self.model.samples and self.model.samples.lower().endswith(TEXT_SAMPLES) and self.model.format != "hf-transformers":
            raise ValueError(f"model.samples {self.model.samples}: text samples (.txt) are for format 'hf-transformers'; "
                             f"give format {self.model.format!r} an .npz of its inputs")
        if self.compress and PRUNE_METHODS[self.compress.prune.method] != self.model.format:
            method = self.compress.prune.method
            raise ValueError(f"compress.prune.method {method!r} applies to format {PRUNE_METHODS[method]!r} models, "
                             f"not {self.model.format!r}")
        if self.optimize and self.optimize.gate.accuracy_drop_max is not None and self.model.eval_data is None:
            raise ValueError("optimize.gate.accuracy_drop_max needs labelled data to measure accuracy on: "
                             "set model.eval_data (an .npz of the model's inputs plus 'labels')")
        for variant in self.optimize.variants if self.optimize else []:
            for part in variant.parts:
                if part not in registry.optimizers:
                    known = ", ".join(sorted(registry.optimizers))
                    raise ValueError(f"optimize.variants: {variant.of!r} is not a known variant (known: {known})")
        return self


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "job"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (check the spelling; see the job file reference in the README)"
        lines.append(f"{where}: {message}")
    return "; ".join(lines)


def parse_job(text: str, *, origin: str = "job file") -> JobSpec:
    """Parse and validate a job file's text. Raises UserInputError naming the bad field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserInputError(f"{origin} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"{origin} must be a YAML mapping with at least a 'model' key")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise UserInputError(f"{origin} is invalid: {_describe(exc)}") from None


def load_job(path: str | Path) -> tuple[JobSpec, Path]:
    """Read a job file; returns the spec and the folder that relative paths in it are relative to."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserInputError(f"cannot read job file {path}: {exc.strerror}") from None
    return parse_job(text, origin=str(path)), path.resolve().parent
