"""What a stage needs from its surroundings: settings, the artifact store, the job record."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from functools import cached_property

from shared.jobs import CANCELLED, JobStore
from shared.jobspec import JobSpec
from shared.settings import Settings
from shared.storage import ArtifactStore, FileRef, open_store
from worker import metrics


class JobCancelled(Exception):
    """The job was cancelled: the stage stops and nothing after it runs."""


@dataclass
class StageContext:
    settings: Settings
    jobs: JobStore
    job_id: str
    worker: str = field(default_factory=socket.gethostname)
    queue: str = "cpu"

    @cached_property
    def record(self) -> dict:
        record = self.jobs.get(self.job_id)
        if record is None:
            raise JobCancelled(f"job {self.job_id} no longer exists")
        return record

    @cached_property
    def spec(self) -> JobSpec:
        return JobSpec.model_validate(self.record["spec"])

    @cached_property
    def store(self) -> ArtifactStore:
        return metrics.instrument_store(open_store(self.record["artifact_store"]))

    @property
    def source_files(self) -> list[FileRef]:
        return [FileRef.from_dict(f) for f in self.record["source"]["files"]]

    def check_not_cancelled(self) -> None:
        if self.jobs.state(self.job_id) in (CANCELLED, None):
            raise JobCancelled(f"job {self.job_id} was cancelled")
