"""Retention and garbage collection of the artifact store: what ``modelyard gc`` runs.

**Mark.** An object is kept when it is reachable from a root:

- ``deployed``: every published version in the model repositories jobs deployed to (each deploy
  records its repository under ``repositories/`` in the artifact store; also the job records and
  ``--repository``) records its lineage: the
  step keys of its stages (compress, convert, every optimize variant) and the files the producer
  uploaded. Their step manifests and the files those list are kept for as long as the version exists;
- ``pinned``: a step pinned with ``modelyard gc --pin`` (a document ``pins/<step key>.json``);
- ``leased``: a step a worker computes now (its Redis lease ``modelyard:lease:<step key>``), and its
  compress checkpoint;
- ``active job``: a QUEUED or RUNNING job's uploads and the steps its stages reported, at any age;
- ``recent job``: the same for jobs younger than the retention (``--older-than``, default
  ``MODELYARD_JOB_RETENTION_DAYS``);
- ``checkpoint``: a compress checkpoint younger than the retention, and the files it lists;
- ``grace``: anything written or reused (``ArtifactStore.touch``) less than the grace period ago
  (``MODELYARD_GC_GRACE_S``): outputs a running step is uploading before its manifest, inputs a
  submitter uploaded before its job record.

**Sweep.** Everything else under ``steps/``, ``checkpoints/``, ``blobs/`` and ``uploads/`` is deleted,
manifests first (so a manifest never outlives its files), each object only if it is unchanged since
the listing (``ArtifactStore.delete_if_unchanged``: same generation on gs://, same modification time
on file://). Workers ``touch`` a blob they find already stored and a manifest they reuse, so an object
a stage starts using while the sweep runs is either kept or deleted before the stage looked, and then
computed again. Other prefixes (``pins/``, ``repositories/``, a model repository sharing the bucket) are never
touched.

Job records: a finished record that carries no TTL (written before ``MODELYARD_JOB_RETENTION_DAYS``
existed) is dropped once it ended more than the retention setting ago; index entries of records that
expired are pruned. Reading any root failing stops the run before anything is deleted.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from shared.errors import NotFound, UserInputError
from shared.jobs import PREFIX, QUEUED, RUNNING, TERMINAL, JobStore
from shared.manifest import manifest_key
from shared.pipeline import uploaded_files
from shared.repository import ModelRepository
from shared.storage import ArtifactStore, FileRef, StoredObject
from shared.storage.base import blob_key

SWEPT = ("steps/", "checkpoints/", "blobs/", "uploads/")  # in sweep order: documents before the files they list
PINS = "pins/"
REPOSITORIES = "repositories/"
LEASE_PREFIX = "modelyard:lease:"
STEP_KEY = re.compile(r"^[0-9a-f]{64}$")

DEPLOYED, PINNED, LEASED, ACTIVE_JOB, RECENT_JOB, CHECKPOINT, GRACE, CHANGED = (
    "deployed", "pinned", "leased", "active job", "recent job", "checkpoint", "grace", "changed during sweep")
REASONS = (DEPLOYED, PINNED, LEASED, ACTIVE_JOB, RECENT_JOB, CHECKPOINT, GRACE, CHANGED)  # first one wins

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, option: str = "duration") -> float:
    """Seconds in '30d', '12h', '90m', '45s' or '2w'; UserInputError naming the option otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not match:
        raise UserInputError(f"{option}: {text!r} is not a duration (a number and a unit: 30d, 12h, 90m, 45s, 2w)")
    return float(match.group(1)) * _UNITS[match.group(2)]


# -- pins -------------------------------------------------------------------------------
def pin_key(step: str) -> str:
    return f"{PINS}{step}.json"


def resolve_step(store: ArtifactStore, ref: str) -> str:
    """The full step key a key or a unique prefix (8+ hex digits) of a stored step manifest names."""
    ref = ref.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{8,64}", ref):
        raise UserInputError(f"--pin/--unpin: {ref!r} is not a step key (64 hex digits, or a prefix of 8 or more)")
    found = [k[len("steps/"):-len(".json")] for k in store.list(f"steps/{ref}") if k.endswith(".json")]
    if len(found) != 1:
        what = "no stored step" if not found else f"{len(found)} stored steps"
        raise UserInputError(f"--pin/--unpin: {ref!r} matches {what} in {store.uri}")
    return found[0]


def pin(store: ArtifactStore, step: str, *, note: str = "") -> None:
    store.write_json(pin_key(step), {"step_key": step, "note": note, "at": time.time()})


def unpin(store: ArtifactStore, step: str) -> bool:
    if not store.exists(pin_key(step)):
        return False
    store.delete(pin_key(step))
    return True


