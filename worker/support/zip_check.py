"""One reader for untrusted zip archives: the bytes the checks read are the bytes the loader gets.

A zip archive describes each member twice, in a local header before its data and in the central
directory at the end, and readers disagree about which to believe. Python's ``zipfile`` returns
the *last* central entry of a duplicated name; PyTorch's reader (miniz) can return the *first*; a
reader that walks local headers sees members the central directory does not list. A check that
reads with one reader and a loader that reads with another can be shown different bytes
(reproduced on a ``.pt2``: the first copy of a member was a pickle payload, the check read the
second, ``torch.export.load`` ran the first).

So ``open_checked_zip`` parses the archive itself and accepts only the plain layout honest writers
(torch, ``zipfile``, Keras) produce: members back to back from byte 0, each local header agreeing
with its central entry (name, flags, method, CRC, sizes), the central directory right after the
last member, then the (zip64) end records and nothing after them. Everything else is refused with
a ``UserInputError`` naming the file and the problem: duplicate or unsafe names, prepended,
unlisted, overlapping or trailing bytes, encryption, compression other than stored or deflate,
several disks, zip64 records that do not agree, an unpacked total over the cap.

``read`` returns one member with its CRC and size verified; ``rewrite`` writes a fresh archive of
the checked members, through the same reads, and that is the file a loader is given: one copy of
each member, exactly as checked, whatever the original file's quirks.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from shared.errors import UserInputError

LOCAL = struct.Struct("<4sHHHHHIIIHH")
CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
END = struct.Struct("<4sHHHHIIH")
END64 = struct.Struct("<4sQHHIIQQQQ")
LOCATOR64 = struct.Struct("<4sIQI")
LOCAL_SIG, CENTRAL_SIG, DESCRIPTOR_SIG = b"PK\x03\x04", b"PK\x01\x02", b"PK\x07\x08"
END_SIG, END64_SIG, LOCATOR64_SIG = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"
STORED, DEFLATED = 0, 8
ENCRYPTED, HAS_DESCRIPTOR, PATCH_DATA, STRONG_ENCRYPTION, MASKED_HEADERS = 1, 1 << 3, 1 << 5, 1 << 6, 1 << 13
UTF8_NAMES = 1 << 11
ZIP64_EXTRA, UNICODE_PATH_EXTRA = 0x0001, 0x7075
U16, U32 = 0xFFFF, 0xFFFFFFFF
MAX_MEMBERS = 100_000
CHUNK = 1 << 20


@dataclass(frozen=True)
class ZipMember:
    """One member as both its headers describe it (they were checked to agree)."""

    name: str
    method: int
    crc: int
    compressed_size: int
    size: int
    header_offset: int
    data_offset: int
    end: int  # the first byte after the member: its data and any data descriptor

    @property
    def is_dir(self) -> bool:
        return self.name.endswith("/")


class CheckedZip:
    """A zip archive whose layout was verified; members are read only through it."""

    def __init__(self, handle: BinaryIO, members: list[ZipMember], label: str) -> None:
        self._handle = handle
        self.members = members
        self.label = label
        self._by_name = {m.name: m for m in members}

    def __enter__(self) -> CheckedZip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handle.close()

    def names(self) -> list[str]:
        return [m.name for m in self.members]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def read(self, name: str) -> bytes:
        """The member's bytes, CRC and size verified; KeyError when there is no such member."""
        return b"".join(self._chunks(self._by_name[name]))

    def rewrite(self, target: Path, *, replace: Mapping[str, bytes] | None = None) -> Path:
        """A fresh archive of every checked member (``replace`` swaps some members' bytes)."""
        replace = replace or {}
        with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as out:
            for member in self.members:
                info = zipfile.ZipInfo(member.name)
                if member.name in replace:
                    out.writestr(info, replace[member.name])
                    continue
                with out.open(info, "w", force_zip64=member.size >= 2**31) as dest:
                    for chunk in self._chunks(member):
                        dest.write(chunk)
        return target

    def _chunks(self, member: ZipMember) -> Iterator[bytes]:
        where = f"{self.label}: archive member {member.name!r}"
        self._handle.seek(member.data_offset)
        remaining, produced, crc = member.compressed_size, 0, 0
        inflater = zlib.decompressobj(-15) if member.method == DEFLATED else None
        while remaining or (inflater is not None and inflater.unconsumed_tail):
            if inflater is not None and inflater.unconsumed_tail:
                raw = inflater.unconsumed_tail
            else:
                raw = self._handle.read(min(CHUNK, remaining))
                if not raw:
                    raise UserInputError(f"{where}: the archive ends inside the member's data")
                remaining -= len(raw)
            try:
                data = inflater.decompress(raw, CHUNK) if inflater is not None else raw
            except zlib.error as exc:
                raise UserInputError(f"{where}: its compressed data is corrupt ({exc})") from None
            produced += len(data)
            if produced > member.size:
                raise UserInputError(f"{where}: unpacks to more than its listed {member.size} bytes")
            crc = zlib.crc32(data, crc)
            yield data
        if inflater is not None:
            rest = inflater.flush()
            produced += len(rest)
            crc = zlib.crc32(rest, crc)
            if rest:
                yield rest
        if inflater is not None and (not inflater.eof or inflater.unused_data):
            raise UserInputError(f"{where}: its compressed stream does not end exactly at its listed size")
        if produced != member.size or crc != member.crc:
            raise UserInputError(f"{where}: its data does not match its listed size and CRC")


