"""Step manifests: the record a completed step leaves in the artifact store.

A step is identified by its *step key*: the hash of its input digest, stage name, params
and the versions of the tools that ran it. Same key, same result: a worker that finds the
manifest for a key returns it instead of recomputing. The manifest is written last, so its
presence means every output it lists is already stored.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from shared.storage import ArtifactStore, FileRef

MANIFEST_VERSION = 1


def step_key(*, stage: str, input_digest: str, params: dict[str, Any], tools: dict[str, str]) -> str:
    payload = json.dumps(
        {"v": MANIFEST_VERSION, "stage": stage, "input": input_digest, "params": params, "tools": tools},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def manifest_key(key: str) -> str:
    return f"steps/{key}.json"


@dataclass
class Manifest:
    step_key: str
    stage: str
    input_digest: str
    params: dict[str, Any]
    tools: dict[str, str]
    files: list[FileRef]
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # model io, lineage, ...
    job_id: str = ""
    worker: str = field(default_factory=socket.gethostname)
    created: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return {
            "step_key": self.step_key,
            "stage": self.stage,
            "input_digest": self.input_digest,
            "params": self.params,
            "tools": self.tools,
            "files": [f.to_dict() for f in self.files],
            "metrics": self.metrics,
            "info": self.info,
            "job_id": self.job_id,
            "worker": self.worker,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        return cls(
            step_key=data["step_key"],
            stage=data["stage"],
            input_digest=data["input_digest"],
            params=data["params"],
            tools=data["tools"],
            files=[FileRef.from_dict(f) for f in data["files"]],
            metrics=data.get("metrics", {}),
            info=data.get("info", {}),
            job_id=data.get("job_id", ""),
            worker=data.get("worker", ""),
            created=data.get("created", 0.0),
        )

    def file(self, path: str) -> FileRef:
        for ref in self.files:
            if ref.path == path:
                return ref
        raise KeyError(f"manifest {self.step_key} has no file {path!r}")

    @property
    def output_digest(self) -> str:
        from shared.storage import digest_of_files

        return digest_of_files(self.files)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def load_manifest(store: ArtifactStore, key: str) -> Manifest | None:
    data = store.read_json_or_none(manifest_key(key))
    return Manifest.from_dict(data) if data else None


def save_manifest(store: ArtifactStore, manifest: Manifest) -> None:
    store.write_json(manifest_key(manifest.step_key), manifest.to_dict())
