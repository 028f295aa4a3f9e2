"""Mark and sweep of the artifact store (shared.gc) on each backend, against a private Redis.

Ages are simulated with ``collect(now=...)``: a sweep "two hours later" sees everything the test
wrote as two hours old, on file:// and on the GCS emulator alike.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from shared import gc
from shared.errors import UserInputError
from shared.jobs import PREFIX, SUCCEEDED, JobStore
from shared.manifest import Manifest, manifest_key, save_manifest
from shared.repository import ModelRepository
from shared.storage import UPLOADS, ArtifactStore, FileRef
from shared.storage.base import blob_key
from tests.storage_fixtures import gcs_emulator, store  # noqa: F401  (fixtures)

DB = 11  # a database of the session's Redis that only this module uses
HOUR, DAY = 3600.0, 86400.0
LATER = 2 * HOUR  # the sweep runs this much after the test wrote its objects


@pytest.fixture
def jobs(redis_server):
    jobs = JobStore.from_url(redis_server.url.rsplit("/", 1)[0] + f"/{DB}", retention_s=30 * DAY)
    jobs.redis.flushdb()
    yield jobs
    jobs.redis.flushdb()


def sweep(store: ArtifactStore, jobs: JobStore, *, later: float = LATER, grace_s: float = HOUR,
          older_than_s: float = 30 * DAY, **options) -> gc.GcReport:
    return gc.collect(store, jobs, older_than_s=older_than_s, grace_s=grace_s, record_retention_s=30 * DAY,
                      now=time.time() + later, **options)


def make_step(store: ArtifactStore, tmp_path: Path, name: str, *, shared: bytes = b"") -> Manifest:
    """A step manifest listing one file of its own (and, optionally, a file with the given bytes)."""
    folder = tmp_path / f"step-{name}"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(f"model {name}".encode())
    if shared:
        (folder / "samples.npz").write_bytes(shared)
    key = (name.encode().hex() * 64)[:64]
    manifest = Manifest(step_key=key, stage="convert", input_digest="i", params={}, tools={},
                        files=store.put_dir(folder))
    save_manifest(store, manifest)
    return manifest


def upload(store: ArtifactStore, tmp_path: Path, name: str) -> FileRef:
    path = tmp_path / f"upload-{name}.onnx"
    path.write_bytes(f"source {name}".encode())
    return store.put_file(path, area=UPLOADS)


def present(store: ArtifactStore, manifest: Manifest) -> bool:
    keys = [manifest_key(manifest.step_key), *(blob_key(f.digest, f.area) for f in manifest.files)]
    return all(store.exists(k) for k in keys)


def gone(store: ArtifactStore, manifest: Manifest, own_file: str = "model.onnx") -> bool:
    ref = manifest.file(own_file)
    return not store.exists(manifest_key(manifest.step_key)) and not store.exists(blob_key(ref.digest, ref.area))


def record_job(jobs: JobStore, job_id: str, *, steps: list[Manifest], source: FileRef, state: str = SUCCEEDED,
               age_s: float = 0.0, deploy_to: str | None = None) -> None:
    spec = {"model": {"name": "m"}, **({"deploy": {"repository": deploy_to}} if deploy_to else {})}
    jobs.create(job_id, {"spec": spec, "source": {"files": [source.to_dict()], "digest": "d"}})
    for index, step in enumerate(steps):
        jobs.update_stage(job_id, f"stage{index}", step_key=step.step_key, files=[f.to_dict() for f in step.files])
    jobs.set_state(job_id, state)
    if age_s:
        then = repr(time.time() - age_s)
        jobs.redis.hset(PREFIX + job_id, mapping={"created": then, "updated": then, "finished": then})


def deploy_version(tmp_path: Path, steps: list[Manifest], uploads: list[FileRef]) -> str:
    repo_dir = tmp_path / "repo"
    (repo_dir / "m" / "1").mkdir(parents=True)
    lineage = {"stages": {f"stage{i}": {"step_key": s.step_key} for i, s in enumerate(steps)},
               "uploads": [u.to_dict() for u in uploads]}
    (repo_dir / "m" / "1" / "manifest.json").write_text(json.dumps({"model": "m", "version": 1, "lineage": lineage}))
    return repo_dir.as_uri()


def test_an_old_unreferenced_step_is_deleted_and_a_deployed_versions_lineage_is_kept(store, jobs, tmp_path):
    deployed = make_step(store, tmp_path, "a", shared=b"same samples")
    orphan = make_step(store, tmp_path, "b", shared=b"same samples")
    source = upload(store, tmp_path, "a")
    old_source = upload(store, tmp_path, "b")
    gc.remember_repository(store, deploy_version(tmp_path, [deployed], [source]))

    report = sweep(store, jobs)

    assert present(store, deployed) and store.exists(blob_key(source.digest, UPLOADS))
    assert gone(store, orphan)
    assert store.exists(blob_key(orphan.file("samples.npz").digest))  # the blob the deployed step shares
    assert not store.exists(blob_key(old_source.digest, UPLOADS))
    assert report.deployed_versions == 1
    assert report.kept[gc.DEPLOYED].objects == 4  # manifest, model, samples, source
    assert report.deleted.objects == 3  # manifest, model, old source
    assert report.deleted.bytes == sum(len(f"{kind} b".encode()) for kind in ("model", "source")) + \
        len(json.dumps(orphan.to_dict(), indent=1, sort_keys=True).encode())


def test_a_dry_run_deletes_nothing_and_reports_what_a_run_deletes(store, jobs, tmp_path):
    make_step(store, tmp_path, "a")
    upload(store, tmp_path, "a")
    before = store.list("")

    preview = sweep(store, jobs, dry_run=True)

    assert store.list("") == before
    assert preview.to_dict()["would_delete"] == {"objects": 3, "bytes": preview.deleted.bytes}
    real = sweep(store, jobs)
    assert sorted(real.deleted_keys) == sorted(preview.deleted_keys)
    assert real.deleted.bytes == preview.deleted.bytes > 0


def test_objects_younger_than_the_grace_period_are_kept(store, jobs, tmp_path):
    step = make_step(store, tmp_path, "a")

    report = sweep(store, jobs, grace_s=3 * HOUR)

    assert present(store, step)
    assert report.kept[gc.GRACE].objects == 2 and report.deleted.objects == 0


def test_a_step_under_a_live_lease_is_kept(store, jobs, tmp_path):
    leased = make_step(store, tmp_path, "a")
    other = make_step(store, tmp_path, "b")
    lock = jobs.redis.lock(f"modelyard:lease:{leased.step_key}", timeout=60)  # as worker.stages.steps takes it
    assert lock.acquire(blocking=False)
    try:
        report = sweep(store, jobs)
    finally:
        lock.release()

    assert present(store, leased) and gone(store, other)
    assert report.leased_steps == 1 and report.kept[gc.LEASED].objects == 2


def test_a_running_job_keeps_its_inputs_at_any_age_and_an_old_finished_job_does_not(store, jobs, tmp_path):
    running, finished = make_step(store, tmp_path, "a"), make_step(store, tmp_path, "b")
    running_source, finished_source = upload(store, tmp_path, "a"), upload(store, tmp_path, "b")
    record_job(jobs, "running", steps=[running], source=running_source, state="RUNNING", age_s=90 * DAY)
    record_job(jobs, "finished", steps=[finished], source=finished_source, age_s=40 * DAY)

    report = sweep(store, jobs)

    assert present(store, running) and store.exists(blob_key(running_source.digest, UPLOADS))
    assert gone(store, finished) and not store.exists(blob_key(finished_source.digest, UPLOADS))
    assert report.kept[gc.ACTIVE_JOB].objects == 3


def test_a_job_younger_than_the_retention_keeps_its_steps_until_it_is_older(store, jobs, tmp_path):
    step = make_step(store, tmp_path, "a")
    record_job(jobs, "j", steps=[step], source=upload(store, tmp_path, "a"), age_s=10 * DAY)

    kept = sweep(store, jobs, older_than_s=30 * DAY)
    assert present(store, step) and kept.kept[gc.RECENT_JOB].objects == 3

    sweep(store, jobs, older_than_s=7 * DAY)
    assert gone(store, step)


def test_a_pinned_step_is_kept_until_it_is_unpinned(store, jobs, tmp_path):
    step = make_step(store, tmp_path, "a")
    gc.pin(store, gc.resolve_step(store, step.step_key[:10]), note="audit")

    report = sweep(store, jobs)
    assert present(store, step) and report.pinned_steps == [step.step_key]

    assert gc.unpin(store, step.step_key)
    sweep(store, jobs)
    assert gone(store, step)


def test_a_pin_preview_keeps_the_step_without_writing_a_pin(store, jobs, tmp_path):
    step = make_step(store, tmp_path, "a")

    report = sweep(store, jobs, dry_run=True, extra_pins=[step.step_key])

    assert report.kept[gc.PINNED].objects == 2 and report.deleted.objects == 0
    assert gc.pins(store) == []


def test_resolving_a_prefix_that_names_no_stored_step_is_refused(store, tmp_path):
    make_step(store, tmp_path, "a")
    with pytest.raises(UserInputError, match="matches no stored step"):
        gc.resolve_step(store, "0123456789abcdef")


def test_a_recent_compress_checkpoint_keeps_its_files_and_an_old_one_goes(store, jobs, tmp_path):
    path = tmp_path / "student.safetensors"
    path.write_bytes(b"weights")
    ref = store.put_file(path)
    store.write_json("checkpoints/" + "c" * 64 + ".json", {"files": [ref.to_dict()]})

    sweep(store, jobs, older_than_s=30 * DAY)
    assert store.exists(blob_key(ref.digest))

    sweep(store, jobs, older_than_s=HOUR)
    assert not store.exists(blob_key(ref.digest)) and store.list("checkpoints/") == []


def test_put_file_of_a_stored_blob_marks_it_as_just_used(store, tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"content")
    ref = store.put_file(path)
    [before] = store.list_objects(blob_key(ref.digest))
    time.sleep(0.01)  # file:// compares modification times in ns; this only makes them differ

    store.put_file(path)

    [after] = store.list_objects(blob_key(ref.digest))
    assert (after.updated, after.generation, after.metageneration) != (before.updated, before.generation,
                                                                         before.metageneration)
    assert after.updated >= before.updated


def test_a_blob_reused_after_the_listing_is_not_deleted(tmp_path):
    from shared.storage import open_store

    store = open_store((tmp_path / "store").as_uri())
    path = tmp_path / "blob"
    path.write_bytes(b"content")
    ref = store.put_file(path)
    [seen] = store.list_objects(blob_key(ref.digest))
    time.sleep(0.01)

    store.put_file(path)  # a step finds the blob stored and will reference it

    assert store.delete_if_unchanged(seen) is False
    assert store.exists(blob_key(ref.digest))
    [now] = store.list_objects(blob_key(ref.digest))
    assert store.delete_if_unchanged(now) is True and not store.exists(blob_key(ref.digest))


def test_a_gcs_delete_is_conditional_on_the_generation_and_metageneration_listed(gcs_emulator, monkeypatch):
    from google.cloud.storage import Blob

    from shared.storage import open_store
    from tests.storage_fixtures import unique_bucket

    store = open_store(f"gs://{unique_bucket()}/prefix")
    store.write_json("steps/x.json", {"a": 1})
    [seen] = store.list_objects("steps/")
    calls = []
    real_delete = Blob.delete

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        return real_delete(self, *args, **kwargs)

    monkeypatch.setattr(Blob, "delete", spy)
    assert store.delete_if_unchanged(seen) is True
    assert calls == [{"if_generation_match": seen.generation, "if_metageneration_match": seen.metageneration}]
    assert seen.generation > 0 and not store.exists("steps/x.json")


def test_a_finished_record_gets_the_retention_as_ttl(jobs):
    jobs.create("j", {"spec": {}})
    assert jobs.redis.ttl(PREFIX + "j") == -1

    jobs.set_state("j", SUCCEEDED)

    assert 29 * DAY < jobs.redis.ttl(PREFIX + "j") <= 30 * DAY


def test_an_old_finished_record_without_ttl_is_dropped_and_a_recent_one_stays(store, jobs, tmp_path):
    source = upload(store, tmp_path, "a")
    record_job(jobs, "old", steps=[], source=source, age_s=40 * DAY)
    record_job(jobs, "recent", steps=[], source=source, age_s=DAY)
    jobs.redis.persist(PREFIX + "old")  # a record written before finished records had a TTL

    preview = sweep(store, jobs, dry_run=True)
    assert preview.job_records_dropped == 1 and jobs.exists("old")

    report = sweep(store, jobs)
    assert report.job_records_dropped == 1
    assert not jobs.exists("old") and jobs.exists("recent") and jobs.all_ids() == ["recent"]


def test_the_index_entry_of_an_expired_record_is_pruned(jobs, store):
    jobs.create("gone", {"spec": {}})
    jobs.redis.delete(PREFIX + "gone")  # as when its TTL ran out

    report = sweep(store, jobs)

    assert report.index_entries_pruned == 1 and jobs.all_ids() == []


@pytest.mark.parametrize("text, seconds", [("30d", 30 * DAY), ("12h", 12 * HOUR), ("90m", 5400), ("2w", 14 * DAY)])
def test_durations_read_with_their_unit(text, seconds):
    assert gc.parse_duration(text) == seconds


def test_a_duration_without_a_unit_is_refused_naming_the_option():
    with pytest.raises(UserInputError, match="--older-than: '30' is not a duration"):
        gc.parse_duration("30", "--older-than")


def test_a_repository_folder_that_no_longer_exists_is_not_created(store, jobs, tmp_path):
    gc.remember_repository(store, (tmp_path / "removed-repo").as_uri())

    sweep(store, jobs)

    assert not (tmp_path / "removed-repo").exists()


def test_a_deployed_repository_read_through_the_model_repository_api(store, jobs, tmp_path):
    step = make_step(store, tmp_path, "a")
    repo_uri = deploy_version(tmp_path, [step], [])
    assert ModelRepository.open(repo_uri).versions("m") == [1]

    report = sweep(store, jobs, repositories=[repo_uri])

    assert present(store, step) and report.repositories == [repo_uri]


def test_the_cli_refuses_a_duration_without_a_unit_with_exit_2_before_connecting(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from producer.cli import app
    from shared.settings import get_settings

    monkeypatch.setenv("MODELYARD_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens: never reached
    monkeypatch.setenv("MODELYARD_ARTIFACT_STORE", (tmp_path / "artifacts").as_uri())
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["gc", "--older-than", "30"])
    finally:
        get_settings.cache_clear()

    assert result.exit_code == 2
    assert "--older-than: '30' is not a duration" in result.output and "Traceback" not in result.output