def open_checked_zip(source: Path | bytes, label: str, *, max_bytes: int) -> CheckedZip:
    """Parse and verify an archive (a path, or bytes of a nested archive); see the module doc."""
    if isinstance(source, bytes):
        handle: BinaryIO = io.BytesIO(source)
    else:
        try:
            handle = open(source, "rb")  # CheckedZip closes it
        except OSError as exc:
            raise UserInputError(f"{label}: cannot open the archive ({exc.strerror})") from None
    try:
        members = _parse(handle, label, max_bytes)
    except BaseException:
        handle.close()
        raise
    return CheckedZip(handle, members, label)


def _parse(handle: BinaryIO, label: str, max_bytes: int) -> list[ZipMember]:
    size = handle.seek(0, io.SEEK_END)
    cd_offset, cd_size, count = _end_records(handle, size, label)
    if count == 0:
        raise UserInputError(f"{label}: the zip archive is empty")
    if count > MAX_MEMBERS:
        raise UserInputError(f"{label}: more than {MAX_MEMBERS} archive members; refused")
    handle.seek(cd_offset)
    directory = handle.read(cd_size)
    members: list[ZipMember] = []
    seen: set[str] = set()
    position = 0
    total = 0
    for _ in range(count):
        member, position = _central_entry(handle, directory, position, size, label)
        if member.name in seen:
            raise UserInputError(f"{label}: archive member {member.name!r} appears twice; archives with duplicate "
                                 "names are refused (readers disagree about which copy they return)")
        seen.add(member.name)
        total += member.size
        if total > max_bytes:
            raise UserInputError(f"{label}: the archive unpacks to more than {max_bytes} bytes "
                                 "(MODELYARD_MAX_ARCHIVE_BYTES)")
        members.append(member)
    if position != cd_size:
        raise UserInputError(f"{label}: the zip central directory holds {cd_size - position} bytes beyond its "
                             f"{count} listed entries; refused")
    _check_layout(members, cd_offset, label)
    return members


def _end_records(handle: BinaryIO, size: int, label: str) -> tuple[int, int, int]:
    """(central directory offset, size, entry count) from the end record, which must end the file."""
    if size < END.size:
        raise UserInputError(f"{label}: not a zip archive (too short)")
    handle.seek(size - END.size)
    signature, disk, cd_disk, on_disk, count, cd_size, cd_offset, comment = END.unpack(handle.read(END.size))
    if signature != END_SIG:
        handle.seek(max(0, size - 65557))
        found = END_SIG in handle.read()
        raise UserInputError(
            f"{label}: " + ("the zip archive has a comment or bytes after its end record; refused" if found
                            else "not a zip archive (no end-of-central-directory record)"))
    if disk or cd_disk or on_disk != count or comment:
        raise UserInputError(f"{label}: a zip archive spanning several disks; refused")
    end_of_directory = size - END.size
    locator_at = end_of_directory - LOCATOR64.size
    handle.seek(max(0, locator_at))
    if locator_at >= 0 and handle.read(4) == LOCATOR64_SIG:
        handle.seek(locator_at)
        _, z_disk, record_at, disks = LOCATOR64.unpack(handle.read(LOCATOR64.size))
        if z_disk != 0 or disks != 1 or record_at + END64.size != locator_at:
            raise UserInputError(f"{label}: the zip64 end records do not lie where they say (prepended or hidden "
                                 "data); refused")
        handle.seek(record_at)
        (sig, record_size, _made, _needed, z_disk, z_cd_disk, z_on_disk, z_count, z_cd_size,
         z_cd_offset) = END64.unpack(handle.read(END64.size))
        if sig != END64_SIG or record_size != END64.size - 12 or z_disk or z_cd_disk or z_on_disk != z_count:
            raise UserInputError(f"{label}: the zip64 end record is malformed or spans several disks; refused")
        for short, wide, sentinel in ((count, z_count, U16), (cd_size, z_cd_size, U32),
                                      (cd_offset, z_cd_offset, U32)):
            if short not in (wide, sentinel):
                raise UserInputError(f"{label}: the zip end record and zip64 end record disagree; refused")
        count, cd_size, cd_offset, end_of_directory = z_count, z_cd_size, z_cd_offset, record_at
    elif count == U16 or cd_size == U32 or cd_offset == U32:
        raise UserInputError(f"{label}: the zip end record needs a zip64 record that is missing; refused")
    if cd_offset + cd_size != end_of_directory:
        raise UserInputError(f"{label}: the zip central directory does not lie where the end record says "
                             "(prepended or hidden data); refused")
    return cd_offset, cd_size, count


