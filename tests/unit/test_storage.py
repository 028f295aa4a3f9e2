"""Artifact store contract, run on every backend (file:// and gs:// through the GCS emulator),
plus gs://-only checks of what the emulator cannot show (it does not enforce preconditions)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import google.auth.exceptions as auth_exceptions
import google_crc32c
import pytest
import requests
import urllib3
from google.api_core import exceptions as api_exceptions
from google.cloud.storage import Blob

from shared.errors import IntegrityError, NotFound, PreconditionFailed, TransientError, UserInputError
from shared.storage import UPLOADS, FileRef, open_store
from shared.storage.base import blob_key
from tests.storage_fixtures import gcs_emulator, store, unique_bucket  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(120)

MiB = 2**20
REPO_ROOT = Path(__file__).resolve().parents[2]


def write_random_file(path: Path, size: int, chunk: int = MiB) -> str:
    """Write size random bytes in chunks (never all in memory); returns their sha256."""
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        remaining = size
        while remaining:
            block = os.urandom(min(chunk, remaining))
            digest.update(block)
            handle.write(block)
            remaining -= len(block)
    return digest.hexdigest()


def ref_for(data: bytes, path: str = "file.bin") -> FileRef:
    return FileRef(path=path, digest=hashlib.sha256(data).hexdigest(), size=len(data))


def is_gcs(store) -> bool:
    return store.uri.startswith("gs://")


@pytest.fixture
def gcs_store(gcs_emulator):
    return open_store(f"gs://{unique_bucket()}/prefix")


# -- blobs ------------------------------------------------------------------------------


def test_put_file_then_get_file_returns_identical_bytes(store, tmp_path):
    source = tmp_path / "in" / "weights.bin"
    source.parent.mkdir()
    source.write_bytes(b"\x00\x01model bytes\xff" * 1000)

    ref = store.put_file(source)
    out = store.get_file(ref, tmp_path / "out" / "weights.bin")

    assert ref.size == source.stat().st_size
    assert out.read_bytes() == source.read_bytes()


def test_put_file_twice_with_same_content_uploads_one_blob(store, tmp_path):
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    first.write_bytes(b"same content")
    second.write_bytes(b"same content")

    with mock.patch.object(store, "_upload", wraps=store._upload) as upload:
        ref_a = store.put_file(first)
        ref_b = store.put_file(second)

    assert ref_a.digest == ref_b.digest
    assert upload.call_count == 1
    assert store.list("blobs/") == [blob_key(ref_a.digest)]


def test_a_producer_upload_lives_under_uploads_and_round_trips_by_its_ref(store, tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes(b"a submitted model")
    ref = store.put_file(source, area=UPLOADS)
    assert store.list("uploads/") == [blob_key(ref.digest, UPLOADS)] and store.list("blobs/") == []
    again = FileRef.from_dict(ref.to_dict())
    assert again == ref and again.area == UPLOADS
    assert store.get_file(again, tmp_path / "out" / "m.onnx").read_bytes() == b"a submitted model"


def test_a_worker_output_ref_reads_as_before_without_an_area_field(store, tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes(b"a converted model")
    ref = store.put_file(source)
    assert "area" not in ref.to_dict()  # step manifests and keys are unchanged for worker outputs
    with pytest.raises(UserInputError, match="unknown storage area"):
        FileRef.from_dict({**ref.to_dict(), "area": "../steps"})


def test_get_file_of_tampered_blob_raises_integrity_error_and_leaves_no_file(store, tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes(b"the genuine model")
    ref = store.put_file(source)
    store._write_bytes(blob_key(ref.digest), b"a tampered model", if_generation=None)
    dest_dir = tmp_path / "out"

    with pytest.raises(IntegrityError):
        store.get_file(ref, dest_dir / "model.onnx")

    assert list(dest_dir.iterdir()) == []  # neither the file nor a temporary part


def test_get_file_of_missing_blob_raises_not_found_and_leaves_no_file(store, tmp_path):
    dest_dir = tmp_path / "out"

    with pytest.raises(NotFound):
        store.get_file(ref_for(b"never stored"), dest_dir / "x.bin")

    assert list(dest_dir.iterdir()) == []


# -- JSON documents and conditional writes -----------------------------------------------


def test_write_json_then_read_json_returns_same_document(store):
    doc = {"step": "convert", "files": [{"path": "model.onnx", "size": 3}], "ok": True}

    store.write_json("steps/abc.json", doc)

    assert store.read_json("steps/abc.json") == doc


def test_read_json_of_missing_key_raises_not_found(store):
    with pytest.raises(NotFound):
        store.read_json("steps/missing.json")


def test_read_json_generation_equals_generation_returned_by_write(store):
    generation = store.write_json("steps/g.json", {"n": 1})

    _doc, read_generation = store.read_json_generation("steps/g.json")

    assert read_generation == generation


def test_write_with_generation_zero_creates_missing_key(store):
    generation = store.write_json("leases/a.json", {"owner": "w1"}, if_generation=0)

    assert generation > 0
    assert store.read_json("leases/a.json") == {"owner": "w1"}


def test_write_with_current_generation_replaces_document_and_changes_generation(store):
    first = store.write_json("leases/a.json", {"owner": "w1"}, if_generation=0)

    second = store.write_json("leases/a.json", {"owner": "w2"}, if_generation=first)

    assert second != first
    assert store.read_json_generation("leases/a.json") == ({"owner": "w2"}, second)


def test_write_with_generation_zero_on_existing_key_raises_precondition_failed(store):
    if is_gcs(store):
        pytest.skip("the GCS emulator does not enforce preconditions: see test_gcs_write_sends_* "
                    "and test_gcs_server_412_*")
    store.write_json("leases/a.json", {"owner": "w1"})

    with pytest.raises(PreconditionFailed):
        store.write_json("leases/a.json", {"owner": "w2"}, if_generation=0)
    assert store.read_json("leases/a.json") == {"owner": "w1"}


def test_write_with_stale_generation_raises_precondition_failed(store):
    if is_gcs(store):
        pytest.skip("the GCS emulator does not enforce preconditions: see test_gcs_write_sends_* "
                    "and test_gcs_server_412_*")
    stale = store.write_json("leases/a.json", {"owner": "w1"})
    store.write_json("leases/a.json", {"owner": "w2"}, if_generation=stale)

    with pytest.raises(PreconditionFailed):
        store.write_json("leases/a.json", {"owner": "w3"}, if_generation=stale)
    assert store.read_json("leases/a.json") == {"owner": "w2"}


# -- listing, deleting, folders -----------------------------------------------------------


def test_list_returns_sorted_keys_under_prefix_only(store):
    for key in ["steps/b.json", "steps/a.json", "steps/sub/c.json", "stepsx.json", "sources/s.json"]:
        store.write_json(key, {"key": key})

    assert store.list("steps/") == ["steps/a.json", "steps/b.json", "steps/sub/c.json"]


def test_list_of_conditionally_written_keys_shows_only_the_documents(store):
    store.write_json("leases/a.json", {"n": 1}, if_generation=0)

    assert store.list("") == ["leases/a.json"]


def test_delete_removes_key(store):
    store.write_json("steps/a.json", {})

    store.delete("steps/a.json")

    assert not store.exists("steps/a.json")


def test_delete_of_missing_key_does_nothing(store):
    store.delete("steps/never.json")

    assert store.list("") == []


def test_put_dir_then_get_files_recreates_folder_with_subfolder(store, tmp_path):
    src = tmp_path / "model"
    (src / "tokenizer").mkdir(parents=True)
    (src / "model.onnx").write_bytes(b"graph")
    (src / "model.onnx.data").write_bytes(os.urandom(3000))
    (src / "tokenizer" / "vocab.txt").write_text("a\nb\n")

    refs = store.put_dir(src)
    out = store.get_files(refs, tmp_path / "restored")

    assert sorted(r.path for r in refs) == ["model.onnx", "model.onnx.data", "tokenizer/vocab.txt"]
    restored = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    original = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*") if p.is_file()}
    assert restored == original


# -- observing transfers ------------------------------------------------------------------


def test_transfer_hook_sees_the_bytes_of_an_upload_and_a_download(store, tmp_path):
    seen: list[tuple[str, int]] = []
    store.on_transfer = lambda direction, nbytes: seen.append((direction, nbytes))
    source = tmp_path / "weights.bin"
    source.write_bytes(os.urandom(1234))

    ref = store.put_file(source)
    store.get_file(ref, tmp_path / "out" / "weights.bin")

    assert seen == [("uploaded", 1234), ("downloaded", 1234)]


def test_transfer_hook_sees_whole_objects_but_not_a_blob_already_stored(store, tmp_path):
    source = tmp_path / "config.pbtxt"
    source.write_bytes(b"x" * 100)
    store.put_file(source)
    seen: list[tuple[str, int]] = []
    store.on_transfer = lambda direction, nbytes: seen.append((direction, nbytes))

    store.put_file(source)  # already stored: nothing uploaded
    store.put_object("repository/m/config.pbtxt", source)
    store.get_object("repository/m/config.pbtxt", tmp_path / "back.pbtxt")
    store.write_json("steps/a.json", {"small": "document"})  # documents are not transfers

    assert seen == [("uploaded", 100), ("downloaded", 100)]


def test_a_failing_transfer_hook_does_not_fail_the_transfer(store, tmp_path):
    def broken(direction: str, nbytes: int) -> None:
        raise RuntimeError("observer bug")

    store.on_transfer = broken
    source = tmp_path / "a.bin"
    source.write_bytes(b"payload")

    ref = store.put_file(source)

    assert store.get_file(ref, tmp_path / "b.bin").read_bytes() == b"payload"


# -- large artifacts: bounded memory ------------------------------------------------------

LARGE = 60 * MiB
RSS_GROWTH_LIMIT = 40 * MiB

# Runs in a fresh interpreter and reads the kernel's per-process peak RSS (VmHWM, reset just
# before the transfer through /proc/self/clear_refs), so the figure reflects this one transfer.
# (getrusage's ru_maxrss is no good here: Linux carries the parent's peak across fork+exec.)
_CHILD = r"""
import json, sys
from pathlib import Path
from shared.storage import FileRef, open_store

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

