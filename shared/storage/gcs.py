"""``gs://bucket/prefix`` backend: Google Cloud Storage through the official client.

Large files go up as streamed resumable uploads, ``chunk_size`` bytes per request (about twice
that in memory), with a crc32c the server checks before it finalizes the object; GCS makes an
object visible only once its upload completes, so a reader never sees a partial object.
Downloads stream to the destination file and are checked against the server's crc32c; a blob's
sha256 is computed from the same stream as it is written (the caller compares it with the blob's
name), so the file is not read a second time. Compare-and-swap writes use ``if_generation_match``.

Set ``STORAGE_EMULATOR_HOST`` to talk to an emulator (the client then uses anonymous
credentials). ``MODELYARD_GCS_CREATE_BUCKET=1`` creates a missing bucket (tests, local use).

The client holds an HTTP connection pool: open the store in the process that uses it (for
Celery prefork workers, inside the task or child process, not in the parent before forking).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

import google.auth.exceptions as auth_exceptions
import requests
from google.api_core import exceptions as api_exceptions
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY

from shared.errors import IntegrityError, NotFound, PreconditionFailed, TransientError, UserInputError
from shared.settings import get_settings
from shared.storage.base import ArtifactStore, safe_relative

CREATE_BUCKET_ENV = "MODELYARD_GCS_CREATE_BUCKET"

# Failures that may go away on their own: retried by the caller with backoff.
_TRANSIENT = (
    api_exceptions.ServerError,  # 500, 502, 503, 504 ...
    api_exceptions.TooManyRequests,
    api_exceptions.RetryError,  # the client's own retries ran out
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    auth_exceptions.TransportError,
    ConnectionError,
    TimeoutError,
)
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


class GCSStore(ArtifactStore):
    #: bytes per request of a resumable upload (a multiple of 256 KiB). An upload holds about
    #: twice this in memory: the client keeps the previous request's body while reading the next.
    #: 16 MiB: half the requests of 8 MiB (each one a round trip, and on the emulator a copy of
    #: everything received so far) for a peak RSS growth of about 33 MB (32 MiB: about 67 MB).
    chunk_size: int = 16 * 2**20

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
                client = storage.Client(project=get_settings().gcs_project)
            except auth_exceptions.DefaultCredentialsError:
                raise UserInputError(
                    f"{self.uri}: no Google Cloud credentials found (set GOOGLE_APPLICATION_CREDENTIALS, "
                    "run on a machine with a service account, or set STORAGE_EMULATOR_HOST for an emulator)"
                ) from None
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
        blob = self.bucket.blob(self._name(key), chunk_size=self.chunk_size)
        with self._errors(key):
            # Objects are content addressed, so repeating the upload is safe: retry always.
            blob.upload_from_filename(str(source), checksum="crc32c", retry=DEFAULT_RETRY)

    def _download(self, key: str, dest: Path) -> None:
        # No chunk_size: a single streamed request, which the client checks against the
        # server's crc32c (chunked downloads are not checksummed by the client).
        blob = self.bucket.blob(self._name(key))
        with self._errors(key):
            blob.download_to_filename(str(dest), checksum="crc32c")

    def _download_digest(self, key: str, dest: Path) -> str:
        blob = self.bucket.blob(self._name(key))
        with self._errors(key), open(dest, "wb") as out:
            hashing = _HashingWriter(out)
            blob.download_to_file(hashing, checksum="crc32c")
        return hashing.hexdigest()

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


class _HashingWriter:
    """A write-only stream that hashes what it passes on. No ``seek``: a client that wanted to
    rewrite what it wrote (it does so only for gzip-transcoded objects, which blobs never are)
    fails instead of leaving a hash of bytes that are not in the file."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._sha256 = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self._sha256.update(data)
        return self._out.write(data)

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()


def _describe(exc: BaseException) -> str:
    """Exception class and HTTP status only: request URLs and headers stay out of messages."""
    code = getattr(exc, "code", None)
    name = type(exc).__name__
    return f"{name}, HTTP {int(code)}" if isinstance(code, int) else name
