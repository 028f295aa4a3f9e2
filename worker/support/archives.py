"""Unpack an untrusted ``.tar`` / ``.tar.gz`` with path, type and size checks.

``extract_tar(archive, dest, max_bytes=...)`` writes only plain files and folders under
``dest`` and refuses, with a ``UserInputError`` naming the member:

- absolute paths, drive letters, ``..`` components and backslashes in member names;
- symbolic and hard links, devices, FIFOs and any other special member;
- more than ``max_members`` members, or more than ``max_bytes`` unpacked in all.

The size cap is enforced while streaming, never after: a member whose declared size would
take the total over the cap is refused from its header, before a byte of it is decompressed,
and the decompressed stream itself is counted (tar metadata such as pax headers included) so
nothing can read past the cap. The cap is also lowered to the free space of ``dest``'s disk,
so an archive cannot fill the disk even under a generous setting.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from shared.errors import UserInputError

CHUNK = 1 << 20
DISK_MARGIN = 256 * 2**20  # leave this much free on dest's disk
GZIP_MAGIC = b"\x1f\x8b"


class _CappedReader(io.RawIOBase):
    """A read-only stream that refuses to deliver more than ``limit`` bytes."""

    def __init__(self, raw, limit: int, label: str) -> None:
        self._raw = raw
        self._limit = limit
        self._label = label
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = CHUNK
        data = self._raw.read(min(size, self._limit - self.count + 1))
        self.count += len(data)
        if self.count > self._limit:
            raise UserInputError(
                f"{self._label}: unpacks to more than {_size(self._limit)}; refused as a decompression bomb "
                "(raise MODELYARD_MAX_ARCHIVE_BYTES if the model really is that large)"
            )
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _check_name(name: str, label: str) -> PurePosixPath:
    where = f"{label}: member {name!r}"
    if not name or "\0" in name:
        raise UserInputError(f"{where}: empty or NUL in its name")
    if "\\" in name:
        raise UserInputError(f"{where}: backslashes in member names are refused")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UserInputError(f"{where}: absolute paths are refused")
    pure = PurePosixPath(name)
    if ".." in pure.parts:
        raise UserInputError(f"{where}: '..' is refused (it would write outside the extraction folder)")
    parts = [p for p in pure.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def extract_tar(
    archive: Path, dest: Path, *, max_bytes: int, max_members: int = 100_000, label: str | None = None
) -> Path:
    """Extract ``archive`` (plain or gzip-compressed tar) into ``dest`` (created, must be new or empty)."""
    archive = Path(archive)
    dest = Path(dest)
    label = label or archive.name
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ValueError(f"extraction folder {dest} is not empty")
    free = shutil.disk_usage(dest).free - DISK_MARGIN
    limit = max(0, min(max_bytes, free))
    base = dest.resolve()

    with open(archive, "rb") as raw:
        compressed = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        # Headers and padding count too: allow one header block per member on top of the data cap.
        capped = io.BufferedReader(_CappedReader(stream, limit + 1024 * max_members, label), CHUNK)
        total = 0
        members = 0
        try:
            with tarfile.open(fileobj=capped, mode="r|") as tar:
                for member in tar:
                    members += 1
                    if members > max_members:
                        raise UserInputError(f"{label}: more than {max_members} members; refused")
                    rel = _check_name(member.name, label)
                    if member.issym() or member.islnk():
                        raise UserInputError(
                            f"{label}: member {member.name!r} is a link to {member.linkname!r}; links are refused"
                        )
                    if not (member.isfile() or member.isdir()):
                        raise UserInputError(
                            f"{label}: member {member.name!r} is a device, FIFO or other special file; refused"
                        )
                    target = dest / rel
                    if not target.resolve().is_relative_to(base):
                        raise UserInputError(f"{label}: member {member.name!r} resolves outside the extraction folder")
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    total += member.size
                    if total > limit:
                        raise UserInputError(
                            f"{label}: member {member.name!r} ({_size(member.size)}) takes the unpacked size over "
                            f"{_size(limit)}; refused as a decompression bomb (the cap is MODELYARD_MAX_ARCHIVE_BYTES "
                            "or the free disk space, whichever is smaller)"
                        )
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None  # a regular file always has a data stream
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                    with os.fdopen(os.open(target, flags, 0o644), "wb") as out:
                        shutil.copyfileobj(source, out, CHUNK)
        except FileExistsError as exc:
            raise UserInputError(f"{label}: member {Path(exc.filename).name!r} appears twice; refused") from None
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise UserInputError(f"{label}: not a readable tar archive: {exc}") from None
    if members == 0:
        raise UserInputError(f"{label}: the archive is empty")
    return dest


def is_tar(path: Path) -> bool:
    """Whether ``path`` looks like a tar or gzip file by its name (``.tar``, ``.tar.gz``, ``.tgz``)."""
    name = Path(path).name.lower()
    return name.endswith((".tar", ".tar.gz", ".tgz"))
