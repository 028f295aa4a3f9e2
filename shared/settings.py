"""Settings shared by the producer and the workers, read from ``MODELYARD_*`` environment variables.

When no broker URL is configured, the producer and workers use the local stack that
``modelyard up`` started: it records its URLs in ``$MODELYARD_HOME/stack.json``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

STAGES = ("convert", "optimize", "deploy")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELYARD_", extra="ignore")

    home: Path = Field(default=Path("~/.modelyard"), description="State folder of the local stack.")
    broker_url: str | None = Field(
        default=None,
        description="Redis URL (redis://, rediss://, redis+socket://), or Redis Sentinel: "
        "sentinel://:password@host1:26379;sentinel://host2:26379/0?master_name=NAME (shared/broker.py has the "
        "options). Unset: the local stack's.",
    )
    artifact_store: str | None = Field(
        default=None, description="file:///path or gs://bucket/prefix. Unset: $MODELYARD_HOME/artifacts."
    )
    gcs_project: str | None = Field(
        default=None,
        description="Google Cloud project of gs:// clients (bucket creation, requester billing). Unset: the "
        "project of the credentials (google.auth.default(): the service account's, or gcloud's configured one).",
    )
    triton_model_root: str = Field(
        default="/mnt/models",
        description="Where Triton sees the model repository on local disk (KServe's storage initializer puts it "
        "in /mnt/models); the TensorRT engine cache path in a trt-fp16 / trt-int8 version's config.pbtxt is "
        "<root>/<model>/<version>/trt_cache.",
    )

    stage_time_limit_s: int = Field(default=3600, ge=10, description="Hard time limit of one stage.")
    stage_soft_time_limit_s: int = Field(default=3300, ge=5, description="Soft limit: the stage is told to stop.")
    visibility_timeout_s: int = Field(
        default=4000, description="Redis redelivery timeout for unacknowledged messages; above the hard limit."
    )
    max_retries: int = Field(default=5, ge=0, description="Retries of a transient failure.")
    redrive_after_s: int = Field(
        default=300, ge=0,
        description="A job QUEUED or RUNNING with no stage running, no message for it in any queue and nothing "
        "recorded for this long lost a stage's message (worker.redrive): a worker sends that stage again. 0: off.")
    task_events: bool = Field(
        default=False,
        description="Workers send task events from the start. Off by default: publishing them took about 40% "
        "of a worker main process's CPU per message, and Flower turns them on by itself (enable_events every "
        "5 s) while it runs.",
    )
    lease_ttl_s: int = Field(default=60, ge=5, description="Lifetime of a step lease between renewals.")
    job_retention_days: float = Field(
        default=30, gt=0, description="A finished job's record expires from Redis this many days after it ended; "
        "'modelyard gc' keeps the artifacts of jobs younger than this (its --older-than default)."
    )
    gc_grace_s: int = Field(
        default=3600, ge=0, description="'modelyard gc' never deletes an object written or reused less than this "
        "many seconds ago (outputs a running step is uploading, inputs a submitter just uploaded)."
    )

    bench_threads: int = Field(default=2, ge=1, description="Intra-op threads when measuring latency.")
    bench_runs: int = Field(default=20, ge=3, description="Timed runs per latency measurement.")
    bench_warmup: int = Field(default=3, ge=0)
    # The select stage times fp32 and the variants in one process, interleaved (shared.inference.paired).
    paired_runs_per_round: int = Field(default=3, ge=1, description="Runs of each model per round (median kept).")
    paired_min_rounds: int = Field(default=5, ge=2, description="Rounds before the intervals may stop measuring.")
    paired_max_rounds: int = Field(default=40, ge=2, description="Most rounds, decided or not.")
    paired_max_seconds: float = Field(default=60.0, gt=0, description="Most seconds of paired timing, decided or not.")
    paired_margin: float = Field(
        default=0.03, gt=0, lt=0.5, description="Ratios to fp32 within 1 ± this are 'no measurable difference'."
    )
    paired_confidence: float = Field(default=0.95, gt=0.5, lt=1, description="Confidence of the ratio intervals.")
    paired_settle_ms: float = Field(
        default=30.0, ge=0,
        description="Untimed runs of a model before each of its turns, about this many ms (at least one; 0: none): "
                    "the first run after another model pays for its spinning threads and evicted caches."
    )

    allowed_factories: list[str] = Field(
        default_factory=lambda: ["torchvision.models:*"],
        description="module:callable patterns a torch-state-dict job may name as its factory.",
    )
    max_archive_bytes: int = Field(default=8 * 2**30, description="Cap on the unpacked size of an archive.")
    allowed_repositories: list[str] = Field(
        default_factory=lambda: ["file://*"],
        description="URI patterns (fnmatch) of the model repositories a job may deploy to, checked by the worker "
        "that publishes. The default allows local folders only: list gs:// repositories explicitly, per team, "
        "e.g. [\"gs://models/team-a/*\"].",
    )
    step_signing_key: SecretStr | None = Field(
        default=None,
        description="Key (held by workers only) for the HMAC that every step manifest carries. Set: a manifest "
        "that does not verify is recomputed, never trusted. Unset: manifests are not authenticated.",
    )

    # Every load of a user's model runs in a sandbox (worker.sandbox): no network, a read-only
    # filesystem but its scratch folder, no worker secrets, and these limits.
    sandbox: Literal["bwrap", "off"] = Field(
        default="bwrap",
        description="bwrap: load untrusted models in a bubblewrap sandbox (a worker where it does not work fails "
        "those loads). off: load them in the worker process itself, an explicit operator opt-out that the worker "
        "logs at start and each convert manifest records.",
    )
    sandbox_memory_mb: int = Field(
        default=8192, ge=256, description="Memory one sandboxed process may allocate (RLIMIT_DATA), in MB."
    )
    sandbox_cpu_s: int = Field(
        default=1800, ge=1, description="CPU seconds (all threads) one sandboxed process may use (RLIMIT_CPU)."
    )
    sandbox_file_mb: int = Field(
        default=16384, ge=1, description="Largest file a sandboxed load may write (RLIMIT_FSIZE), in MB."
    )
    sandbox_procs: int = Field(
        default=512, ge=16,
        description="Processes and threads a sandbox may hold at once (RLIMIT_NPROC, counted per sandbox).",
    )
    sandbox_wall_s: int = Field(
        default=3000, ge=1, description="Wall-clock limit of one sandboxed load; the child is killed after it."
    )
    sandbox_warm: bool = Field(
        default=True, description="A worker process keeps its next sandbox started, the frameworks imported, "
        "waiting for its model (worker.sandbox.warm): seconds less per convert, about 0.5 GB held while idle.",
    )

    # Vertex AI (a job's deploy.vertex; modelyard promote / rollback of a version deployed there).
    vertex_api_endpoint: str | None = Field(
        default=None,
        description="Vertex AI API host. Unset: <region>-aiplatform.googleapis.com with Application Default "
        "Credentials. An http:// URL (a local fake of the API) is called without credentials.",
    )
    vertex_operation_timeout_s: float = Field(
        default=1800, gt=0, description="How long to wait for one Vertex AI operation (upload, deploy); past it "
        "the stage is retried and waits for the same operation again.",
    )
    vertex_triton_image: str = Field(
        default="{region}-docker.pkg.dev/{project}/modelyard/tritonserver:24.12-py3",
        description="Triton image for deploy.vertex serving 'triton' ({project} and {region} are the job's); "
        "Vertex AI needs it in Artifact Registry: push nvcr.io/nvidia/tritonserver there.",
    )
    vertex_serving_image: str = Field(
        default="{region}-docker.pkg.dev/{project}/modelyard/modelyard:0.1.0",
        description="modelyard's image for deploy.vertex serving 'modelyard' (runs 'modelyard serve --vertex').",
    )

    @model_validator(mode="after")
    def _limits_consistent(self) -> Settings:
        if self.stage_soft_time_limit_s >= self.stage_time_limit_s:
            raise ValueError("MODELYARD_STAGE_SOFT_TIME_LIMIT_S must be below MODELYARD_STAGE_TIME_LIMIT_S")
        if self.visibility_timeout_s <= self.stage_time_limit_s:
            raise ValueError(
                "MODELYARD_VISIBILITY_TIMEOUT_S must exceed MODELYARD_STAGE_TIME_LIMIT_S, "
                "or a running stage is delivered a second time"
            )
        return self

    @property
    def signing_key(self) -> bytes | None:
        return self.step_signing_key.get_secret_value().encode() if self.step_signing_key else None

    @property
    def home_dir(self) -> Path:
        return self.home.expanduser()

    @property
    def stack_file(self) -> Path:
        return self.home_dir / "stack.json"

    def local_stack(self) -> dict | None:
        try:
            return json.loads(self.stack_file.read_text())
        except (OSError, ValueError):
            return None

    def resolved_broker_url(self) -> str | None:
        if self.broker_url:
            return self.broker_url
        stack = self.local_stack()
        return stack.get("broker_url") if stack else None

    def resolved_artifact_store(self) -> str:
        if self.artifact_store:
            return self.artifact_store
        stack = self.local_stack()
        if stack and stack.get("artifact_store"):
            return stack["artifact_store"]
        return (self.home_dir / "artifacts").resolve().as_uri()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
