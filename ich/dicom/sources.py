"""Where the files come from: paths, folders (walked recursively), ``.zip`` archives and uploads.

Archives are read in memory, never extracted, with guards against zip bombs and unsafe member paths
(zip slip). :class:`Upload` objects are bytes with a file name, as a browser sends them.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ich.dicom.series import DicomError, Problem

# Zip-bomb guards: total inflated size and per-member compression ratio. DICOM compresses
# 2-5x in a zip; 200x only happens for crafted or empty data.
MAX_ARCHIVE_BYTES = 8 << 30
MAX_COMPRESSION_RATIO = 200
MAX_ZIP_DEPTH = 2
# Files a folder or archive of a study commonly holds beside the images; not worth a problem line.
SKIPPED_SUFFIXES = frozenset({".csv", ".txt", ".md", ".json", ".xml", ".html", ".png", ".jpg", ".jpeg", ".gif", ".pdf"})
SKIPPED_NAMES = frozenset({"DICOMDIR", ".DS_Store", "Thumbs.db"})


@dataclass(frozen=True)
class Upload:
    """A file's bytes with the name the user gave it (a browser upload or a zip member)."""

    name: str
    data: bytes


Source = str | os.PathLike | Upload


def open_source(source: Source) -> tuple[str, io.BytesIO | None]:
    """``(display name, the file's bytes)``; ``None`` as the file for an empty file."""
    if isinstance(source, Upload):
        return source.name, (io.BytesIO(source.data) if source.data else None)
    name = os.fspath(source)
    try:
        size = os.path.getsize(name)
    except OSError as exc:
        raise DicomError(name, f"cannot read file ({exc.strerror or exc})") from None
    if size == 0:
        return name, None
    try:
        with open(name, "rb") as fh:
            return name, io.BytesIO(fh.read())
    except OSError as exc:
        raise DicomError(name, f"cannot read file ({exc.strerror or exc})") from None


def _skipped(name: str) -> bool:
    base = PurePosixPath(name).name
    return base in SKIPPED_NAMES or base.startswith(".") or PurePosixPath(base).suffix.lower() in SKIPPED_SUFFIXES


def _is_zip(name: str, data: bytes | None = None) -> bool:
    if name.lower().endswith(".zip"):
        return True
    if data is not None:
        return data[:4] == b"PK\x03\x04"
    return False


def _zip_members(name: str, fp: Any, depth: int) -> Iterator[Upload | Problem]:
    """Yield the members of a zip as uploads, refusing path escapes and bombs, never extracting."""
    try:
        archive = zipfile.ZipFile(fp)
    except (zipfile.BadZipFile, OSError) as exc:
        yield Problem(name, f"not a valid zip archive ({exc})")
        return
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        total = sum(i.file_size for i in infos)
        if total > MAX_ARCHIVE_BYTES:
            yield Problem(
                name,
                f"zip bomb suspected: archive would inflate to {total / 2**30:.1f} GiB (limit {MAX_ARCHIVE_BYTES >> 30} GiB)",
            )
            return
        found = 0
        for info in infos:
            member = f"{name}/{info.filename}"
            parts = PurePosixPath(info.filename.replace("\\", "/")).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                yield Problem(member, "unsafe path in zip archive (zip slip): refused")
                continue
            if _skipped(info.filename):
                continue
            ratio = info.file_size / max(info.compress_size, 1)
            if ratio > MAX_COMPRESSION_RATIO and info.file_size > 1 << 20:
                yield Problem(
                    member, f"zip bomb suspected: compression ratio {ratio:.0f}:1 (limit {MAX_COMPRESSION_RATIO}:1)"
                )
                continue
            try:
                with archive.open(info) as fh:
                    # Never trust the declared size: read at most one byte more than it claims.
                    data = fh.read(info.file_size + 1)
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError) as exc:
                yield Problem(member, f"cannot extract from zip ({exc})")
                continue
            if len(data) > info.file_size:
                yield Problem(member, "zip member larger than its declared size: refused")
                continue
            found += 1
            if _is_zip(info.filename, data):
                if depth >= MAX_ZIP_DEPTH:
                    yield Problem(member, f"zip nested deeper than {MAX_ZIP_DEPTH} levels: refused")
                else:
                    yield from _zip_members(member, io.BytesIO(data), depth + 1)
                continue
            yield Upload(member, data)
        if not found:
            yield Problem(name, "archive contains no DICOM files")


def iter_sources(sources: Iterable[Source]) -> Iterator[Source | Problem]:
    """Expand folders (recursively) and zip archives into single files, or problems."""
    for source in sources:
        if isinstance(source, Upload):
            if _is_zip(source.name, source.data):
                yield from _zip_members(source.name, io.BytesIO(source.data), 1)
            else:
                yield source
            continue
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not _skipped(p.name))
            if not files:
                yield Problem(str(path), "folder contains no files")
            for p in files:
                yield from iter_sources([p]) if p.suffix.lower() == ".zip" else [str(p)]
        elif not path.exists():
            yield Problem(str(path), "no such file or folder")
        elif _is_zip(path.name) or zipfile.is_zipfile(path):
            yield from _zip_members(str(path), str(path), 1)
        else:
            yield str(path)


def read_member(path: str) -> bytes:
    """The bytes of a zip member named as :func:`iter_sources` names it (``archive.zip/inner/file``).

    Nested archives (``outer.zip/inner.zip/file``) are opened in turn. Raises :class:`DicomError`
    when the archive or the member is gone. The archive was checked for bombs and unsafe paths when
    its headers were read.
    """
    parts = PurePosixPath(path).parts
    for i in range(1, len(parts)):
        archive = Path(*parts[:i])
        if archive.is_file():
            break
    else:
        raise DicomError(path, "not a file or a member of a zip archive")
    rest = parts[i:]
    source: Any = archive
    while True:
        try:
            with zipfile.ZipFile(source) as zf:
                names = set(zf.namelist())
                j = next((j for j in range(1, len(rest) + 1) if "/".join(rest[:j]) in names), None)
                if j is None:
                    raise DicomError(path, "member no longer in its zip archive")
                data = zf.read("/".join(rest[:j]))
        except (zipfile.BadZipFile, OSError) as exc:
            raise DicomError(path, f"cannot read its zip archive ({exc})") from None
        if j == len(rest):
            return data
        source, rest = io.BytesIO(data), rest[j:]
