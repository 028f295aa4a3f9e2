"""The artifact store: content-addressed blobs plus small JSON documents, over any object store.

Backends implement a handful of raw object operations on string keys; everything else
(content addressing, checksum verification, folders of files) lives here once.

Layout under the store's root:
    blobs/sha256/<aa>/<digest>      file contents, immutable, named by their sha256 (workers write)
    uploads/sha256/<aa>/<digest>    what producers upload (sources, samples, data): untrusted inputs
    steps/<step key>.json           one manifest per completed step (written last)
    sources/<digest>.json           the file list of an uploaded source

Producer uploads live under their own prefix, so an operator can let submitters write
``uploads/`` only (e.g. a bucket IAM condition on the object name) while workers alone write
``blobs/`` and ``steps/``. Either way every download is checked against its sha256.

Transfers can be observed (a worker counts the bytes it moves for its metrics) through the
store's ``on_transfer`` hook, which the base class calls for every backend; nothing patches a
backend's raw methods.

Garbage collection (``shared.gc``) lists objects with their size, age and generation
(``list_objects``) and deletes one only if it is unchanged since it was listed
(``delete_if_unchanged``). ``put_file`` *touches* a blob it finds already stored (a new
modification time on file://, a metadata write on gs://), so a sweep running beside it keeps a
blob that a step is about to reference instead of deleting it under the step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from shared.errors import IntegrityError, NotFound, UserInputError

CHUNK = 8 * 2**20

log = logging.getLogger("modelyard.storage")

Direction = Literal["uploaded", "downloaded"]
#: ``on_transfer(direction, nbytes)``: called after an object's bytes went to or came from the store
TransferHook = Callable[[Direction, int], None]


@dataclass(frozen=True)
class FileRef:
    """One file of an artifact: where it sits in the artifact's folder, and its content."""

    path: str
    digest: str
    size: int
    area: str = "blobs"  # BLOBS (worker outputs) or UPLOADS (what a producer uploaded)

    def to_dict(self) -> dict:
        data = {"path": self.path, "digest": self.digest, "size": self.size}
        if self.area != BLOBS:
            data["area"] = self.area
        return data

    @classmethod
    def from_dict(cls, data: dict) -> FileRef:
        area = data.get("area", BLOBS)
        if area not in AREAS:
            raise UserInputError(f"file {data.get('path')!r}: unknown storage area {area!r}")
        return cls(path=data["path"], digest=data["digest"], size=int(data["size"]), area=area)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def digest_of_files(files: list[FileRef]) -> str:
    """One digest for a set of files: the hash of their sorted paths and digests."""
    lines = "".join(f"{f.path}\0{f.digest}\n" for f in sorted(files, key=lambda f: f.path))
    return hashlib.sha256(lines.encode()).hexdigest()


BLOBS, UPLOADS = "blobs", "uploads"
AREAS = (BLOBS, UPLOADS)


@dataclass(frozen=True)
class StoredObject:
    """One object as a listing saw it: what a conditional delete compares against."""

    key: str
    size: int
    updated: float  # seconds since the epoch: last written or touched
    generation: int  # GCS generation; the modification time in ns on file://
    metageneration: int = 0  # GCS only: bumped by a touch (a metadata write)


def blob_key(digest: str, area: str = BLOBS) -> str:
    return f"{area}/sha256/{digest[:2]}/{digest}"


