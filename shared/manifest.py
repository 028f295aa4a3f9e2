"""Step manifests: the record a completed step leaves in the artifact store.

A step is identified by its *step key*: the hash of its input digest, stage name, params
and the versions of the tools that ran it. Same key, same result: a worker that finds the
manifest for a key returns it instead of recomputing. The manifest is written last, so its
presence means every output it lists is already stored.

Every submitter can write to the artifact store, so a manifest is only trusted when it proves a
worker wrote it: with ``MODELYARD_STEP_SIGNING_KEY`` set (a key the workers hold, the producer
does not), ``save_manifest`` adds an HMAC-SHA256 of the manifest's canonical JSON and
``load_manifest`` treats a manifest whose HMAC does not verify, or that is stored under another
step's key, as absent: the step is computed again and its manifest overwritten.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from shared.storage import ArtifactStore, FileRef

MANIFEST_VERSION = 1
SIGNATURE = "signature"
log = logging.getLogger("modelyard.manifest")


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


def _canonical(data: dict) -> bytes:
    body = {k: v for k, v in data.items() if k != SIGNATURE}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def sign(data: dict, signing_key: bytes) -> str:
    return hmac.new(signing_key, _canonical(data), hashlib.sha256).hexdigest()


def load_manifest(store: ArtifactStore, key: str, *, signing_key: bytes | None = None) -> Manifest | None:
    """The manifest of step ``key``, or None when there is none that can be trusted."""
    data = store.read_json_or_none(manifest_key(key))
    if not data:
        return None
    if not isinstance(data, dict) or data.get("step_key") != key:
        log.warning("step manifest %s names another step: not trusted, the step is computed again", key[:12])
        return None
    if signing_key is not None:
        signature = data.get(SIGNATURE)
        if not isinstance(signature, str) or not hmac.compare_digest(signature, sign(data, signing_key)):
            log.warning("step manifest %s does not verify against MODELYARD_STEP_SIGNING_KEY: not trusted, "
                        "the step is computed again", key[:12])
            return None
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError):
        log.warning("step manifest %s is malformed: the step is computed again", key[:12])
        return None


def save_manifest(store: ArtifactStore, manifest: Manifest, *, signing_key: bytes | None = None) -> None:
    data = manifest.to_dict()
    if signing_key is not None:
        data[SIGNATURE] = sign(data, signing_key)
    store.write_json(manifest_key(manifest.step_key), data)