mode, uri, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
store = open_store(uri)
warm = work / "warm.txt"
warm.write_bytes(b"warm-up")
store.get_file(store.put_file(warm), work / "warm.out")  # load lazily imported code paths
before = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
except OSError:
    pass  # older kernels: VmHWM still holds the import peak, an overestimate
if mode == "upload":
    ref = store.put_file(work / "large.bin")
else:
    ref = FileRef.from_dict(json.loads(sys.argv[4]))
    store.get_file(ref, work / "downloaded.bin")
print(json.dumps({"before": before, "peak": status("VmHWM"), "ref": ref.to_dict()}))
"""


def run_child(mode: str, uri: str, work: Path, *extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, uri, str(work), *extra],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def rss_growth(report: dict) -> int:
    return report["peak"] - report["before"]


def test_large_upload_keeps_memory_growth_under_40_mb(store, tmp_path):
    digest = write_random_file(tmp_path / "large.bin", LARGE)

    report = run_child("upload", store.uri, tmp_path)

    assert report["ref"]["digest"] == digest
    assert store.exists(blob_key(digest))
    assert rss_growth(report) < RSS_GROWTH_LIMIT, f"RSS grew by {rss_growth(report) / MiB:.1f} MiB"


def test_large_download_keeps_memory_growth_under_40_mb(store, tmp_path):
    write_random_file(tmp_path / "large.bin", LARGE)
    ref = store.put_file(tmp_path / "large.bin")
    (tmp_path / "large.bin").unlink()

    report = run_child("download", store.uri, tmp_path, json.dumps(ref.to_dict()))

    assert (tmp_path / "downloaded.bin").stat().st_size == LARGE  # get_file verified the sha256
    assert rss_growth(report) < RSS_GROWTH_LIMIT, f"RSS grew by {rss_growth(report) / MiB:.1f} MiB"


# -- no partial objects -------------------------------------------------------------------

PARTIAL_SIZE = 12 * MiB  # above 8 MiB, so gs:// uses a resumable upload


@contextmanager
def upload_paused_midway(store, key: str, data: bytes, tmp_path: Path):
    """Run store._upload(key, ...) in a thread and hold it after part of data was transferred."""
    errors: list[BaseException] = []

    def upload(source: Path) -> None:
        try:
            store._upload(key, source)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    if is_gcs(store):
        source = tmp_path / "partial.bin"
        source.write_bytes(data)
        data_bytes = data
        sent_one_chunk, resume = threading.Event(), threading.Event()
        session = store.client._http
        original = session.put

        def put_then_hold(url, data=None, **kwargs):
            # The first streamed PUT delivers one MiB, then stalls until the test resumes it and
            # breaks off; the store then resumes the session. (Not a request held open mid-body:
            # the emulator serves one request at a time.)
            if hasattr(data, "read") and not sent_one_chunk.is_set():
                size = len(data_bytes)
                partial = original(url, data=data.read(MiB), timeout=60,
                                   headers={"Content-Range": f"bytes 0-{MiB - 1}/{size}"})
                assert partial.status_code == 308, partial.status_code
                sent_one_chunk.set()
                assert resume.wait(60), "the test never resumed the upload"
                raise requests.exceptions.ConnectionError("stalled upload broken off")
            return original(url, data=data, **kwargs)

        with mock.patch.object(session, "put", side_effect=put_then_hold):
            thread = threading.Thread(target=upload, args=(source,), daemon=True)
            thread.start()
            while not sent_one_chunk.wait(0.05):
                assert thread.is_alive(), f"the upload ended without being streamed: {errors}"
            try:
                yield
            finally:
                resume.set()
                thread.join(60)
    else:
        # A FIFO: the backend reads the first part, then blocks until the test writes the rest.
        source = tmp_path / "partial.fifo"
        os.mkfifo(source)
        thread = threading.Thread(target=upload, args=(source,), daemon=True)
        thread.start()
        with open(source, "wb") as pipe:
            head = len(data) - MiB  # most of it: more than any sensible copy buffer, so bytes hit the disk
            pipe.write(data[:head])  # returns once the reader has taken in (nearly) all of it
            pipe.flush()
            try:
                yield
            finally:
                pipe.write(data[head:])
        thread.join(60)
    assert not thread.is_alive(), "the upload did not finish"
    assert not errors, errors


def test_blob_is_invisible_while_its_upload_is_in_progress(store, tmp_path):
    data = os.urandom(PARTIAL_SIZE)
    ref = ref_for(data)
    key = blob_key(ref.digest)

    with upload_paused_midway(store, key, data, tmp_path):
        seen = (store.exists(key), key in store.list("blobs/"))
        with pytest.raises(NotFound):
            store.get_file(ref, tmp_path / "early.bin")

    assert seen == (False, False)
    assert not (tmp_path / "early.bin").exists()


def test_blob_is_complete_once_visible_after_upload(store, tmp_path):
    data = os.urandom(PARTIAL_SIZE)
    ref = ref_for(data)
    key = blob_key(ref.digest)

    with upload_paused_midway(store, key, data, tmp_path):
        pass

    assert store.exists(key)
    assert store.get_file(ref, tmp_path / "done.bin").read_bytes() == data


# -- gs:// specifics ------------------------------------------------------------------------


def test_gcs_uri_is_normalized(gcs_emulator):
    bucket = unique_bucket()

    assert open_store(f"gs://{bucket}//a//b/").uri == f"gs://{bucket}/a/b"


def test_gcs_missing_bucket_without_create_flag_raises_user_input_error_naming_it(
    gcs_emulator, monkeypatch
):
    monkeypatch.delenv("MODELYARD_GCS_CREATE_BUCKET")
    bucket = unique_bucket()

    with pytest.raises(UserInputError, match=bucket):
        open_store(f"gs://{bucket}/prefix")


def test_gcs_objects_are_stored_under_the_store_prefix(gcs_store):
    gcs_store.write_json("steps/a.json", {})

    names = [b.name for b in gcs_store.client.list_blobs(gcs_store.bucket_name)]

    assert names == ["prefix/steps/a.json"]


def test_gcs_list_excludes_objects_under_a_sibling_prefix(gcs_store):
    sibling = open_store(f"gs://{gcs_store.bucket_name}/prefix-other")
    sibling.write_json("steps/other.json", {})
    gcs_store.write_json("steps/mine.json", {})

    assert gcs_store.list("") == ["steps/mine.json"]


@contextmanager
def http_spy(store):
    """Record (method, url, headers) of every HTTP request the store's client makes."""
    session = store.client._http
    with mock.patch.object(session, "request", wraps=session.request) as spy:
        yield spy


