"""Artifact storage: ``open_store(uri)`` returns the backend for a ``file://`` or ``gs://`` URI."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from shared.errors import UserInputError
from shared.storage.base import (
    BLOBS,
    UPLOADS,
    ArtifactStore,
    FileRef,
    StoredObject,
    TransferHook,
    digest_of_files,
    sha256_file,
)

__all__ = ["BLOBS", "UPLOADS", "ArtifactStore", "FileRef", "StoredObject", "TransferHook", "digest_of_files",
           "open_store", "sha256_file"]


def open_store(uri: str, *, base: Path | None = None) -> ArtifactStore:
    """The store for uri. A bare or relative path is a local folder (relative to base)."""
    scheme = urlparse(uri).scheme
    if scheme == "gs":
        from shared.storage.gcs import GCSStore  # the client library is imported only when used

        return GCSStore(uri)
    if scheme == "file":
        path = uri[len("file://"):]
        if not path.startswith("/"):
            path = str((base or Path.cwd()) / path)
        from shared.storage.file import FileStore

        return FileStore(Path(path).resolve().as_uri())
    if scheme == "":
        from shared.storage.file import FileStore

        return FileStore(((base or Path.cwd()) / uri).resolve().as_uri())
    raise UserInputError(f"storage URI {uri!r}: scheme {scheme!r} is not supported (use file:// or gs://)")