def _central_entry(handle: BinaryIO, directory: bytes, position: int, size: int,
                   label: str) -> tuple[ZipMember, int]:
    if position + CENTRAL.size > len(directory):
        raise UserInputError(f"{label}: the zip central directory is truncated")
    (signature, _made, _needed, flags, method, _time, _date, crc, compressed, plain, name_length, extra_length,
     comment_length, disk, _internal, external, offset) = CENTRAL.unpack_from(directory, position)
    if signature != CENTRAL_SIG:
        raise UserInputError(f"{label}: the zip central directory is malformed")
    start = position + CENTRAL.size
    raw_name = directory[start:start + name_length]
    extra = directory[start + name_length:start + name_length + extra_length]
    end = start + name_length + extra_length + comment_length
    if end > len(directory):
        raise UserInputError(f"{label}: the zip central directory is truncated")
    name = _member_name(raw_name, flags, label)
    where = f"{label}: archive member {name!r}"
    if flags & (ENCRYPTED | STRONG_ENCRYPTION | MASKED_HEADERS):
        raise UserInputError(f"{where} is encrypted; refused")
    if flags & PATCH_DATA or method not in (STORED, DEFLATED):
        raise UserInputError(f"{where} uses compression method {method}; only stored and deflate are accepted")
    if disk or comment_length:
        raise UserInputError(f"{where}: entries on another disk or with comments are refused")
    if (external >> 16) & 0o170000 == 0o120000:
        raise UserInputError(f"{where} is a symbolic link; refused")
    blocks = _extra_blocks(extra, where)
    if UNICODE_PATH_EXTRA in blocks:
        raise UserInputError(f"{where} carries a second (Unicode path) name; refused")
    plain, compressed, offset = _zip64_fields([plain, compressed, offset], blocks.get(ZIP64_EXTRA), where)
    if method == STORED and plain != compressed:
        raise UserInputError(f"{where}: stored, but its packed and unpacked sizes differ")
    if name.endswith("/") and plain:
        raise UserInputError(f"{where}: a folder entry with data; refused")
    data_offset, member_end = _local_header(handle, size, offset, raw_name, flags, method, crc, compressed, plain,
                                            where)
    return ZipMember(name, method, crc, compressed, plain, offset, data_offset, member_end), end


def _member_name(raw: bytes, flags: int, label: str) -> str:
    try:
        name = raw.decode("utf-8") if flags & UTF8_NAMES else raw.decode("ascii")
    except UnicodeDecodeError:
        raise UserInputError(f"{label}: archive member {raw[:80]!r} has a name that is not plain ASCII (or UTF-8 "
                             "flagged as such); readers would decode it differently, so it is refused") from None
    parts = PurePosixPath(name).parts
    if (not name or any(ord(c) < 32 or ord(c) == 127 for c in name) or "\\" in name or name.startswith("/")
            or ".." in parts or "." in name.split("/") or "//" in name or (parts and ":" in parts[0])):
        raise UserInputError(f"{label}: archive member {name!r} has an unsafe path")
    return name


def _extra_blocks(extra: bytes, where: str) -> dict[int, bytes]:
    blocks: dict[int, bytes] = {}
    position = 0
    while position < len(extra):
        if position + 4 > len(extra):
            raise UserInputError(f"{where}: its extra field is malformed")
        kind, length = struct.unpack_from("<HH", extra, position)
        if position + 4 + length > len(extra) or kind in blocks:
            raise UserInputError(f"{where}: its extra field is malformed")
        blocks[kind] = extra[position + 4:position + 4 + length]
        position += 4 + length
    return blocks