def spied_requests(spy) -> list[dict]:
    """method, url, data and headers of each recorded call, however they were passed."""
    names = ("method", "url", "data", "headers")
    return [{**dict(zip(names, c.args, strict=False)), **{k: v for k, v in c.kwargs.items() if k in names}}
            for c in spy.call_args_list]


def request_urls(spy) -> list[str]:
    return [r["url"] for r in spied_requests(spy)]


def test_gcs_write_sends_if_generation_match_zero_for_generation_zero(gcs_store):
    with http_spy(gcs_store) as spy:
        gcs_store.write_json("leases/a.json", {}, if_generation=0)

    assert any("ifGenerationMatch=0" in url for url in request_urls(spy)), request_urls(spy)


def test_gcs_write_sends_if_generation_match_with_given_generation(gcs_store):
    generation = gcs_store.write_json("leases/a.json", {"n": 1})

    with http_spy(gcs_store) as spy:
        gcs_store.write_json("leases/a.json", {"n": 2}, if_generation=generation)

    assert any(f"ifGenerationMatch={generation}" in url for url in request_urls(spy)), request_urls(spy)


def test_gcs_unconditional_write_sends_no_generation_precondition(gcs_store):
    with http_spy(gcs_store) as spy:
        gcs_store.write_json("leases/a.json", {})

    urls = request_urls(spy)
    assert urls and not any("ifGenerationMatch" in url for url in urls), urls