def pins(store: ArtifactStore) -> list[str]:
    keys = (k[len(PINS):-len(".json")] for k in store.list(PINS) if k.endswith(".json"))
    return sorted(k for k in keys if STEP_KEY.match(k))


# -- repositories deployed to ---------------------------------------------------------------
def remember_repository(store: ArtifactStore, uri: str) -> None:
    """Record in the artifact store that a job deployed to the repository at uri (the deploy stage calls it)."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:32]
    store.write_json(f"{REPOSITORIES}{digest}.json", {"uri": uri})


def known_repositories(store: ArtifactStore) -> list[str]:
    uris = set()
    for key in store.list(REPOSITORIES):
        document = store.read_json_or_none(key)
        if isinstance(document, dict) and isinstance(document.get("uri"), str):
            uris.add(document["uri"])
    return sorted(uris)


# -- the report ---------------------------------------------------------------------------
@dataclass
class Tally:
    objects: int = 0
    bytes: int = 0

    def add(self, size: int) -> None:
        self.objects += 1
        self.bytes += size


@dataclass
class GcReport:
    store: str
    dry_run: bool
    older_than_s: float
    grace_s: float
    scanned: Tally = field(default_factory=Tally)
    kept: dict[str, Tally] = field(default_factory=dict)
    deleted: Tally = field(default_factory=Tally)  # what a dry run would delete
    repositories: list[str] = field(default_factory=list)
    deployed_versions: int = 0
    pinned_steps: list[str] = field(default_factory=list)
    leased_steps: int = 0
    jobs_kept: int = 0
    job_records_dropped: int = 0
    index_entries_pruned: int = 0
    deleted_keys: list[str] = field(default_factory=list)

    def keep(self, reason: str, size: int) -> None:
        self.kept.setdefault(reason, Tally()).add(size)

    def to_dict(self) -> dict:
        return {
            "store": self.store, "dry_run": self.dry_run, "older_than_s": self.older_than_s, "grace_s": self.grace_s,
            "scanned": vars(self.scanned),
            "kept": {reason: vars(self.kept[reason]) for reason in REASONS if reason in self.kept},
            "deleted" if not self.dry_run else "would_delete": vars(self.deleted),
            "repositories": self.repositories, "deployed_versions": self.deployed_versions,
            "pinned_steps": self.pinned_steps, "leased_steps": self.leased_steps,
            "jobs": {"kept": self.jobs_kept, "records_dropped": self.job_records_dropped,
                     "index_entries_pruned": self.index_entries_pruned},
        }


# -- mark ---------------------------------------------------------------------------------
@dataclass
class Marks:
    """Object key → the reason it is kept (the first in ``REASONS`` order wins)."""

    store: ArtifactStore
    reasons: dict[str, str] = field(default_factory=dict)
    _steps: dict[str, str] = field(default_factory=dict)

    def object(self, key: str, reason: str) -> None:
        current = self.reasons.get(key)
        if current is None or REASONS.index(reason) < REASONS.index(current):
            self.reasons[key] = reason

    def files(self, refs: Iterable[dict], reason: str) -> None:
        for data in refs:
            try:
                ref = FileRef.from_dict(data)
            except (KeyError, TypeError, ValueError, UserInputError):
                continue  # a malformed reference keeps nothing; it protects nothing either
            self.object(blob_key(ref.digest, ref.area), reason)

    def step(self, key: str, reason: str) -> None:
        """Keep a step's manifest and every file it lists (read once per step)."""
        if not isinstance(key, str) or not STEP_KEY.match(key):
            return
        current = self._steps.get(key)
        if current is not None and REASONS.index(current) <= REASONS.index(reason):
            return
        self._steps[key] = reason
        self.object(manifest_key(key), reason)
        manifest = self.store.read_json_or_none(manifest_key(key))
        if isinstance(manifest, dict):
            self.files(manifest.get("files") or [], reason)

    def checkpoint(self, key: str, reason: str) -> None:
        self.object(key, reason)
        record = self.store.read_json_or_none(key)
        if isinstance(record, dict):
            self.files(record.get("files") or [], reason)


