"""``gs://bucket/prefix`` backend: Google Cloud Storage through the official client.

Files above ``single_request_max`` go up as a resumable upload session whose bytes are streamed
from the file in one request (no chunk held in memory; after a broken connection the session is
asked how much it has and the rest is sent), with a crc32c in the session's metadata that the
server checks before it finalizes the object. GCS makes an object visible only once its upload
completes, so a reader never sees a partial object. Smaller files go in one multipart request.
Blob downloads stream to the destination file, and their sha256 is computed from the same
stream as it is written (the caller compares it with the blob's name, which checks the bytes
end to end), so the file is not read a second time; other downloads are checked against the
server's crc32c. Compare-and-swap writes use ``if_generation_match``.

Set ``STORAGE_EMULATOR_HOST`` to talk to an emulator (the client then uses anonymous
credentials); set but empty, it is ignored and the real service is used. The project is
``MODELYARD_GCS_PROJECT``, else the credentials' own (``google.auth.default()``).
``MODELYARD_GCS_CREATE_BUCKET=1`` creates a missing bucket (tests, local use).

Garbage collection: a touch (``put_file`` finding its blob stored) writes the object's
``modelyard-used`` metadata (the time; a new metageneration), and ``delete_if_unchanged``
deletes with ``if_generation_match`` and ``if_metageneration_match`` set to what the listing saw,
so an object rewritten or touched after it was listed is not deleted. (The emulator accepts
these preconditions without enforcing them.)

The client holds an HTTP connection pool: open the store in the process that uses it (for
Celery prefork workers, inside the task or child process, not in the parent before forking).
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import google.auth.exceptions as auth_exceptions
import requests
import urllib3
from google.api_core import exceptions as api_exceptions
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY

from shared.errors import IntegrityError, NotFound, PreconditionFailed, TransientError, UserInputError
from shared.settings import get_settings
from shared.storage.base import ArtifactStore, StoredObject, safe_relative

USED = "modelyard-used"  # metadata: when put_file last found the object already stored

CREATE_BUCKET_ENV = "MODELYARD_GCS_CREATE_BUCKET"
DOWNLOAD_READ = 2**20  # bytes per read of a streamed download

# Failures that may go away on their own: retried by the caller with backoff.
_TRANSIENT = (
    api_exceptions.ServerError,  # 500, 502, 503, 504 ...
    api_exceptions.TooManyRequests,
    api_exceptions.RetryError,  # the client's own retries ran out
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.ProtocolError,  # a streamed download cut off mid-body
    urllib3.exceptions.ReadTimeoutError,
    auth_exceptions.TransportError,
    ConnectionError,
    TimeoutError,
)
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


class GCSStore(ArtifactStore):
    #: files up to this size go in one multipart request (held in memory); larger ones are
    #: streamed. The client's own resumable upload reads ``chunk_size`` bytes into memory per
    #: request (about twice that at peak) and pays a round trip per chunk (on the emulator also
    #: a copy of everything received so far): 1 GB in 16 MiB chunks went up at a third of the
    #: speed of the streamed single request, which holds no chunk in memory at all.
    single_request_max: int = 8 * 2**20
    #: attempts at one streamed upload (each resumes where the server's record of the session ends)
    upload_attempts: int = 5

    def __init__(self, uri: str, *, client: storage.Client | None = None) -> None:
        parsed = urlparse(uri)
        if parsed.scheme != "gs" or not parsed.netloc:
            raise UserInputError(f"storage URI {uri!r}: expected gs://bucket[/prefix]")
        parts = [p for p in parsed.path.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise UserInputError(f"storage URI {uri!r}: the prefix may not contain '.' or '..'")
        self.bucket_name = parsed.netloc
        self.prefix = "/".join(parts)
        self._root = f"{self.prefix}/" if self.prefix else ""
        self.uri = f"gs://{self.bucket_name}/{self.prefix}" if self.prefix else f"gs://{self.bucket_name}"

        if client is None:
            try:
                project = get_settings().gcs_project
                # No project argument at all (not None, which means "no project"): the client takes the
                # credentials' project from google.auth.default().
                client = storage.Client(project=project) if project else storage.Client()
            except auth_exceptions.DefaultCredentialsError:
                raise UserInputError(
                    f"{self.uri}: no Google Cloud credentials found (set GOOGLE_APPLICATION_CREDENTIALS, "
                    "run on a machine with a service account, or set STORAGE_EMULATOR_HOST for an emulator)"
                ) from None
            except OSError as exc:  # credentials without a project of their own (e.g. a user's ADC)
                raise UserInputError(f"{self.uri}: {exc} Set MODELYARD_GCS_PROJECT to the project to use.") from None
        self.client = client
        self.bucket = self._open_bucket()

    def _open_bucket(self) -> storage.Bucket:
        with self._errors(""):
            try:
                return self.client.get_bucket(self.bucket_name)
            except api_exceptions.NotFound:
                if os.environ.get(CREATE_BUCKET_ENV) == "1":
                    try:
                        return self.client.create_bucket(self.bucket_name)
                    except api_exceptions.Conflict:  # created meanwhile by another process
                        return self.client.bucket(self.bucket_name)
                raise UserInputError(
                    f"{self.uri}: bucket {self.bucket_name!r} does not exist "
                    f"(create it, or set {CREATE_BUCKET_ENV}=1 to have it created)"
                ) from None
            except api_exceptions.Forbidden:
                # Credentials with object permissions only (e.g. roles/storage.objectAdmin) may
                # not read bucket metadata; the object operations report real access problems.
                return self.client.bucket(self.bucket_name)

    # -- helpers ---------------------------------------------------------------------
    def _name(self, key: str) -> str:
        return self._root + safe_relative(key)

    def _where(self, key: str) -> str:
        return f"{self.uri}/{key}" if key else self.uri

    @contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """Translate client exceptions; messages name the URI and key, never request details."""
        where = self._where(key)
        try:
            yield
        except api_exceptions.NotFound:
            raise NotFound(f"{where} does not exist") from None
        except api_exceptions.PreconditionFailed as exc:
            raise PreconditionFailed(f"{where}: precondition failed (the object exists or changed)") from exc
        except DataCorruption as exc:
            raise IntegrityError(f"{where}: checksum mismatch in transfer") from exc
        except _TRANSIENT as exc:
            raise TransientError(f"{where}: storage unavailable ({_describe(exc)})") from exc
        except api_exceptions.GoogleAPICallError as exc:
            if exc.code in _TRANSIENT_STATUS:  # e.g. 408, which has no class of its own
                raise TransientError(f"{where}: storage unavailable ({_describe(exc)})") from exc
            raise
        except InvalidResponse as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status == 404:
                raise NotFound(f"{where} does not exist") from None
            if status == 412:
                raise PreconditionFailed(f"{where}: precondition failed (the object exists or changed)") from exc
            if status in _TRANSIENT_STATUS:
                raise TransientError(f"{where}: storage unavailable (HTTP {status})") from exc
            raise

    # -- raw operations ---------------------------------------------------------------
    def _upload(self, key: str, source: Path) -> None:
        size = source.stat().st_size
        with self._errors(key):
            if size <= self.single_request_max:
                # Objects are content addressed, so repeating the upload is safe: retry always.
                self.bucket.blob(self._name(key)).upload_from_filename(
                    str(source), checksum="crc32c", retry=DEFAULT_RETRY
                )
            else:
                self._upload_streamed(key, source, size)

    def _upload_streamed(self, key: str, source: Path, size: int) -> None:
        """One resumable session; the file is streamed in one PUT, resumed after a failure."""
        blob = self.bucket.blob(self._name(key))
        blob.crc32c = _crc32c_b64(source)  # the server refuses to finalize bytes that do not match
        url = blob.create_resumable_upload_session(
            content_type="application/octet-stream", size=size, client=self.client, checksum=None,
            retry=DEFAULT_RETRY,
        )
        http = self.client._http  # the client's authorized requests session
        offset, failure = 0, None
        with open(source, "rb") as handle:
            for attempt in range(self.upload_attempts):
                if attempt:
                    time.sleep(min(0.5 * 2**attempt, 8.0))
                    try:
                        offset = self._session_offset(http, url, size)
                    except _TRANSIENT as exc:
                        failure = exc
                        continue
                    if offset is None:  # complete: the previous attempt's reply was lost
                        return
                handle.seek(offset)
                try:
                    reply = http.put(url, data=handle, timeout=(30, 300), headers={
                        "Content-Range": f"bytes {offset}-{size - 1}/{size}", "Content-Length": str(size - offset)})
                except _TRANSIENT as exc:
                    failure = exc
                    continue
                if reply.status_code in (200, 201):
                    return
                if reply.status_code == 308 or reply.status_code in _TRANSIENT_STATUS:
                    failure = InvalidResponse(reply, f"upload interrupted (HTTP {reply.status_code})")
                    continue
                raise InvalidResponse(reply, f"upload refused (HTTP {reply.status_code}): {reply.text[:200]}")
        raise TransientError(f"{self._where(key)}: upload did not complete in {self.upload_attempts} attempts "
                             f"({_describe(failure) if failure else 'no reply'})")

    @staticmethod
    def _session_offset(http, url: str, size: int) -> int | None:
        """Bytes the server holds for an upload session; None when the upload is complete."""
        reply = http.put(url, data=b"", timeout=(30, 60), headers={"Content-Range": f"bytes */{size}"})
        if reply.status_code in (200, 201):
            return None
        if reply.status_code != 308:
            raise InvalidResponse(reply, f"upload session status: HTTP {reply.status_code}")
        held = reply.headers.get("Range", "")  # "bytes=0-N", absent when nothing was stored
        return int(held.rpartition("-")[2]) + 1 if held.startswith("bytes=0-") else 0

    def _download(self, key: str, dest: Path) -> None:
        # No chunk_size: a single streamed request, which the client checks against the
        # server's crc32c (chunked downloads are not checksummed by the client).
        blob = self.bucket.blob(self._name(key))
        with self._errors(key):
            blob.download_to_filename(str(dest), checksum="crc32c")

    def _download_digest(self, key: str, dest: Path) -> str:
        """Stream a blob to dest in 1 MiB reads, hashing as it is written; returns the sha256.

        The caller compares the sha256 with the blob's name, which checks the bytes end to end,
        so no crc32c is computed here. (The client's own download reads 8 KiB at a time: at a
        gigabyte that per-read overhead cost more than the hashing.)
        """
        blob = self.bucket.blob(self._name(key))
        digest = hashlib.sha256()
        with self._errors(key):
            url = blob._get_download_url(self.client)
            with self.client._http.get(url, stream=True, timeout=(30, 300)) as reply:
                if reply.status_code != 200:
                    raise InvalidResponse(reply, f"download: HTTP {reply.status_code}")
                with open(dest, "wb") as out:
                    for chunk in reply.raw.stream(DOWNLOAD_READ, decode_content=False):
                        digest.update(chunk)
                        out.write(chunk)
        return digest.hexdigest()

    def _write_bytes(self, key: str, data: bytes, *, if_generation: int | None) -> int:
        blob = self.bucket.blob(self._name(key))
        try:
            with self._errors(key):
                blob.upload_from_string(data, checksum="crc32c", if_generation_match=if_generation)
        except PreconditionFailed:
            # The client retries conditional writes; when an attempt succeeded but its reply was
            # lost, the retry answers 412. The object then holds exactly our bytes: that is a
            # success (a write of identical bytes by another writer is indistinguishable, and
            # equally harmless for idempotent documents).
            try:
                current, generation = self._read_bytes(key)
            except NotFound:
                raise PreconditionFailed(f"{self._where(key)}: precondition failed (the object changed)") from None
            if current != data:
                raise
            return generation
        return int(blob.generation)

    def _read_bytes(self, key: str) -> tuple[bytes, int]:
        blob = self.bucket.blob(self._name(key))
        with self._errors(key):
            data = blob.download_as_bytes(checksum="crc32c")
            if blob.generation is None:
                # GCS returns the generation of the bytes it served in X-Goog-Generation; a server
                # that does not (the emulator) gets a second, non-atomic metadata request.
                blob.reload()
        return data, int(blob.generation)

    def exists(self, key: str) -> bool:
        with self._errors(key):
            return self.bucket.blob(self._name(key)).exists()

    def list(self, prefix: str) -> list[str]:
        start = len(self._root)
        with self._errors(prefix):
            names = [blob.name for blob in self.client.list_blobs(self.bucket, prefix=self._root + prefix)]
        return sorted(name[start:] for name in names)

    def delete(self, key: str) -> None:
        try:
            with self._errors(key):
                self.bucket.blob(self._name(key)).delete()
        except NotFound:
            pass

    def list_objects(self, prefix: str) -> Iterator[StoredObject]:
        start = len(self._root)
        with self._errors(prefix):
            for blob in self.client.list_blobs(self.bucket, prefix=self._root + prefix):
                updated = blob.updated.timestamp() if blob.updated else 0.0
                used = (blob.metadata or {}).get(USED, "")
                if used.replace(".", "", 1).isdigit():  # GCS moves `updated` on a metadata write; the emulator does not
                    updated = max(updated, float(used))
                yield StoredObject(key=blob.name[start:], size=int(blob.size or 0), updated=updated,
                                   generation=int(blob.generation), metageneration=int(blob.metageneration or 0))

    def delete_if_unchanged(self, seen: StoredObject) -> bool:
        blob = self.bucket.blob(self._name(seen.key))
        try:
            with self._errors(seen.key):
                blob.delete(if_generation_match=seen.generation, if_metageneration_match=seen.metageneration)
        except (NotFound, PreconditionFailed):
            return False
        return True

    def touch(self, key: str) -> bool:
        blob = self.bucket.blob(self._name(key))
        blob.metadata = {USED: f"{time.time():.3f}"}
        try:
            with self._errors(key):
                blob.patch()
        except NotFound:
            return False
        except api_exceptions.Forbidden:  # a submitter allowed to create objects but not to update them
            return self.exists(key)
        return True


def _crc32c_b64(path: Path) -> str:
    """The file's CRC32C as GCS writes it: base64 of the big-endian 32-bit value."""
    import google_crc32c

    crc = google_crc32c.Checksum()
    with open(path, "rb") as handle:
        while chunk := handle.read(4 * 2**20):
            crc.update(chunk)
    return base64.b64encode(crc.digest()).decode()


def _describe(exc: BaseException) -> str:
    """Exception class and HTTP status only: request URLs and headers stay out of messages."""
    code = getattr(exc, "code", None)
    name = type(exc).__name__
    return f"{name}, HTTP {int(code)}" if isinstance(code, int) else name
