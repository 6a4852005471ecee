"""Zip directory rules and bounded reads of entries.

Everything here trusts nothing the central directory claims: sizes are checked against the
bytes actually inflated.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from service.archive.layout import (
    COMPILED_DIRS,
    COMPILED_SUFFIXES,
    ArchiveLimits,
    MiB,
    refuse,
)
from service.errors import KilnError


def directory_size(fh: Any, file_size: int) -> tuple[int, int]:
    """(entry count, central directory bytes) from the end-of-central-directory record.

    Read before ``zipfile`` builds a ZipInfo per entry, so a directory of millions of entries is
    refused without the memory it would take to list it. ``zipfile._EndRecData`` is private, but
    it is the function ``ZipFile`` itself uses to find the record (fast path, comment search,
    zip64 override): with a parser of our own, a crafted tail could make the two read different
    records.
    """
    if file_size < 22:
        raise refuse("not_a_zip", "the upload is not a zip archive (too short); upload the "
                     "file written by torch.export.save", size=file_size)
    try:
        endrec = zipfile._EndRecData(fh)  # type: ignore[attr-defined]
    except (zipfile.BadZipFile, OSError, struct.error) as exc:
        raise refuse("not_a_zip", f"the upload is not a readable zip archive ({exc})") from None
    if endrec is None:
        raise refuse("not_a_zip", "the upload is not a zip archive, or it is truncated; upload "
                     "the complete file written by torch.export.save")
    entries = int(endrec[zipfile._ECD_ENTRIES_TOTAL])  # type: ignore[attr-defined]
    return entries, int(endrec[zipfile._ECD_SIZE])  # type: ignore[attr-defined]


_DRIVE = re.compile(r"^[A-Za-z]:")


def path_problem(name: str) -> str | None:
    if not name:
        return "empty name"
    if "\\" in name:
        return "backslash in name"
    if name.startswith("/"):
        return "absolute path"
    if _DRIVE.match(name):
        return "drive letter"
    if any(ord(c) < 0x20 or c == "\x7f" for c in name):
        return "control character in name"
    parts = name.rstrip("/").split("/")
    if any(p == ".." for p in parts):
        return "'..' component"
    if any(p in ("", ".") for p in parts):
        return "empty or '.' component"
    return None


def _file_type(info: zipfile.ZipInfo) -> int:
    return stat.S_IFMT(info.external_attr >> 16)


def check_directory(
    infos: list[zipfile.ZipInfo], limits: ArchiveLimits
) -> tuple[str, dict[str, zipfile.ZipInfo], int]:
    """Every check that needs only the central directory. Returns (root, entries, total)."""
    seen: set[str] = set()
    total = compressed = 0
    roots: set[str] = set()
    entries: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        problem = path_problem(name)
        if problem:
            raise refuse("archive_unsafe_path", f"archive entry {name!r} has an unsafe name "
                         f"({problem}); upload the file exactly as torch.export.save wrote it",
                         entry=name, reason=problem)
        ftype = _file_type(info)
        if ftype == stat.S_IFLNK:
            raise refuse("archive_link", f"archive entry {name!r} is a symbolic link; links are "
                         "not allowed in uploaded programs", entry=name)
        if ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise refuse("archive_link", f"archive entry {name!r} is not a regular file "
                         f"(mode {oct(ftype)}); only files are allowed", entry=name)
        if name in seen:
            raise refuse("archive_duplicate_entry", f"archive entry {name!r} appears more than "
                         "once; zip readers disagree on which copy wins, so such archives are "
                         "refused", entry=name)
        seen.add(name)
        if info.flag_bits & 0x1:
            raise refuse("archive_encrypted", f"archive entry {name!r} is encrypted; upload an "
                         "unencrypted archive", entry=name)
        # torch's reader (miniz) understands only these two; anything else would read
        # differently there than here.
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise refuse("archive_unsupported_compression", f"archive entry {name!r} uses zip "
                         f"compression method {info.compress_type}; torch can read only stored "
                         "or deflated entries", entry=name, method=info.compress_type)
        total += info.file_size
        if total > limits.max_uncompressed_bytes:
            raise refuse("archive_too_large", "the archive expands to more than "
                         f"{limits.max_uncompressed_bytes} bytes; that is over the limit",
                         limit=limits.max_uncompressed_bytes, entry=name)
        if info.file_size > limits.ratio_check_min_bytes:
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > limits.max_compression_ratio:
                limit = limits.max_compression_ratio
                raise refuse("archive_compression_ratio", f"archive entry {name!r} expands "
                             f"{ratio:.0f}x, over the limit of {limit:.0f}x; upload the file "
                             "as torch.export.save wrote it (uncompressed)",
                             entry=name, ratio=round(ratio, 1),
                             limit=limits.max_compression_ratio)
        compressed += info.compress_size
        # Over the whole archive as well: many entries just under the per-entry threshold
        # would otherwise expand without limit. The sizes are real here, not claims:
        # check_layout has proved that the entries tile the file.
        if total > 16 * MiB and total / max(compressed, 1) > limits.max_compression_ratio:
            raise refuse("archive_compression_ratio", f"the archive expands "
                         f"{total / max(compressed, 1):.0f}x overall, over the limit of "
                         f"{limits.max_compression_ratio:.0f}x; upload the file as "
                         "torch.export.save wrote it (uncompressed)", entry=name,
                         ratio=round(total / max(compressed, 1), 1),
                         limit=limits.max_compression_ratio)
        root, _, rest = name.partition("/")
        roots.add(root)
        # Checked for directory entries too: torch finds AOTInductor models by name prefix.
        if rest.startswith(COMPILED_DIRS) or rest.lower().endswith(COMPILED_SUFFIXES):
            raise refuse("archive_compiled_code", f"archive entry {rest!r} is compiled code; "
                         "Kiln accepts programs only (torch.export.save), never AOTInductor "
                         "packages or native libraries", entry=rest)
        if name.endswith("/") or ftype == stat.S_IFDIR:
            # torch's reader does not skip these by name: a "directory" is read like a file.
            if not name.endswith("/") or info.file_size or info.compress_size > 2:
                raise refuse("archive_directory_entry", f"archive entry {name!r} is a "
                             "directory record with content (or a directory without a "
                             "trailing '/'); directories must be empty records", entry=name)
            continue
        if not rest:
            raise refuse("not_an_exported_program", f"archive entry {name!r} is not inside the "
                         "archive's root folder; torch.export.save puts every entry in one "
                         "folder", entry=name)
        entries[rest] = info
    if len(roots) != 1:
        raise refuse("not_an_exported_program", "the archive's entries are not all in one root "
                     "folder, as torch.export.save writes them", roots=sorted(roots)[:10])
    return roots.pop(), entries, total


_ZIP64_TAIL = 56 + 20  # zip64 end-of-directory record and its locator


def check_layout(fh: Any, zf: zipfile.ZipFile, file_size: int) -> dict[str, tuple[int, int]]:
    """Refuse bytes outside entries: a prefix, gaps or overlaps between entries, a comment.
    Returns each entry's data span, (start, end) in the file.

    Entries must tile the file: local header, data, data descriptor, next entry, ..., central
    directory, end records. Only then are the directory's compressed sizes facts rather than
    claims (an entry whose claimed size runs into its neighbours is how a 0.3 MB upload asked
    for gigabytes), and only then does every reader see the same bytes. The local header's
    name must equal the directory's: readers that trust one or the other would disagree.
    """
    # With no comment, the end record is the file's last 22 bytes. Read it here rather than
    # trust zipfile's record location: Python 3.12 reports the zip64 record's offset there
    # (torch writes zip64 archives), 3.11 the classic record's.
    fh.seek(max(0, file_size - 22))
    tail = fh.read(22)
    if len(tail) != 22 or tail[:4] != b"PK\x05\x06" or tail[20:22] != b"\x00\x00":
        raise refuse("archive_extra_bytes", "the archive has a comment or bytes after its end "
                     "record; upload the file exactly as torch.export.save wrote it",
                     where="end")
    eocd_at = file_size - 22
    endrec = zipfile._EndRecData(fh)  # type: ignore[attr-defined]
    # zipfile fills the directory size from the zip64 record where there is one.
    cd_size = int(endrec[zipfile._ECD_SIZE])  # type: ignore[attr-defined]
    cd_at = zf.start_dir
    if cd_at + cd_size not in (eocd_at, eocd_at - _ZIP64_TAIL):
        raise refuse("archive_extra_bytes", "the archive has bytes between its central "
                     "directory and its end record", where="directory")
    position = 0
    spans: dict[str, tuple[int, int]] = {}
    for info in sorted(zf.infolist(), key=lambda i: i.header_offset):
        name = info.filename
        if info.header_offset != position:
            where = "prefix" if position == 0 else "gap"
            raise refuse("archive_extra_bytes", f"the archive has bytes that belong to no entry "
                         f"(a {where} before {name!r}, or overlapping entries); upload the "
                         "file exactly as torch.export.save wrote it", entry=name, where=where,
                         offset=position)
        fh.seek(info.header_offset)
        header = fh.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise refuse("archive_corrupt", f"archive entry {name!r} has no local header where "
                         "the directory says", entry=name)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        local_name = fh.read(name_len)
        if local_name != info.orig_filename.encode("utf-8" if info.flag_bits & 0x800
                                                   else "cp437", "surrogateescape"):
            raise refuse("archive_reader_mismatch", f"archive entry {name!r} has another name "
                         "in its local header than in the directory", entry=name)
        start = info.header_offset + 30 + name_len + extra_len
        position = start + info.compress_size
        spans[name] = (start, position)
        if info.flag_bits & 0x8:
            position += _descriptor_length(fh, position, info)
    if position != cd_at:
        raise refuse("archive_extra_bytes", "the archive has bytes between its last entry and "
                     "its central directory", where="gap", offset=position)
    return spans


def _descriptor_length(fh: Any, at: int, info: zipfile.ZipInfo) -> int:
    """Length of the data descriptor at ``at`` (signature optional, 32- or 64-bit sizes)."""
    fh.seek(at)
    raw = fh.read(24)
    for signed in (True, False):
        body = raw[4:] if signed else raw
        if signed and raw[:4] != b"PK\x07\x08":
            continue
        for fmt in ("<III", "<IQQ"):
            size = struct.calcsize(fmt)
            if len(body) >= size:
                crc, compressed, uncompressed = struct.unpack(fmt, body[:size])
                if (crc, compressed, uncompressed) == (info.CRC, info.compress_size,
                                                       info.file_size):
                    return size + (4 if signed else 0)
    raise refuse("archive_corrupt", f"archive entry {info.filename!r} has no valid data "
                 "descriptor", entry=info.filename)


def read_small(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, limit: int) -> bytes:
    if info.file_size > limit:
        raise refuse("archive_too_large", f"archive entry {name!r} is {info.file_size} bytes, "
                     f"over the limit of {limit} for metadata files", entry=name, limit=limit)
    try:
        with zf.open(info) as fh:
            # Read one byte past the limit: the declared size is not trusted.
            data = fh.read(limit + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
        raise corrupt(name, exc) from None
    if len(data) > limit:
        raise refuse("archive_too_large", f"archive entry {name!r} is over the limit of "
                     f"{limit} bytes for metadata files", entry=name, limit=limit)
    return data


def corrupt(name: str, exc: BaseException) -> KilnError:
    return refuse("archive_corrupt", f"archive entry {name!r} cannot be read ({exc}); the "
                  "archive is damaged: upload it again", entry=name, reason=str(exc)[:300])


# Threads that hash entries: both sums release the GIL. Bounded: every thread's stack and
# buffer count against the inspection child's address-space limit.
HASH_THREADS = min(os.cpu_count() or 1, 8)
READ_BUFFER = 4 * MiB


def hash_entries(zf: zipfile.ZipFile, fd: int, entries: dict[str, zipfile.ZipInfo],
                 spans: dict[str, tuple[int, int]]) -> dict[str, str]:
    """sha256 of every entry's content (by name), checking CRC-32s as zipfile's reader does.

    Stored entries (torch stores every entry) are read straight from their span in the file
    (``check_layout``) with preadv into one buffer per task, and their sha256 and CRC-32 are
    separate tasks on a thread pool: a big weight's two sums run side by side, many weights
    spread over the cores. zipfile's reader did both in one thread, with a copy per chunk.
    """
    stored = {name: info for name, info in entries.items()
              if info.compress_type == zipfile.ZIP_STORED and info.compress_size == info.file_size}
    digests = {name: sha256_entry(zf, info, name) for name, info in entries.items()
               if name not in stored}
    with ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="entry-hash") as pool:
        shas = {name: pool.submit(_sha256_span, fd, spans[info.filename], name)
                for name, info in stored.items()}
        crcs = {name: pool.submit(_crc32_span, fd, spans[info.filename], name)
                for name, info in stored.items()}
        for name, info in stored.items():
            if crcs[name].result() != info.CRC:
                raise refuse("archive_corrupt", f"archive entry {name!r} does not match its "
                             "CRC-32: the archive is damaged; upload it again", entry=name)
            digests[name] = shas[name].result()
    return digests


def _read_span(fd: int, span: tuple[int, int], name: str, consume: Any) -> None:
    buffer = memoryview(bytearray(min(READ_BUFFER, max(span[1] - span[0], 1))))
    at, end = span
    while at < end:
        n = os.preadv(fd, [buffer[:min(len(buffer), end - at)]], at)
        if n <= 0:
            raise refuse("archive_corrupt", f"archive entry {name!r} is cut short; the archive "
                         "is damaged: upload it again", entry=name)
        consume(buffer[:n])
        at += n


def _sha256_span(fd: int, span: tuple[int, int], name: str) -> str:
    digest = hashlib.sha256()
    _read_span(fd, span, name, digest.update)
    return digest.hexdigest()


def _crc32_span(fd: int, span: tuple[int, int], name: str) -> int:
    crc = 0

    def update(part: memoryview) -> None:
        nonlocal crc
        crc = zlib.crc32(part, crc)

    _read_span(fd, span, name, update)
    return crc


def sha256_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> str:
    digest = hashlib.sha256()
    read = 0
    try:
        with zf.open(info) as fh:
            while chunk := fh.read(MiB):
                read += len(chunk)
                if read > info.file_size:
                    raise refuse("archive_corrupt", f"archive entry {name!r} holds more data "
                                 "than its directory record says", entry=name)
                digest.update(chunk)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
        raise corrupt(name, exc) from None
    return digest.hexdigest()


def load_json(zf: zipfile.ZipFile, entries: dict[str, zipfile.ZipInfo], name: str,
               limits: ArchiveLimits) -> Any:
    data = read_small(zf, entries[name], name, limits.max_json_bytes)
    # Parsed JSON costs ~60-70 bytes of Python objects per value, whatever its byte size:
    # count the values (every value but the first follows a ',', '[' or ':') before parsing,
    # at C speed. Punctuation inside strings counts too, which errs on the safe side.
    values = data.count(b",") + data.count(b"[") + data.count(b":")
    if values > limits.max_json_values:
        raise refuse("archive_json_too_complex", f"archive entry {name!r} holds about {values} "
                     f"JSON values, over the limit of {limits.max_json_values}; torch.export "
                     "writes far fewer for any real program", entry=name, values=values,
                     limit=limits.max_json_values)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise refuse("archive_bad_json", f"archive entry {name!r} is not valid JSON ({exc}); "
                     "re-export the program with torch.export.save", entry=name,
                     reason=str(exc)[:300]) from None

