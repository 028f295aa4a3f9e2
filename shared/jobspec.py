"""The job file schema. Unknown keys are rejected; every error names its field.

This is the schema only: whether the format, the variants and their params exist is for the
plugins to say, and ``worker.plugins.catalog.check_job`` checks a parsed job against them
(the producer before it submits, the worker when it reads a job).

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
                                "for formats that take text (hf-transformers) also a .txt, one example per line")
    eval_data: str | None = Field(default=None, min_length=1,
                                  description=".npz of the model's inputs plus 'labels' (class ids): accuracy")
    gate_samples: str | None = Field(
        default=None, min_length=1,
        description="held-out inputs the optimize gate measures fidelity on (no optimizer sees them); then every "
        "row of samples calibrates. The same kind of file as samples (.npz, or .txt for formats that take text)")

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

    @model_validator(mode="after")
    def _gate_samples_beside_samples(self) -> ModelSpec:
        if self.gate_samples is None:
            return self
        if self.samples is None:
            raise ValueError("model.gate_samples needs model.samples: the rows the optimizers calibrate on")
        if _is_text(self.gate_samples) != _is_text(self.samples):
            raise ValueError(f"model.gate_samples {self.gate_samples} must be the same kind of file as model.samples "
                             f"{self.samples} (both .npz, or both .txt)")
        return self


def _is_text(path: str) -> bool:
    return path.lower().endswith(".txt")


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
    # text-generation models (shared.inference.generation) are gated on these two, not on cosine_min / max_abs
    perplexity_ratio_max: float | None = Field(
        default=1.10, ge=1, description="text-generation: most a variant's held-out perplexity may be, as a multiple "
        "of the fp32 export's")
    next_token_agreement_min: float | None = Field(
        default=0.90, ge=0, le=1, description="text-generation: least share of held-out positions where the "
        "variant's greedy next token is the source model's")


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
    require_improvement: bool = Field(
        default=False, description="fail the job when no variant beats fp32 (nothing passed the gate, or, for "
        "objective latency, nothing was measurably faster) instead of deploying fp32")
    target: str | None = Field(
        default=None, pattern=r"^(cpu|gpu)-[a-z0-9][a-z0-9._-]{0,62}$",
        description="hardware class the variants are timed on (cpu-avx2, cpu-avx512-vnni, cpu-amx, gpu-<name>): "
        "the timing runs on a worker of that class (`modelyard workers` lists them)")

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


class PruneSpec(Strict):
    """What to remove. ``keep``: an int is a count (layers kept; heads, neurons or channels kept per layer),
    a float in (0, 1) the fraction kept. Which methods a format supports is the converter plugin's to say
    (``Converter.prune_methods``, checked by ``worker.plugins.catalog.check_job``)."""

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


VERTEX_ALIAS = re.compile(r"^[a-z][a-z0-9-]{0,126}[a-z0-9]$")  # Vertex AI's version alias format


class VertexSpec(Strict):
    """Also release the deployed version on Vertex AI (``shared.vertex``): a new version of a
    Model Registry model, with the alias, deployed to an endpoint with a share of its traffic.

    ``serving``: ``triton`` (NVIDIA Triton reading the model repository; ONNX versions) or
    ``modelyard`` (``modelyard serve --vertex`` reading the version's folder; any format).
    Unset: triton for ONNX, modelyard otherwise. ``serving_image`` overrides the image the
    worker's settings name for it (``MODELYARD_VERTEX_TRITON_IMAGE`` / ``_SERVING_IMAGE``).
    """

    project: str = Field(pattern=r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$", description="Google Cloud project id")
    region: str = Field(default="us-central1", pattern=r"^[a-z]+-[a-z]+[0-9]+$")
    model: str | None = Field(default=None, min_length=1, max_length=128,
                              description="registry model: display name, id or resource name; default model.name")
    endpoint: str | None = Field(default=None, min_length=1, max_length=128,
                                 description="endpoint id, resource name or display name (created if missing); "
                                 "default model.name")
    machine_type: str = Field(default="n1-standard-4", pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")
    accelerator_type: str | None = Field(default=None, pattern=r"^[A-Z][A-Z0-9_]{1,62}$",
                                         description="e.g. NVIDIA_L4, NVIDIA_TESLA_T4")
    accelerator_count: int = Field(default=1, ge=1, le=16)
    min_replicas: int = Field(default=1, ge=1, le=1000)
    max_replicas: int | None = Field(default=None, ge=1, le=1000)
    traffic_percentage: int = Field(default=100, ge=0, le=100,
                                    description="share of the endpoint's traffic for the new version")
    serving: Literal["triton", "modelyard"] | None = None
    serving_image: str | None = Field(default=None, min_length=1, max_length=1024)
    version_alias: str | None = Field(default=None, description="the registry version alias; default deploy.alias")

    @field_validator("version_alias")
    @classmethod
    def _vertex_alias(cls, alias: str | None) -> str | None:
        if alias is not None and not VERTEX_ALIAS.match(alias):
            raise ValueError("a Vertex AI version alias is 2-128 lowercase letters, digits and '-', starting with "
                             "a letter and not ending with '-'")
        return alias

    @model_validator(mode="after")
    def _replicas_ordered(self) -> VertexSpec:
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class DeploySpec(Strict):
    repository: str = Field(min_length=1)
    alias: str = "production"
    vertex: VertexSpec | None = None

    @field_validator("alias")
    @classmethod
    def _alias_is_safe(cls, alias: str) -> str:
        if not NAME.match(alias):
            raise ValueError("must be lowercase letters, digits, '.', '_' or '-'")
        return alias

    @model_validator(mode="after")
    def _vertex_reads_cloud_storage(self) -> DeploySpec:
        if self.vertex is None:
            return self
        if not self.repository.startswith("gs://"):
            raise ValueError(f"deploy.vertex needs deploy.repository to be a gs:// URI (Vertex AI reads model "
                             f"artifacts from Cloud Storage), not {self.repository!r}")
        if self.vertex.version_alias is None and not VERTEX_ALIAS.match(self.alias):
            raise ValueError(f"deploy.alias {self.alias!r} is not a valid Vertex AI version alias (lowercase "
                             "letters, digits and '-', starting with a letter): set deploy.vertex.version_alias")
        return self

    @property
    def vertex_alias(self) -> str:
        """The alias the Vertex AI registry version gets."""
        return self.vertex.version_alias if self.vertex and self.vertex.version_alias else self.alias


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
    def _vertex_triton_serves_onnx(self) -> JobSpec:
        vertex = self.deploy.vertex if self.deploy else None
        if vertex is not None and vertex.serving == "triton" and self.convert.to != "onnx":
            raise ValueError(f"deploy.vertex.serving 'triton' cannot serve a {self.convert.to} model (standard "
                             "Triton images have no TFLite backend): use serving: modelyard")
        return self

    @model_validator(mode="after")
    def _accuracy_gate_has_data(self) -> JobSpec:
        if self.optimize and self.optimize.gate.accuracy_drop_max is not None and self.model.eval_data is None:
            raise ValueError("optimize.gate.accuracy_drop_max needs labelled data to measure accuracy on: "
                             "set model.eval_data (an .npz of the model's inputs plus 'labels')")
        return self

    @model_validator(mode="after")
    def _compress_is_for_encoders(self) -> JobSpec:
        if self.compress and self.model.task == "text-generation":
            raise ValueError("compress (prune, distill) applies to encoder and CNN models; a text-generation model "
                             "goes straight to convert and its int4 / int8-weights variants")
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
