"""Settings shared by the producer and the workers, read from ``MODELYARD_*`` environment variables.

When no broker URL is configured, the producer and workers use the local stack that
``modelyard up`` started: it records its URLs in ``$MODELYARD_HOME/stack.json``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

STAGES = ("convert", "optimize", "deploy")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELYARD_", extra="ignore")

    home: Path = Field(default=Path("~/.modelyard"), description="State folder of the local stack.")
    broker_url: str | None = Field(
        default=None,
        description="Redis URL (redis://, rediss://, redis+socket://). Unset: the local stack's.",
    )
    artifact_store: str | None = Field(
        default=None, description="file:///path or gs://bucket/prefix. Unset: $MODELYARD_HOME/artifacts."
    )
    gcs_project: str = "modelyard"

    stage_time_limit_s: int = Field(default=3600, ge=10, description="Hard time limit of one stage.")
    stage_soft_time_limit_s: int = Field(default=3300, ge=5, description="Soft limit: the stage is told to stop.")
    visibility_timeout_s: int = Field(
        default=4000, description="Redis redelivery timeout for unacknowledged messages; above the hard limit."
    )
    max_retries: int = Field(default=5, ge=0, description="Retries of a transient failure.")
    task_events: bool = Field(
        default=False,
        description="Workers send task events from the start. Off by default: publishing them took about 40% "
        "of a worker main process's CPU per message, and Flower turns them on by itself (enable_events every "
        "5 s) while it runs.",
    )
    lease_ttl_s: int = Field(default=60, ge=5, description="Lifetime of a step lease between renewals.")

    bench_threads: int = Field(default=2, ge=1, description="Intra-op threads when measuring latency.")
    bench_runs: int = Field(default=20, ge=3, description="Timed runs per latency measurement.")
    bench_warmup: int = Field(default=3, ge=0)

    allowed_factories: list[str] = Field(
        default_factory=lambda: ["torchvision.models:*"],
        description="module:callable patterns a torch-state-dict job may name as its factory.",
    )
    max_archive_bytes: int = Field(default=8 * 2**30, description="Cap on the unpacked size of an archive.")

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