def fake_412_for_uploads(session):
    original = session.request

    def request(method, url, *args, **kwargs):
        if "/upload/" in url:
            response = requests.Response()
            response.status_code = 412
            response.url = url
            response.headers["Content-Type"] = "application/json"
            response._content = json.dumps({"error": {"code": 412, "message": "conditionNotMet"}}).encode()
            response.request = requests.Request(method, url).prepare()
            return response
        return original(method, url, *args, **kwargs)

    return mock.patch.object(session, "request", side_effect=request)


def test_gcs_server_412_raises_precondition_failed(gcs_store):
    gcs_store.write_json("leases/a.json", {"owner": "w1"})

    with fake_412_for_uploads(gcs_store.client._http), pytest.raises(PreconditionFailed):
        gcs_store.write_json("leases/a.json", {"owner": "w2"}, if_generation=0)


def test_gcs_server_412_on_missing_object_raises_precondition_failed(gcs_store):
    with fake_412_for_uploads(gcs_store.client._http), pytest.raises(PreconditionFailed):
        gcs_store.write_json("leases/a.json", {"owner": "w2"}, if_generation=5)


def test_gcs_412_when_object_already_holds_our_bytes_returns_its_generation(gcs_store):
    # A retried conditional write whose first attempt succeeded is answered 412.
    generation = gcs_store.write_json("leases/a.json", {"owner": "w1"}, if_generation=0)

    with fake_412_for_uploads(gcs_store.client._http):
        again = gcs_store.write_json("leases/a.json", {"owner": "w1"}, if_generation=0)

    assert again == generation