def _zip64_fields(fields: list[int], extra: bytes | None, where: str, *, exact: bool = True) -> list[int]:
    """Fields whose 32-bit value is 0xFFFFFFFF replaced, in order, by the zip64 extra's 64-bit values."""
    needed = [i for i, value in enumerate(fields) if value == U32]
    if extra is None:
        if needed:
            raise UserInputError(f"{where}: zip64 sizes without a zip64 extra field; refused")
        return fields
    if len(extra) % 8 or len(extra) < 8 * len(needed) or (exact and len(extra) != 8 * len(needed)):
        raise UserInputError(f"{where}: its zip64 extra field does not match the fields it replaces; refused")
    values = struct.unpack(f"<{len(extra) // 8}Q", extra)
    resolved = list(fields)
    for index, value in zip(needed, values):
        resolved[index] = value
    return resolved


def _local_header(handle: BinaryIO, size: int, offset: int, raw_name: bytes, flags: int, method: int, crc: int,
                  compressed: int, plain: int, where: str) -> tuple[int, int]:
    """(data offset, end of member) after checking the local header against the central entry."""
    if offset + LOCAL.size > size:
        raise UserInputError(f"{where}: its local header lies outside the archive")
    handle.seek(offset)
    (signature, _needed, local_flags, local_method, _time, _date, local_crc, local_compressed, local_plain,
     name_length, extra_length) = LOCAL.unpack(handle.read(LOCAL.size))
    local_name = handle.read(name_length)
    extra = handle.read(extra_length)
    if signature != LOCAL_SIG or local_name != raw_name or len(extra) != extra_length:
        raise UserInputError(f"{where}: its local header names another member or is missing; refused")
    if local_flags != flags or local_method != method:
        raise UserInputError(f"{where}: its local header's flags or compression differ from the directory's")
    blocks = _extra_blocks(extra, where)
    if UNICODE_PATH_EXTRA in blocks:
        raise UserInputError(f"{where} carries a second (Unicode path) name; refused")
    wide = ZIP64_EXTRA in blocks
    local_plain, local_compressed = _zip64_fields([local_plain, local_compressed], blocks.get(ZIP64_EXTRA), where,
                                                  exact=False)
    local = (local_crc, local_compressed, local_plain)
    central = (crc, compressed, plain)
    if flags & HAS_DESCRIPTOR:
        if any(value not in (0, want) for value, want in zip(local, central)):
            raise UserInputError(f"{where}: its local header's sizes or CRC differ from the directory's")
    elif local != central:
        raise UserInputError(f"{where}: its local header's sizes or CRC differ from the directory's")
    data_offset = offset + LOCAL.size + name_length + extra_length
    end = data_offset + compressed
    if flags & HAS_DESCRIPTOR:
        layout = "<4sIQQ" if wide or compressed >= U32 or plain >= U32 else "<4sIII"
        length = struct.calcsize(layout)
        handle.seek(end)
        record = handle.read(length)
        if len(record) != length or struct.unpack(layout, record) != (DESCRIPTOR_SIG, crc, compressed, plain):
            raise UserInputError(f"{where}: its data descriptor is missing or differs from the directory's")
        end += length
    if end > size:
        raise UserInputError(f"{where}: its data runs past the end of the archive")
    return data_offset, end


def _check_layout(members: list[ZipMember], cd_offset: int, label: str) -> None:
    """Members back to back from byte 0 up to the central directory: no gap, overlap or hidden bytes."""
    position, previous = 0, None
    for member in sorted(members, key=lambda m: m.header_offset):
        if member.header_offset < position:
            raise UserInputError(f"{label}: archive member {member.name!r} overlaps {previous!r}; refused")
        if member.header_offset > position:
            after = f"after member {previous!r}" if previous else "before the first member"
            raise UserInputError(f"{label}: {member.header_offset - position} bytes no member lists lie {after} "
                                 "(prepended or hidden data); refused")
        position, previous = member.end, member.name
    if position > cd_offset:
        raise UserInputError(f"{label}: archive member {previous!r} overlaps the central directory; refused")
    if position < cd_offset:
        raise UserInputError(f"{label}: {cd_offset - position} bytes no member lists lie between the last member "
                             "and the central directory (hidden data); refused")
