"""The strict zip reader: honest archives read back exactly; every layout two readers could disagree on is refused.

Archives are built here byte by byte (``entry`` / ``directory`` / ``end``) so that each malformation
is exactly one change from an archive that is accepted.
"""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import pytest

from shared.errors import UserInputError
from worker.support.zip_check import open_checked_zip

MIB = 2**20


def local_header(name: bytes, data: bytes, *, flags: int = 0, method: int = 0, crc: int | None = None,
                 size: int | None = None, extra: bytes = b"") -> bytes:
    crc = zlib.crc32(data) if crc is None else crc
    size = len(data) if size is None else size
    return struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, flags, method, 0, 0, crc, size, size, len(name),
                       len(extra)) + name + extra


def central_header(name: bytes, data: bytes, offset: int, *, flags: int = 0, method: int = 0,
                   external: int = 0, extra: bytes = b"") -> bytes:
    return struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, flags, method, 0, 0, zlib.crc32(data),
                       len(data), len(data), len(name), len(extra), 0, 0, 0, external, offset) + name + extra


def end_record(count: int, size: int, offset: int, comment: bytes = b"") -> bytes:
    return struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, size, offset, len(comment)) + comment


def build(members: list[tuple[str, bytes]], *, before: bytes = b"", between: bytes = b"", after_data: bytes = b"",
          central_extra: bytes = b"", external: int = 0, flags: int = 0) -> bytes:
    """A stored archive; the keyword arguments each add one irregularity."""
    body, centrals = bytearray(before), []
    for i, (name, data) in enumerate(members):
        if i:
            body += between
        offset = len(body)
        body += local_header(name.encode(), data, flags=flags) + data
        centrals.append(central_header(name.encode(), data, offset, flags=flags, external=external,
                                       extra=central_extra))
    body += after_data
    directory = b"".join(centrals)
    return bytes(body) + directory + end_record(len(members), len(directory), len(body))


def check(data: bytes, tmp_path: Path, *, max_bytes: int = MIB):
    path = tmp_path / "model.zip"
    path.write_bytes(data)
    return open_checked_zip(path, "model.zip", max_bytes=max_bytes)


def refused(data: bytes, tmp_path: Path, phrase: str, **kwargs) -> str:
    with pytest.raises(UserInputError) as caught:
        check(data, tmp_path, **kwargs).close()
    assert phrase in str(caught.value), str(caught.value)
    assert str(caught.value).startswith("model.zip: ")
    return str(caught.value)


def python_zip(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED, **options) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression, **options) as archive:
        for name, data in members:
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buffer.getvalue()


# --- honest archives --------------------------------------------------------------------------


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_an_archive_written_by_zipfile_reads_back_member_for_member(tmp_path, compression):
    members = [("m/a.json", b'{"a": 1}'), ("m/dir/", b""), ("m/weights", bytes(range(256)) * 4000)]

    with check(python_zip(members, compression), tmp_path, max_bytes=16 * MIB) as archive:
        assert archive.names() == [name for name, _ in members]
        assert [archive.read(name) for name, _ in members] == [data for _, data in members]