def test_gcs_large_upload_is_one_streamed_request(gcs_store, tmp_path):
    """Above 8 MiB: one resumable session, its bytes streamed from the file in one PUT (no chunk in memory)."""
    write_random_file(tmp_path / "big.bin", 9 * MiB)

    with http_spy(gcs_store) as spy:
        ref = gcs_store.put_file(tmp_path / "big.bin")

    puts = [r for r in spied_requests(spy) if r["method"] == "PUT"]
    assert len(puts) == 1
    assert hasattr(puts[0]["data"], "read")  # a file handle, not bytes read into memory
    assert puts[0]["headers"]["Content-Range"] == f"bytes 0-{9 * MiB - 1}/{9 * MiB}"
    gcs_store.get_file(ref, tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == (tmp_path / "big.bin").read_bytes()


def test_gcs_upload_session_carries_crc32c_of_whole_file(gcs_store, tmp_path):
    write_random_file(tmp_path / "big.bin", 9 * MiB)
    expected = google_crc32c.Checksum((tmp_path / "big.bin").read_bytes()).digest()

    with http_spy(gcs_store) as spy:
        gcs_store.put_file(tmp_path / "big.bin")

    start = [r for r in spied_requests(spy) if r["method"] == "POST" and "uploadType=resumable" in r["url"]]
    assert len(start) == 1
    metadata = json.loads(start[0]["data"])
    assert metadata["crc32c"] == base64.b64encode(expected).decode()


def test_gcs_upload_cut_midway_resumes_where_the_server_stopped(gcs_store, tmp_path):
    """The first PUT delivers 4 MiB and then the connection breaks: the store asks the session how
    much it holds and sends only the rest."""
    size = 12 * MiB
    write_random_file(tmp_path / "big.bin", size)
    session = gcs_store.client._http
    original, ranges = session.put, []

    def put(url, data=None, **kwargs):
        ranges.append(kwargs["headers"]["Content-Range"])
        if len(ranges) == 1:
            partial = original(url, data=data.read(4 * MiB), timeout=60,
                               headers={"Content-Range": f"bytes 0-{4 * MiB - 1}/{size}"})
            assert partial.status_code == 308
            raise requests.exceptions.ConnectionError("connection reset by peer")
        return original(url, data=data, **kwargs)

    with mock.patch.object(session, "put", side_effect=put):
        ref = gcs_store.put_file(tmp_path / "big.bin")

    assert ranges == [f"bytes 0-{size - 1}/{size}", f"bytes */{size}", f"bytes {4 * MiB}-{size - 1}/{size}"]
    gcs_store.get_file(ref, tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == (tmp_path / "big.bin").read_bytes()


def test_gcs_upload_that_keeps_failing_raises_transient_error(gcs_store, tmp_path, monkeypatch):
    write_random_file(tmp_path / "big.bin", 9 * MiB)
    monkeypatch.setattr(gcs_store, "upload_attempts", 2)
    monkeypatch.setattr("shared.storage.gcs.time.sleep", lambda s: None)
    refused = requests.exceptions.ConnectionError(f"https://x?access_token={SECRET_UPLOAD}")

    with mock.patch.object(gcs_store.client._http, "put", side_effect=refused):
        with pytest.raises(TransientError, match="did not complete in 2 attempts") as caught:
            gcs_store.put_file(tmp_path / "big.bin")

    assert SECRET_UPLOAD not in str(caught.value)


SECRET_UPLOAD = "ya29.UPLOAD-TOKEN"


def _reply(status: int, stream=None) -> mock.MagicMock:
    reply = mock.MagicMock(status_code=status, headers={})
    reply.__enter__.return_value = reply
    if stream is not None:
        reply.raw.stream.side_effect = stream
    return reply


@pytest.mark.parametrize("status", [503, 500, 429])
def test_gcs_blob_download_server_error_is_transient(gcs_store, tmp_path, status):
    source = tmp_path / "a.bin"
    source.write_bytes(b"payload")
    ref = gcs_store.put_file(source)

    with mock.patch.object(gcs_store.client._http, "get", return_value=_reply(status)):
        with pytest.raises(TransientError, match=blob_key(ref.digest)):
            gcs_store.get_file(ref, tmp_path / "out" / "a.bin")

    assert list((tmp_path / "out").iterdir()) == []


def test_gcs_blob_download_cut_midway_is_transient_and_leaves_no_file(gcs_store, tmp_path):
    source = tmp_path / "a.bin"
    source.write_bytes(b"payload")
    ref = gcs_store.put_file(source)

    def cut(*args, **kwargs):
        yield b"pay"
        raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")

    with mock.patch.object(gcs_store.client._http, "get", return_value=_reply(200, cut)):
        with pytest.raises(TransientError, match=blob_key(ref.digest)):
            gcs_store.get_file(ref, tmp_path / "out" / "a.bin")

    assert list((tmp_path / "out").iterdir()) == []


def test_gcs_missing_blob_download_raises_not_found(gcs_store, tmp_path):
    ref = FileRef(path="gone.bin", digest="0" * 64, size=3)

    with pytest.raises(NotFound, match="does not exist"):
        gcs_store.get_file(ref, tmp_path / "gone.bin")


SECRET = "ya29.SECRET-TOKEN"
TRANSIENT_FAILURES = {
    "503": api_exceptions.ServiceUnavailable(f"Authorization: Bearer {SECRET}"),
    "500": api_exceptions.InternalServerError(f"token {SECRET}"),
    "429": api_exceptions.TooManyRequests(f"token {SECRET}"),
    "408": api_exceptions.from_http_status(408, f"token {SECRET}"),
    "connection": requests.exceptions.ConnectionError(f"https://x?access_token={SECRET}"),
    "auth-transport": auth_exceptions.TransportError(f"token {SECRET}"),
    "retries-exhausted": api_exceptions.RetryError(f"deadline {SECRET}", None),
}


@pytest.mark.parametrize("failure", TRANSIENT_FAILURES.values(), ids=TRANSIENT_FAILURES.keys())
def test_gcs_network_and_server_errors_raise_transient_error_naming_uri_and_key(gcs_store, failure):
    with mock.patch.object(Blob, "download_as_bytes", side_effect=failure):
        with pytest.raises(TransientError) as caught:
            gcs_store.read_json("steps/a.json")

    message = str(caught.value)
    assert f"{gcs_store.uri}/steps/a.json" in message
    assert SECRET not in message
    assert not isinstance(caught.value, IntegrityError)


OPERATIONS = {
    "upload": ("upload_from_filename", lambda s, tmp: s._upload("k/one", _small_file(tmp))),
    "download": ("download_to_filename", lambda s, tmp: s._download("k/one", tmp / "x")),
    "write": ("upload_from_string", lambda s, tmp: s._write_bytes("k/one", b"x", if_generation=None)),
    "read": ("download_as_bytes", lambda s, tmp: s._read_bytes("k/one")),
    "exists": ("exists", lambda s, tmp: s.exists("k/one")),
    "delete": ("delete", lambda s, tmp: s.delete("k/one")),
}


def _small_file(tmp: Path) -> Path:
    path = tmp / "small.bin"
    path.write_bytes(b"small")
    return path


@pytest.mark.parametrize("operation", OPERATIONS.values(), ids=OPERATIONS.keys())
def test_gcs_every_operation_maps_service_unavailable_to_transient_error(gcs_store, tmp_path, operation):
    method, call = operation

    with mock.patch.object(Blob, method, side_effect=api_exceptions.ServiceUnavailable("down")):
        with pytest.raises(TransientError, match="k/one"):
            call(gcs_store, tmp_path)


def test_gcs_list_maps_service_unavailable_to_transient_error(gcs_store):
    with mock.patch.object(type(gcs_store.client), "list_blobs",
                           side_effect=api_exceptions.ServiceUnavailable("down")):
        with pytest.raises(TransientError, match="steps/"):
            gcs_store.list("steps/")
