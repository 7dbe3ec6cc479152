"""Many sources into series: :func:`load` (everything at once) and :func:`iter_series` (one series at a time).

Series are grouped by (study, series) UID and sorted along the slice normal; every file that cannot
be used becomes a :class:`Problem` naming the file and the reason, and the rest still load. A slice that
differs from the rest of its series in size, pixel spacing or orientation is one too
(:func:`ich.dicom.series.consistent_geometry`): a series is never scored on mixed geometry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from ich.dicom.reader import read_file
from ich.dicom.series import DicomError, LoadResult, Problem, Series, Slice, consistent_geometry, sort_series
from ich.dicom.sources import Archives, Member, Source, Upload, iter_sources

log = logging.getLogger(__name__)


def load(
    sources: Iterable[Source] | Source,
    pixels: bool = True,
    progress: Callable[[int, str], None] | None = None,
) -> LoadResult:
    """Read every source into series grouped by (study, series) UID and sorted along the normal.

    Of a series whose slices differ in geometry, the largest consistent group is kept and every other
    slice becomes a problem. ``progress(count, name)`` is called after each file (for progress bars).
    """
    if isinstance(sources, (str, os.PathLike, Upload)):
        sources = [sources]
    groups: dict[tuple[str, str], list[Slice]] = {}
    problems: list[Problem] = []
    seen: set[tuple[str, str, str]] = set()
    count = 0
    for item in iter_sources(sources):
        if isinstance(item, Problem):
            problems.append(item)
            continue
        count += 1
        name = item.name if isinstance(item, Upload) else os.fspath(item)
        try:
            for s in read_file(item, pixels):
                key = (s.study_uid, s.series_uid, s.sop_uid)
                if key in seen:
                    problems.append(Problem(s.path, f"duplicate SOPInstanceUID {s.sop_uid}: already read, ignored"))
                    continue
                seen.add(key)
                groups.setdefault((s.study_uid, s.series_uid), []).append(s)
        except DicomError as exc:
            problems.append(Problem(exc.path, exc.reason, exc.other))
        if progress is not None:
            progress(count, name)
    series = []
    for (study, ser), slices in groups.items():
        kept, left_out = consistent_geometry(slices)
        problems += left_out
        series.append(sort_series(study, ser, kept))
    series.sort(key=lambda s: (s.study_uid, s.series_uid))
    return LoadResult(series, problems)


def iter_series(
    sources: Iterable[Source] | Source,
    problems: list[Problem],
    progress: Callable[[int, str], None] | None = None,
    select: Callable[[list[Series]], list[Series]] | None = None,
) -> Iterator[Series]:
    """Series with pixels, one at a time: headers of everything first, then each series' pixels.

    ``select(headers)``, given every series read headers-only, returns those whose pixels are wanted (an
    exam's scored series, :func:`ich.exam.choose_series`); the others are never decoded. It is called once the
    header pass's problems are in ``problems``, and may take some out: :class:`ich.exam.ExamRule` lists an exam's
    objects of another kind than a CT image (a dose SR: :class:`ich.dicom.OtherObject`) with its series instead.

    Files in folders are read again per series, and so are zip members (also zips inside folders, and
    zips inside zips), each from its archive (:class:`ich.dicom.sources.Archives`): a zip on disk, or
    an uploaded zip's own bytes; no member is held between the passes. Uploaded files are bytes already:
    they are kept, decoded one series at a time and let go once their series is read. So only one
    series' HU are in memory at a time. Every unreadable file is appended to ``problems``; a series none
    of whose pixels read is skipped.
    ``progress(count, name)`` is called after each file of the header pass.
    """
    if isinstance(sources, (str, os.PathLike, Upload)):
        sources = [sources]
    # Uploads and zip members by the name their slices carry. A browser sends bare file names and two
    # folders may both hold "1.dcm": a repeated name becomes "1.dcm (2)", so each name means one file.
    held: dict[str, Upload] = {}

    def expanded() -> Iterator[Source]:
        for item in iter_sources(sources):
            if isinstance(item, Problem):
                problems.append(item)
                continue
            if isinstance(item, Upload):
                name, k = item.name, 1
                while name in held:
                    k += 1
                    name = f"{item.name} ({k})"
                item = replace(item, name=name)
                # A zip member is read again from its archive: only an upload's own files are kept as bytes.
                held[name] = replace(item, data=b"") if isinstance(item, Member) else item
            yield item

    headers = load(expanded(), pixels=False, progress=progress)
    problems += headers.problems
    log.debug("headers read: %d series, %d problems", len(headers.series), len(headers.problems))
    wanted = headers.series if select is None else select(headers.series)
    for number, series in enumerate(wanted, 1):
        read: dict[str, list[Slice]] = {}  # a multi-frame file is read once for all its frames
        kept: list[Slice] = []
        with Archives() as archives:
            for s in series.slices:
                try:
                    if s.path not in read:
                        read[s.path] = _read_again(s.path, held, archives)
                    found = next((f for f in read[s.path] if f.sop_uid == s.sop_uid), None)
                    if found is None:
                        raise DicomError(s.path, "changed since its header was read")
                    kept.append(found)
                except DicomError as exc:
                    problems.append(Problem(exc.path, exc.reason))
        for path in read:
            held.pop(path, None)
        log.debug("series %d of %d: %d of %d slices read", number, len(wanted), len(kept), len(series))
        if kept:
            yield replace(series, slices=kept)


def _read_again(path: str, held: dict[str, Upload], archives: Archives) -> list[Slice]:
    """Every slice, with pixels, of the file a header-only slice came from."""
    item = held.get(path)
    if isinstance(item, Member):
        return read_file(replace(item, data=archives.read(item)))
    return read_file(path if item is None else item)