def safe_relative(path: str) -> str:
    """A relative POSIX path that stays inside its folder, or UserInputError."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or not pure.parts or any(p in ("..", "") for p in pure.parts):
        raise UserInputError(f"file path {path!r} escapes its folder")
    return pure.as_posix()


class ArtifactStore(ABC):
    """Base class: subclasses implement the raw object operations below."""

    uri: str
    #: Set to observe transfers: called as ``on_transfer("uploaded" | "downloaded", nbytes)`` after
    #: each blob or whole object this store uploaded or downloaded (``put_file``, ``put_object``,
    #: ``get_file``, ``get_object`` and what goes through them). A blob ``put_file`` finds already
    #: stored is not uploaded, so not reported; small JSON documents are not reported. The hook
    #: runs in the transferring thread; an exception it raises is logged, never fails the transfer.
    on_transfer: TransferHook | None = None

    # -- raw operations, per backend -------------------------------------------------
    @abstractmethod
    def _upload(self, key: str, source: Path) -> None:
        """Store a file's bytes under key so that no reader ever sees a partial object."""

    @abstractmethod
    def _download(self, key: str, dest: Path) -> None:
        """Stream an object into dest (a temporary path the caller verifies). NotFound if absent."""

    def _download_digest(self, key: str, dest: Path) -> str:
        """``_download``, and the sha256 of the bytes written. Backends that can hash while they
        stream override this to save reading the file again."""
        self._download(key, dest)
        return sha256_file(dest)

    @abstractmethod
    def _write_bytes(self, key: str, data: bytes, *, if_generation: int | None) -> int:
        """Write a small object; returns its new generation.

        if_generation=None writes unconditionally; 0 requires that the object does not exist;
        any other value requires that the object's current generation equals it.
        PreconditionFailed when the condition does not hold.
        """

    @abstractmethod
    def _read_bytes(self, key: str) -> tuple[bytes, int]:
        """A small object's bytes and generation. NotFound if absent."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys under prefix, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def list_objects(self, prefix: str) -> Iterator[StoredObject]:
        """Objects under prefix with size, last write (or touch) and generation; no order promised."""

    @abstractmethod
    def delete_if_unchanged(self, seen: StoredObject) -> bool:
        """Delete the object only if it is still the one ``seen`` describes (same generation, not
        touched since); False when it changed or is gone."""

    def touch(self, key: str) -> bool:
        """Mark an existing object as just used, so a concurrent sweep keeps it; False if it is absent."""
        return self.exists(key)

    def _transferred(self, direction: Direction, path: Path) -> None:
        """Report a finished transfer of path's bytes to the on_transfer hook, if one is set."""
        hook = self.on_transfer
        if hook is None:
            return
        try:
            hook(direction, path.stat().st_size)
        except Exception:  # observing a transfer never fails it
            log.exception("on_transfer hook failed for %s of %s", direction, path.name)

    # -- whole objects under chosen keys (a model repository's files) ------------------
    def put_object(self, key: str, source: Path) -> None:
        source = Path(source)
        self._upload(key, source)
        self._transferred("uploaded", source)

    def get_object(self, key: str, dest: Path) -> Path:
        """Download an object to dest; dest appears only when the download completed."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            self._download(key, tmp)
            os.replace(tmp, dest)
            self._transferred("downloaded", dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    # -- JSON documents ---------------------------------------------------------------
    def write_json(self, key: str, obj: object, *, if_generation: int | None = None) -> int:
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        return self._write_bytes(key, data, if_generation=if_generation)

    def read_json(self, key: str) -> dict:
        return self.read_json_generation(key)[0]

    def read_json_generation(self, key: str) -> tuple[dict, int]:
        data, generation = self._read_bytes(key)
        return json.loads(data), generation

    def read_json_or_none(self, key: str) -> dict | None:
        try:
            return self.read_json(key)
        except NotFound:
            return None

    # -- content-addressed blobs -----------------------------------------------------
    def put_file(self, source: Path, path: str | None = None, *, area: str = BLOBS) -> FileRef:
        """Upload a file by content; a blob already stored is not uploaded again."""
        source = Path(source)
        digest = sha256_file(source)
        key = blob_key(digest, area)
        if not self.touch(key):
            self._upload(key, source)
            self._transferred("uploaded", source)
        return FileRef(path=path or source.name, digest=digest, size=source.stat().st_size, area=area)

    def get_file(self, ref: FileRef, dest: Path) -> Path:
        """Download a blob to dest, verifying its sha256; dest appears only when complete."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            actual = self._download_digest(blob_key(ref.digest, ref.area), tmp)
            if actual != ref.digest:
                raise IntegrityError(f"{ref.path}: downloaded bytes hash to {actual}, expected {ref.digest}")
            os.replace(tmp, dest)
            self._transferred("downloaded", dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    # -- folders of files ------------------------------------------------------------
    def put_dir(self, folder: Path, *, area: str = BLOBS) -> list[FileRef]:
        """Upload every regular file under folder; symlinks and special files are refused."""
        folder = Path(folder)
        refs = []
        for path in sorted(_walk(folder)):
            rel = path.relative_to(folder).as_posix()
            refs.append(self.put_file(path, rel, area=area))
        return refs

    def get_files(self, refs: list[FileRef], dest: Path) -> Path:
        dest = Path(dest)
        for ref in refs:
            self.get_file(ref, dest / safe_relative(ref.path))
        return dest


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs:
            if os.path.islink(os.path.join(root, name)):
                raise UserInputError(f"{os.path.join(root, name)} is a symbolic link; sources must be plain files")
        for name in files:
            path = Path(root, name)
            if path.is_symlink() or not path.is_file():
                raise UserInputError(f"{path} is a symbolic link or special file; sources must be plain files")
            yield path
