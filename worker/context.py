"""What a stage needs from its surroundings: settings, the artifact store, the job record."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from functools import cached_property

from shared.jobs import CANCELLED, JobStore
from shared.jobspec import JobSpec
from shared.manifest import Manifest, load_manifest, save_manifest
from shared.settings import Settings
from shared.storage import ArtifactStore, FileRef, open_store
from worker import metrics
from worker.plugins.catalog import check_job


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
        return check_job(JobSpec.model_validate(self.record["spec"]), origin=f"job {self.job_id}")

    @cached_property
    def store(self) -> ArtifactStore:
        """The job's artifact store, its transfers counted in the worker's metrics."""
        store = open_store(self.record["artifact_store"])
        store.on_transfer = metrics.bytes_moved
        return store

    def load_manifest(self, key: str) -> Manifest | None:
        """A step's manifest, if one exists that a worker provably wrote (see shared.manifest)."""
        return load_manifest(self.store, key, signing_key=self.settings.signing_key)

    def save_manifest(self, manifest: Manifest) -> None:
        save_manifest(self.store, manifest, signing_key=self.settings.signing_key)

    @property
    def source_files(self) -> list[FileRef]:
        return [FileRef.from_dict(f) for f in self.record["source"]["files"]]

    def check_not_cancelled(self) -> None:
        if self.jobs.state(self.job_id) in (CANCELLED, None):
            raise JobCancelled(f"job {self.job_id} was cancelled")