def test_an_archive_streamed_with_data_descriptors_is_accepted(tmp_path):
    # torch's writer flags every member with a data descriptor, as zipfile does on a pipe
    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, chunk) -> int:
            self.data += chunk
            return len(chunk)

    pipe = Pipe()
    with zipfile.ZipFile(pipe, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("m/data.pkl", "w") as member:
            member.write(b"payload" * 1000)

    with check(bytes(pipe.data), tmp_path) as checked:
        assert checked.read("m/data.pkl") == b"payload" * 1000


def test_rewrite_holds_exactly_the_checked_members_with_replacements(tmp_path):
    members = [("m/a", b"first"), ("m/b", b"second")]
    with check(python_zip(members, zipfile.ZIP_DEFLATED), tmp_path) as archive:
        clean = archive.rewrite(tmp_path / "clean.zip", replace={"m/b": b""})

    with zipfile.ZipFile(clean) as result:
        assert [(i.filename, result.read(i)) for i in result.infolist()] == [("m/a", b"first"), ("m/b", b"")]


def test_a_hand_built_archive_is_accepted(tmp_path):
    # the control for every malformation below: the same builder without the irregularity
    with check(build([("a", b"one"), ("b", b"two")]), tmp_path) as archive:
        assert archive.read("b") == b"two"


def test_a_consistent_zip64_end_record_is_accepted(tmp_path):
    data = build([("a", b"one")])
    directory_end = len(data) - 22
    directory_start = struct.unpack_from("<I", data, directory_end + 16)[0]
    record = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, 1, 1, directory_end - directory_start,
                         directory_start)
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, directory_end, 1)

    with check(data[:directory_end] + record + locator + data[directory_end:], tmp_path) as archive:
        assert archive.read("a") == b"one"


# --- refused: names -------------------------------------------------------------------------


def test_a_duplicated_member_name_is_refused(tmp_path):
    # zipfile returns the last copy, torch's reader may return the first
    refused(build([("m/data.pkl", b"payload"), ("m/data.pkl", b"honest")]), tmp_path,
            "archive member 'm/data.pkl' appears twice")


@pytest.mark.parametrize("name", ["../escape", "/abs/path", "m\\data.pkl", "m//data.pkl", "m/./data.pkl",
                                  "c:/x", "m/\x01ctl"])
def test_an_unsafe_member_name_is_refused(tmp_path, name):
    refused(build([(name, b"x")]), tmp_path, "has an unsafe path")


def test_a_symbolic_link_member_is_refused(tmp_path):
    refused(build([("m/link", b"/etc/passwd")], external=0o120777 << 16), tmp_path, "is a symbolic link")


def test_a_non_ascii_name_without_the_utf8_flag_is_refused(tmp_path):
    data = build([("m/x", b"x")]).replace(b"m/x", b"m/\xe9")
    refused(data, tmp_path, "not plain ASCII")


def test_a_second_unicode_path_name_is_refused(tmp_path):
    extra = struct.pack("<HH", 0x7075, 6) + b"\x01" + struct.pack("<I", 0) + b"x"
    refused(build([("m/a", b"x")], central_extra=extra), tmp_path, "second (Unicode path) name")


def test_a_local_header_naming_another_member_is_refused(tmp_path):
    data = bytearray(build([("m/a", b"x"), ("m/b", b"y")]))
    data[30:33] = b"m/c"  # the first local header's name
    refused(bytes(data), tmp_path, "its local header names another member")


# --- refused: sizes, methods, flags ---------------------------------------------------------


def test_a_local_header_with_other_sizes_is_refused(tmp_path):
    data = bytearray(build([("m/a", b"xyz")]))
    data[18:22] = struct.pack("<I", 2)  # compressed size in the local header
    refused(bytes(data), tmp_path, "its local header's sizes or CRC differ")


def test_a_local_header_with_another_compression_method_is_refused(tmp_path):
    data = bytearray(build([("m/a", b"xyz")]))
    data[8:10] = struct.pack("<H", 8)
    refused(bytes(data), tmp_path, "flags or compression differ")


def test_an_encrypted_member_is_refused(tmp_path):
    refused(build([("m/a", b"x")], flags=1), tmp_path, "archive member 'm/a' is encrypted")


def test_an_unsupported_compression_method_is_refused(tmp_path):
    refused(python_zip([("m/a", b"x" * 100)], zipfile.ZIP_BZIP2), tmp_path, "uses compression method 12")


def test_data_that_does_not_match_its_crc_is_refused_when_read(tmp_path):
    data = build([("m/a", b"honest")]).replace(b"honest", b"forged")
    with check(data, tmp_path) as archive, pytest.raises(UserInputError, match="does not match its listed size"):
        archive.read("m/a")


