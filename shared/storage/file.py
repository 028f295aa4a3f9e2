"""``file://`` backend: a local (or network-mounted) folder.

Whole objects appear by ``os.replace`` of a finished temporary file (atomic on POSIX), and
compare-and-swap writes hold an exclusive ``flock`` on a sidecar lock file, so several
worker processes on one host, or on hosts sharing the folder over NFS, can share it.

A touch (``put_file`` finding its blob stored) sets the file's modification time under a
shared lock on ``.gc.lock`` in the root; a sweep's ``delete_if_unchanged`` compares the time and
unlinks under the exclusive lock, so a blob touched after it was listed is never deleted.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlparse

from shared.errors import NotFound, PreconditionFailed
from shared.storage.base import ArtifactStore, StoredObject, safe_relative

GC_LOCK = ".gc.lock"


class FileStore(ArtifactStore):
    def __init__(self, uri: str) -> None:
        parsed = urlparse(uri)
        self.root = Path(unquote(parsed.path)).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / safe_relative(key)

    def _atomic_write(self, path: Path, write) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _upload(self, key: str, source: Path) -> None:
        def copy(handle) -> None:
            with open(source, "rb") as src:
                shutil.copyfileobj(src, handle, 8 * 2**20)

        self._atomic_write(self._path(key), copy)

    def _download(self, key: str, dest: Path) -> None:
        try:
            with open(self._path(key), "rb") as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 8 * 2**20)
        except FileNotFoundError:
            raise NotFound(f"{self.uri}/{key} does not exist") from None

    @contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _generation(self, path: Path) -> int:
        try:
            return path.stat().st_mtime_ns or 1
        except FileNotFoundError:
            return 0

    def _write_bytes(self, key: str, data: bytes, *, if_generation: int | None) -> int:
        path = self._path(key)
        if if_generation is None:
            self._atomic_write(path, lambda handle: handle.write(data))
            return self._generation(path)
        with self._locked(path):
            current = self._generation(path)
            if current != if_generation:
                raise PreconditionFailed(f"{key}: generation is {current}, expected {if_generation}")
            self._atomic_write(path, lambda handle: handle.write(data))
            generation = self._generation(path)
            if generation == current:  # same mtime tick: force a visible change
                os.utime(path, ns=(generation + 1, generation + 1))
                generation += 1
            return generation

    def _read_bytes(self, key: str) -> tuple[bytes, int]:
        path = self._path(key)
        try:
            with open(path, "rb") as handle:
                generation = os.fstat(handle.fileno()).st_mtime_ns or 1
                return handle.read(), generation
        except FileNotFoundError:
            raise NotFound(f"{self.uri}/{key} does not exist") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        base = self.root
        keys = []
        for root, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".") and (name.endswith(".part") or name.endswith(".lock")):
                    continue
                key = Path(root, name).relative_to(base).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    @contextmanager
    def _gc_lock(self, mode: int) -> Iterator[None]:
        with open(self.root / GC_LOCK, "a") as lock:
            fcntl.flock(lock, mode)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def list_objects(self, prefix: str) -> Iterator[StoredObject]:
        for key in self.list(prefix):
            try:
                stat = self._path(key).stat()
            except FileNotFoundError:  # deleted since it was listed
                continue
            yield StoredObject(key=key, size=stat.st_size, updated=stat.st_mtime, generation=stat.st_mtime_ns)

    def delete_if_unchanged(self, seen: StoredObject) -> bool:
        path = self._path(seen.key)
        with self._gc_lock(fcntl.LOCK_EX):
            try:
                if path.stat().st_mtime_ns != seen.generation:
                    return False
                path.unlink()
            except FileNotFoundError:
                return False
        return True

    def touch(self, key: str) -> bool:
        with self._gc_lock(fcntl.LOCK_SH):
            try:
                os.utime(self._path(key))
            except FileNotFoundError:
                return False
        return True