def _mark_jobs(marks: Marks, jobs: JobStore, report: GcReport, *, now: float, cutoff: float,
               record_retention_s: float, dry_run: bool) -> set[str]:
    """Mark active and recent jobs; drop old records without a TTL; the repositories jobs deployed to."""
    repositories: set[str] = set()
    for job_id in jobs.all_ids():
        job = jobs.get(job_id)
        if job is None:  # the record expired; its index entry stayed
            report.index_entries_pruned += 1
            if not dry_run:
                jobs.delete(job_id)
            continue
        spec_deploy = (job.get("spec") or {}).get("deploy") or {}
        for uri in (spec_deploy.get("repository"), job["stages"].get("deploy", {}).get("repository")):
            if uri:
                repositories.add(uri)
        state = job.get("state")
        last = max(job.get("finished") or 0.0, job.get("updated") or 0.0, job.get("created") or 0.0)
        if state in (QUEUED, RUNNING):
            reason = ACTIVE_JOB
        elif last >= cutoff:
            reason = RECENT_JOB
        else:
            if state in TERMINAL and last < now - record_retention_s and jobs.redis.ttl(PREFIX + job_id) == -1:
                report.job_records_dropped += 1
                if not dry_run:
                    jobs.delete(job_id)
            continue
        report.jobs_kept += 1
        marks.files(uploaded_files(job), reason)
        for stage in job["stages"].values():
            marks.step(stage.get("step_key"), reason)
            marks.files(stage.get("files") or [], reason)
    return repositories


def _open_repository(uri: str) -> ModelRepository | None:
    """The repository at uri; None for a local folder that no longer exists (opening would create it)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") and not Path(unquote(parsed.path)).is_dir():
        return None
    return ModelRepository.open(uri)


def _mark_deployed(marks: Marks, repositories: Iterable[str], report: GcReport) -> None:
    for uri in sorted(set(repositories)):
        repository = _open_repository(uri)
        if repository is None:
            continue
        report.repositories.append(repository.uri)
        for model in repository.models():
            for version in repository.versions(model):
                try:
                    lineage = repository.manifest(model, version).get("lineage") or {}
                except UserInputError:  # deleted since it was listed
                    continue
                report.deployed_versions += 1
                marks.files(lineage.get("uploads") or [], DEPLOYED)
                for stage in (lineage.get("stages") or {}).values():
                    if isinstance(stage, dict):
                        marks.step(stage.get("step_key"), DEPLOYED)


def _leased_steps(jobs: JobStore) -> list[str]:
    keys = (k.decode()[len(LEASE_PREFIX):] for k in jobs.redis.scan_iter(match=LEASE_PREFIX + "*", count=1000))
    return sorted(k for k in keys if STEP_KEY.match(k))


# -- sweep --------------------------------------------------------------------------------
def collect(store: ArtifactStore, jobs: JobStore, *, older_than_s: float, grace_s: float,
            record_retention_s: float, repositories: Iterable[str] = (), extra_pins: Iterable[str] = (),
            ignored_pins: Iterable[str] = (), dry_run: bool = False, now: float | None = None) -> GcReport:
    """Mark, then sweep (unless ``dry_run``) the artifact store; returns what was kept and deleted.

    ``extra_pins`` count as pinned and ``ignored_pins`` as not pinned for this run only (what a dry
    run of ``--pin`` / ``--unpin`` previews); ``repositories`` adds model repositories to the roots.
    """
    now = time.time() if now is None else now
    cutoff = now - older_than_s
    report = GcReport(store=store.uri, dry_run=dry_run, older_than_s=older_than_s, grace_s=grace_s)
    # List first: an object written after this listing is never a candidate.
    listed = {prefix: list(store.list_objects(prefix)) for prefix in SWEPT}

    marks = Marks(store)
    report.pinned_steps = sorted((set(pins(store)) | set(extra_pins)) - set(ignored_pins))
    for step in report.pinned_steps:
        marks.step(step, PINNED)
    leased = _leased_steps(jobs)
    report.leased_steps = len(leased)
    for step in leased:
        marks.step(step, LEASED)
        marks.checkpoint(f"checkpoints/{step}.json", LEASED)
    deployed_to = _mark_jobs(marks, jobs, report, now=now, cutoff=cutoff, record_retention_s=record_retention_s,
                             dry_run=dry_run)
    _mark_deployed(marks, {*deployed_to, *known_repositories(store), *repositories}, report)
    for seen in listed["checkpoints/"]:
        if seen.updated >= cutoff:
            marks.checkpoint(seen.key, CHECKPOINT)

    for prefix in SWEPT:
        for seen in listed[prefix]:
            report.scanned.add(seen.size)
            reason = marks.reasons.get(seen.key) or (GRACE if seen.updated > now - grace_s else None)
            if reason is not None:
                report.keep(reason, seen.size)
            elif dry_run or store.delete_if_unchanged(seen):
                report.deleted.add(seen.size)
                report.deleted_keys.append(seen.key)
            else:
                report.keep(CHANGED, seen.size)
                if prefix in ("steps/", "checkpoints/"):  # reused meanwhile: so are the files it lists
                    _keep_changed_document(marks, seen)
    return report


def _keep_changed_document(marks: Marks, seen: StoredObject) -> None:
    try:
        document = marks.store.read_json(seen.key)
    except (NotFound, ValueError):
        return
    if isinstance(document, dict):
        marks.files(document.get("files") or [], CHANGED)
