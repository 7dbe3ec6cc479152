"""Where the files come from: paths, folders (walked recursively), ``.zip`` archives and uploads.

Archives are never extracted: their members are inflated into memory one at a time, and a member is not kept
once it is read (a :class:`Member` says where to read it again, :class:`Archives` reads it). Zip bombs are
refused while they inflate, never after: every member, whatever its size, may inflate to at most
:data:`MAX_COMPRESSION_RATIO` times its compressed size and :data:`MAX_FILE_BYTES`; an archive as a whole
(the archives inside it included) to at most :data:`MAX_COMPRESSION_RATIO` times its own size and
:data:`MAX_ARCHIVE_BYTES`. The sizes an archive declares
are checked first, so an honest bomb costs nothing; members are then read in chunks of :data:`READ_CHUNK`,
counted against the same limits (zipfile stops a member at its declared size; the count holds the limits
whatever a reader yields). Unsafe member paths (zip slip) are refused. :class:`Upload` objects are
bytes with a file name, as a browser sends them.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ich.dicom.series import DicomError, Problem

# Inflation limits (zip members, and Deflated-syntax DICOM in .reader). DICOM compresses 2-5x in a zip;
# 200x only happens for crafted or empty data (a blank image compresses about 1000x).
MAX_COMPRESSION_RATIO = 200  # inflated / compressed bytes: each member whatever its size, each archive as a whole
MAX_ARCHIVE_BYTES = 8 << 30  # inflated bytes of one archive, the archives inside it included
MAX_FILE_BYTES = 1 << 30  # one inflated file: an enhanced CT of 2048 frames (reader.MAX_FRAMES) of 512x512 at 16 bits
READ_CHUNK = 1 << 20  # bytes inflated per step: the most a limit is overshot by before it stops the read
MAX_ZIP_DEPTH = 2
# Files a folder or archive of a study commonly holds beside the images; not worth a problem line.
SKIPPED_SUFFIXES = frozenset({".csv", ".txt", ".md", ".json", ".xml", ".html", ".png", ".jpg", ".jpeg", ".gif", ".pdf"})
SKIPPED_NAMES = frozenset({"DICOMDIR", ".DS_Store", "Thumbs.db"})
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError, EOFError, zlib.error)


@dataclass(frozen=True)
class Upload:
    """A file's bytes with the name the user gave it (a browser upload or a zip member)."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Member(Upload):
    """A zip member's bytes, and where to read them again (:meth:`Archives.read`) once they are let go.

    ``archive`` is the outermost zip: its path, or an uploaded zip's bytes (shared, not copied); ``inner`` is
    the member's name in it, through the zips inside (``inner.zip/x.dcm``).
    """

    archive: str | bytes = field(repr=False)
    inner: str


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


def size_text(n: float) -> str:
    """Bytes in words: ``3.4 MiB``, ``8 GiB``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.3g} {unit}"
    return f"{n:.0f} bytes"


class _Spent(DicomError):
    """An archive inflated past its limit: the rest of it is refused."""


@dataclass
class _Budget:
    """What one archive, the archives inside it included, may still inflate to."""

    archive: str
    compressed: int
    used: int = 0

    @property
    def limit(self) -> int:
        return min(MAX_ARCHIVE_BYTES, MAX_COMPRESSION_RATIO * max(self.compressed, 1))

    @property
    def left(self) -> int:
        return self.limit - self.used

    def why(self) -> str:
        return (
            f"limit {size_text(self.limit)}: {MAX_COMPRESSION_RATIO}x its {size_text(self.compressed)}, "
            f"at most {size_text(MAX_ARCHIVE_BYTES)}"
        )

    def spend(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise _Spent(
                self.archive, f"zip bomb suspected: archive inflates past {self.why()}; the rest of it refused"
            )


def _check_member(member: str, inflated: int, compressed: int) -> None:
    """Refuse a member inflating past its limits (its declared size first, then the bytes read so far)."""
    if inflated > MAX_FILE_BYTES:
        raise DicomError(
            member, f"zip bomb suspected: inflates past {size_text(MAX_FILE_BYTES)}, the limit for one file"
        )
    ratio = inflated / max(compressed, 1)
    if ratio > MAX_COMPRESSION_RATIO:
        raise DicomError(
            member, f"zip bomb suspected: compression ratio {ratio:.0f}:1 (limit {MAX_COMPRESSION_RATIO}:1)"
        )


def _inflate(archive: zipfile.ZipFile, info: zipfile.ZipInfo, member: str, budget: _Budget) -> bytes:
    """One member's bytes, read in chunks: stops as soon as it, or its archive, passes a limit."""
    _check_member(member, info.file_size, info.compress_size)
    chunks, inflated = [], 0
    try:
        with archive.open(info) as fh:
            while chunk := fh.read(READ_CHUNK):
                inflated += len(chunk)
                budget.spend(len(chunk))
                _check_member(member, inflated, info.compress_size)
                chunks.append(chunk)
    except _ZIP_ERRORS as exc:
        raise DicomError(member, f"cannot extract from zip ({exc})") from None
    return b"".join(chunks)


def _skipped(name: str) -> bool:
    base = PurePosixPath(name).name
    return base in SKIPPED_NAMES or base.startswith(".") or PurePosixPath(base).suffix.lower() in SKIPPED_SUFFIXES


def _unsafe(filename: str) -> bool:
    parts = PurePosixPath(filename.replace("\\", "/")).parts
    return filename.startswith(("/", "\\")) or ".." in parts or bool(parts and ":" in parts[0])