def test_a_deflate_stream_longer_than_its_listed_size_is_refused_when_read(tmp_path):
    stream = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = stream.compress(bytes(100_000)) + stream.flush()
    name = b"m/bomb"
    header = local_header(name, packed, method=8, crc=zlib.crc32(bytes(10)), size=len(packed))
    header = header[:22] + struct.pack("<I", 10) + header[26:]  # listed unpacked size: 10 bytes
    central = central_header(name, packed, 0, method=8)
    central = central[:16] + struct.pack("<I", zlib.crc32(bytes(10))) + central[20:24] + struct.pack("<I", 10) + \
        central[28:]
    body = header + packed
    data = body + central + end_record(1, len(central), len(body))

    with check(data, tmp_path) as archive, pytest.raises(UserInputError, match="unpacks to more than its listed 10"):
        archive.read("m/bomb")


def test_an_archive_over_the_size_cap_is_refused(tmp_path):
    refused(build([("m/a", bytes(600)), ("m/b", bytes(600))]), tmp_path, "unpacks to more than 1000 bytes",
            max_bytes=1000)


# --- refused: layout ------------------------------------------------------------------------


def test_data_before_the_first_member_is_refused(tmp_path):
    refused(build([("m/a", b"x")], before=b"#!/bin/sh\n"), tmp_path, "10 bytes no member lists lie before the first")


def test_data_between_members_is_refused(tmp_path):
    refused(build([("m/a", b"x"), ("m/b", b"y")], between=b"HIDDEN"), tmp_path,
            "6 bytes no member lists lie after member 'm/a'")


def test_data_between_the_last_member_and_the_directory_is_refused(tmp_path):
    refused(build([("m/a", b"x")], after_data=b"HIDDEN"), tmp_path, "between the last member and the central")


def test_overlapping_members_are_refused(tmp_path):
    inner = local_header(b"m/b", b"y") + b"y"  # member b hides inside member a's data
    outer = local_header(b"m/a", inner) + inner
    directory = central_header(b"m/a", inner, 0) + central_header(b"m/b", b"y", len(outer) - len(inner))
    data = outer + directory + end_record(2, len(directory), len(outer))

    refused(data, tmp_path, "archive member 'm/b' overlaps 'm/a'")


def test_bytes_after_the_end_record_are_refused(tmp_path):
    refused(build([("m/a", b"x")]) + b"trailing", tmp_path, "bytes after its end record")


def test_an_archive_comment_is_refused(tmp_path):
    data = build([("m/a", b"x")])
    refused(data[:-2] + struct.pack("<H", 4) + b"note", tmp_path, "has a comment or bytes after its end record")


def test_a_directory_listing_more_bytes_than_its_entries_is_refused(tmp_path):
    central = central_header(b"m/a", b"x", 0)
    body = local_header(b"m/a", b"x") + b"x"
    data = body + central + b"JUNK" + end_record(1, len(central) + 4, len(body))

    refused(data, tmp_path, "holds 4 bytes beyond its 1 listed entries")


def test_an_end_record_that_needs_a_missing_zip64_record_is_refused(tmp_path):
    data = build([("m/a", b"x")])
    refused(data[:-6] + struct.pack("<I", 0xFFFFFFFF) + data[-2:], tmp_path, "zip64 record that is missing")


def test_a_zip64_end_record_that_disagrees_is_refused(tmp_path):
    data = build([("m/a", b"x")])
    directory_end = len(data) - 22
    directory_start = struct.unpack_from("<I", data, directory_end + 16)[0]
    record = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, 2, 2, directory_end - directory_start,
                         directory_start)  # two entries, where the end record says one
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, directory_end, 1)

    refused(data[:directory_end] + record + locator + data[directory_end:], tmp_path, "disagree")


def test_an_empty_archive_is_refused(tmp_path):
    refused(end_record(0, 0, 0), tmp_path, "the zip archive is empty")


def test_a_file_that_is_not_a_zip_is_refused(tmp_path):
    refused(b"\x89HDF\r\n\x1a\n" + bytes(100), tmp_path, "not a zip archive")