def _is_zip(name: str, data: bytes | None = None) -> bool:
    if name.lower().endswith(".zip"):
        return True
    if data is not None:
        return data[:4] == b"PK\x03\x04"
    return False


def _zip_members(
    name: str, fp: Any, archive: str | bytes, inner: str, depth: int, budget: _Budget
) -> Iterator[Upload | Problem]:
    """Yield the members of a zip as :class:`Member`, refusing path escapes and bombs, never extracting.

    ``archive`` and ``inner`` say where this zip is (the outermost zip, and its name in it: '' for that one).
    """
    try:
        zf = zipfile.ZipFile(fp)
    except (zipfile.BadZipFile, OSError) as exc:
        yield Problem(name, f"not a valid zip archive ({exc})")
        return
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        total = sum(i.file_size for i in infos)
        if total > budget.left:
            yield Problem(name, f"zip bomb suspected: archive would inflate to {size_text(total)} ({budget.why()})")
            return
        wanted = [i for i in infos if _unsafe(i.filename) or not _skipped(i.filename)]
        if not wanted:
            yield Problem(name, "archive contains no DICOM files")
        for info in wanted:
            member = f"{name}/{info.filename}"
            if _unsafe(info.filename):
                yield Problem(member, "unsafe path in zip archive (zip slip): refused")
                continue
            try:
                data = _inflate(zf, info, member, budget)
            except _Spent:
                raise
            except DicomError as exc:
                yield Problem(exc.path, exc.reason)
                continue
            where = f"{inner}/{info.filename}" if inner else info.filename
            if _is_zip(info.filename, data):
                if depth >= MAX_ZIP_DEPTH:
                    yield Problem(member, f"zip nested deeper than {MAX_ZIP_DEPTH} levels: refused")
                else:
                    yield from _zip_members(member, io.BytesIO(data), archive, where, depth + 1, budget)
                continue
            yield Member(member, data, archive, where)


def _archive(name: str, archive: str | bytes) -> Iterator[Upload | Problem]:
    """The members of an outermost zip (a path, or an upload's bytes), under one inflation budget."""
    budget = _Budget(name, len(archive) if isinstance(archive, bytes) else os.path.getsize(archive))
    try:
        yield from _zip_members(
            name, io.BytesIO(archive) if isinstance(archive, bytes) else archive, archive, "", 1, budget
        )
    except _Spent as exc:
        yield Problem(exc.path, exc.reason)


def iter_sources(sources: Iterable[Source]) -> Iterator[Source | Problem]:
    """Expand folders (recursively) and zip archives into single files, or problems."""
    for source in sources:
        if isinstance(source, Upload):
            if _is_zip(source.name, source.data):
                yield from _archive(source.name, source.data)
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
            yield from _archive(str(path), str(path))
        else:
            yield str(path)


def _open_zip(source: Any, path: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DicomError(path, f"cannot read its zip archive ({exc})") from None


def _find(zf: zipfile.ZipFile, rest: tuple[str, ...]) -> int | None:
    """How many parts of ``rest`` name a member of ``zf`` (a member's name may hold '/'); ``None``: none."""
    for j in range(1, len(rest) + 1):
        try:
            zf.getinfo("/".join(rest[:j]))
            return j
        except KeyError:
            continue
    return None


def _read_nested(zf: zipfile.ZipFile, rest: tuple[str, ...], path: str, budget: _Budget) -> bytes:
    """The bytes at ``rest`` (a member's name, through the zips inside) of ``zf``, under the limits."""
    j = _find(zf, rest)
    if j is None:
        raise DicomError(path, "member no longer in its zip archive")
    data = _inflate(zf, zf.getinfo("/".join(rest[:j])), path, budget)
    if j == len(rest):
        return data
    with _open_zip(io.BytesIO(data), path) as inner:
        return _read_nested(inner, rest[j:], path, budget)


class Archives:
    """Members read again from their archives (:meth:`read`), each outermost zip opened once: reading
    its directory per member would cost a pass over every member's entry. Closes them on exit."""

    def __init__(self) -> None:
        self._open: dict[str | int, zipfile.ZipFile] = {}

    def __enter__(self) -> Archives:
        return self

    def __exit__(self, *exc: object) -> None:
        for zf in self._open.values():
            zf.close()

    def read(self, member: Member) -> bytes:
        """A member's bytes, under the same limits as when first read; :class:`DicomError` when gone."""
        archive = member.archive
        key = archive if isinstance(archive, str) else id(archive)  # an upload's bytes live as long as its members
        if key not in self._open:
            self._open[key] = _open_zip(io.BytesIO(archive) if isinstance(archive, bytes) else archive, member.name)
        try:
            size = len(archive) if isinstance(archive, bytes) else os.path.getsize(archive)
        except OSError as exc:
            raise DicomError(member.name, f"cannot read its zip archive ({exc.strerror or exc})") from None
        budget = _Budget(member.name, size)
        return _read_nested(self._open[key], tuple(member.inner.split("/")), member.name, budget)


def read_member(path: str) -> bytes:
    """The bytes of a zip member named as :func:`iter_sources` names it (``archive.zip/inner/file``).

    Nested archives (``outer.zip/inner.zip/file``) are opened in turn, under the same limits as when the
    archive was first read. Raises :class:`DicomError` when the archive or the member is gone.
    """
    parts = PurePosixPath(path).parts
    for i in range(1, len(parts)):
        archive = Path(*parts[:i])
        if archive.is_file():
            break
    else:
        raise DicomError(path, "not a file or a member of a zip archive")
    with _open_zip(archive, path) as zf:
        return _read_nested(zf, parts[i:], path, _Budget(path, archive.stat().st_size))
