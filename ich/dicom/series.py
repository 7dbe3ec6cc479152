"""What reading DICOM produces: slices, series sorted along the slice normal, and problems.

Every file that cannot be used becomes a :class:`Problem` naming the file and the reason (a
:class:`DicomError` while it is being read); the rest still load. So does every slice that differs
from the rest of its series in size, pixel spacing or orientation (:func:`consistent_geometry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

# Slices of one series further apart than this are not one volume (:func:`consistent_geometry`).
SPACING_TOLERANCE = 1e-3  # relative: the same spacing written to different precision
ORIENTATION_TOLERANCE = 1e-2  # direction cosines: about half a degree


@dataclass(frozen=True)
class OtherObject:
    """What a file refused as not a CT image (a dose or other structured report, a secondary capture in colour,
    an MR image) said of itself in its header: enough to list it with its exam's series instead of as a problem
    line (:class:`ich.exam.ExamRule`, :func:`ich.exam.set_aside`). The UIDs group it; none is ever shown."""

    study_uid: str
    series_uid: str
    sop_uid: str  # '' where the header holds none
    number: int | None  # SeriesNumber
    description: str  # SeriesDescription
    modality: str
    sop_class: str
    sop_class_name: str


@dataclass(frozen=True)
class Problem:
    """A file that could not be used, and why; ``other`` where the file is an object of another kind than a CT
    image (:class:`OtherObject`), not compared and not shown (it holds UIDs)."""

    path: str
    reason: str
    other: OtherObject | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class DicomError(ValueError):
    """A specific file cannot be used; ``reason`` says why in words a user can act on. ``other``: what the file
    is, where it is an object of another kind than a CT image (:class:`OtherObject`)."""

    def __init__(self, path: str, reason: str, other: OtherObject | None = None) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.other = other


def is_wrapped(bits_stored: int, pixel_representation: int, intercept: float) -> bool:
    """An RSNA 2019 "wrapped pixel" file: 12-bit unsigned storage whose negative HU wrapped round 4096."""
    return bits_stored == 12 and pixel_representation == 0 and intercept > -100


@dataclass
class Slice:
    """One 2-D image with the header fields the rest of the product uses."""

    path: str
    sop_uid: str
    study_uid: str
    series_uid: str
    patient_id: str
    modality: str
    instance_number: int | None
    position: np.ndarray | None  # ImagePositionPatient, mm
    orientation: np.ndarray | None  # ImageOrientationPatient, 6 direction cosines
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    rows: int
    columns: int
    bits_stored: int
    pixel_representation: int
    slope: float
    intercept: float
    window_center: float | None
    window_width: float | None
    transfer_syntax: str
    notes: list[str] = field(default_factory=list)
    hu: np.ndarray | None = None  # float32 (rows, columns); None when read without pixels
    # Patient name, birth date, accession, institution: kept off every default output and log.
    identifiers: dict[str, str] = field(default_factory=dict, repr=False)
    # What a worklist shows of the exam (no patient identifier): when, and what was asked for.
    study_date: str = ""  # StudyDate, YYYYMMDD
    study_time: str = ""  # StudyTime, HHMMSS(.ffffff)
    study_description: str = ""
    series_description: str = ""
    # What says whether a scan is like the ones the model learned from (see ich.scope).
    contrast_agent: str = ""  # ContrastBolusAgent
    patient_age: str = field(default="", repr=False)  # PatientAge, e.g. "045Y"
    # What tells the series of one exam apart (scout, bone kernel, reformat, dose page): see ich.exam.
    image_type: tuple[str, ...] = ()  # ImageType values, upper-cased
    kernel: str = ""  # ConvolutionKernel; several values joined with "\\"
    sop_class_uid: str = ""
    series_number: int | None = None  # SeriesNumber
    # The file's header without its pixel data (read with pixels only): what results sent back to PACS copy.
    header: Dataset | None = field(default=None, repr=False, compare=False)

    @property
    def pixels(self) -> np.ndarray:
        """The HU array; ``ValueError`` when the slice was read headers-only."""
        if self.hu is None:
            raise ValueError(f"{self.path}: read without pixel data")
        return self.hu

    def header_row(self) -> dict[str, Any]:
        """The header fields as one flat, identifier-free record (a DataFrame row)."""
        pos = self.position if self.position is not None else np.full(3, np.nan)
        return {
            "sop_uid": self.sop_uid,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "modality": self.modality,
            "instance_number": self.instance_number,
            "location": self.location,
            "pos_x": pos[0],
            "pos_y": pos[1],
            "pos_z": pos[2],
            "rows": self.rows,
            "columns": self.columns,
            "pixel_spacing": None if self.pixel_spacing is None else self.pixel_spacing[0],
            "thickness": self.thickness,
            "bits_stored": self.bits_stored,
            "pixel_representation": self.pixel_representation,
            "rescale_slope": self.slope,
            "rescale_intercept": self.intercept,
            "window_center": self.window_center,
            "window_width": self.window_width,
            "transfer_syntax": self.transfer_syntax,
            "wrapped": is_wrapped(self.bits_stored, self.pixel_representation, self.intercept),
        }

    @property
    def normal(self) -> np.ndarray | None:
        if self.orientation is None:
            return None
        return np.cross(self.orientation[:3], self.orientation[3:])

    @property
    def location(self) -> float | None:
        """Position along the slice normal (mm): the sort key for a series."""
        if self.position is None or self.normal is None:
            return None
        return float(self.position @ self.normal)


@dataclass
class Series:
    """The slices of one (study, series), sorted from the first position along the normal."""

    study_uid: str
    series_uid: str
    slices: list[Slice]
    spacing: float | None = None
    duplicates: int = 0  # consecutive slices at the same position
    gaps: int = 0  # steps over 1.5x the median spacing
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.slices)

    @property
    def modality(self) -> str:
        return self.slices[0].modality

    @property
    def patient_id(self) -> str:
        return self.slices[0].patient_id

    @property
    def thickness(self) -> float | None:
        return self.slices[0].thickness

    @property
    def sop_uids(self) -> list[str]:
        return [s.sop_uid for s in self.slices]

    def locations(self) -> np.ndarray | None:
        """float64 ``(N,)``: each slice's position along its normal (mm), or ``None`` when one has none."""
        found = [s.location for s in self.slices]
        return None if any(x is None for x in found) else np.asarray(found, np.float64)

    def affine(self) -> np.ndarray | None:
        """4x4 from voxel (column, row, slice) to patient LPS mm, or ``None`` without position,
        orientation and pixel spacing. The slice step is the mean step first to last, so a gap shows."""
        first, last = self.slices[0], self.slices[-1]
        if first.position is None or first.orientation is None or first.pixel_spacing is None:
            return None
        row_spacing, column_spacing = first.pixel_spacing
        if len(self) > 1 and last.position is not None:
            step = (last.position - first.position) / (len(self) - 1)
        else:
            normal = first.normal if first.normal is not None else np.array([0.0, 0.0, 1.0])
            step = normal * (self.spacing or first.thickness or 1.0)
        affine = np.eye(4)
        affine[:3, 0] = first.orientation[:3] * column_spacing  # along a row: the next column
        affine[:3, 1] = first.orientation[3:] * row_spacing
        affine[:3, 2] = step
        affine[:3, 3] = first.position
        return affine

    def volume(self) -> np.ndarray:
        """float32 ``(N, H, W)`` HU. Raises ``ValueError`` if slices differ in size or lack pixels."""
        pixels = [s.pixels for s in self.slices]
        shapes = {p.shape for p in pixels}
        if len(shapes) != 1:
            raise ValueError(f"series {self.series_uid} mixes image sizes {sorted(shapes)}")
        return np.stack(pixels)

    def summary(self) -> dict[str, Any]:
        """JSON-ready description without patient identifiers."""
        first = self.slices[0]
        return {
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "modality": self.modality,
            "slices": len(self),
            "rows": first.rows,
            "columns": first.columns,
            "pixel_spacing": list(first.pixel_spacing) if first.pixel_spacing else None,
            "spacing": None if self.spacing is None else round(self.spacing, 3),
            "thickness": self.thickness,
            "bits_stored": sorted({s.bits_stored for s in self.slices}),
            "transfer_syntaxes": sorted({s.transfer_syntax for s in self.slices}),
            "ordered_by": "position" if all(s.location is not None for s in self.slices) else "instance number",
            "duplicate_positions": self.duplicates,
            "gaps": self.gaps,
            "notes": list(self.notes),
        }


@dataclass
class LoadResult:
    series: list[Series]
    problems: list[Problem]


def _close(a: Any, b: Any, rtol: float = 0.0, atol: float = 0.0) -> bool:
    """Two optional vectors alike (both missing counts as alike)."""
    if a is None or b is None:
        return a is None and b is None
    return bool(np.allclose(a, b, rtol=rtol, atol=atol))


def _numbers(values: Any, sep: str) -> str:
    return sep.join(f"{v + 0.0:.4g}" for v in values)  # + 0.0: no "-0"


def _difference(s: Slice, ref: Slice) -> str:
    """How ``s`` differs from ``ref`` in size, pixel spacing and orientation ('' when it does not)."""
    found = []
    if (s.rows, s.columns) != (ref.rows, ref.columns):
        found.append(f"{s.rows}x{s.columns} vs {ref.rows}x{ref.columns}")
    if not _close(s.pixel_spacing, ref.pixel_spacing, rtol=SPACING_TOLERANCE):
        a, b = (f"{_numbers(x.pixel_spacing, 'x')} mm" if x.pixel_spacing else "none" for x in (s, ref))
        found.append(f"pixel spacing {a} vs {b}")
    if not _close(s.orientation, ref.orientation, atol=ORIENTATION_TOLERANCE):
        a, b = (f"({_numbers(x.orientation, ', ')})" if x.orientation is not None else "none" for x in (s, ref))
        found.append(f"orientation {a} vs {b}")
    return "; ".join(found)


def consistent_geometry(slices: list[Slice]) -> tuple[list[Slice], list[Problem]]:
    """The largest group of ``slices`` (of one series) alike in size, pixel spacing and orientation, and a
    problem for each other slice, saying how it differs.

    The others are left out, not made series of their own: those would share the series' Series Instance
    UID, by which an exam's series are chosen (:func:`ich.exam.choose_series`) and stored on the worklist.
    A tie goes to the group read first.
    """
    groups: list[list[Slice]] = []
    for s in slices:
        group = next((g for g in groups if not _difference(s, g[0])), None)
        if group is None:
            groups.append([s])
        else:
            group.append(s)
    kept = max(groups, key=len)
    problems = [
        Problem(s.path, f"slice differs from the rest of its series: {_difference(s, kept[0])}")
        for group in groups
        if group is not kept
        for s in group
    ]
    return kept, problems


def sort_series(study_uid: str, series_uid: str, slices: list[Slice]) -> Series:
    """The slices of one (study, series) as a :class:`Series`: sorted along the normal, spacing, gaps, notes.

    The slices share one orientation (:func:`consistent_geometry`): the first one's normal orders them.
    """
    notes: list[str] = []
    slice_notes: dict[str, int] = {}
    for s in slices:
        for note in s.notes:
            slice_notes[note] = slice_notes.get(note, 0) + 1
    normals = [s.normal for s in slices if s.normal is not None]
    positions = [s.position for s in slices if s.position is not None]
    keys: list[float]
    if len(slices) == 1:
        keys = [0.0]
    elif len(normals) == len(positions) == len(slices):
        keys = [float(np.dot(p, normals[0])) for p in positions]
    else:
        notes.append("no usable ImagePositionPatient/ImageOrientationPatient: sorted by InstanceNumber")
        keys = [float(s.instance_number) if s.instance_number is not None else float(i) for i, s in enumerate(slices)]
    order = np.argsort(np.asarray(keys), kind="stable")
    slices = [slices[i] for i in order]
    sorted_keys = np.asarray(keys)[order]
    spacing, duplicates, gap_count = None, 0, 0
    if len(slices) > 1 and not notes:
        steps = np.diff(sorted_keys)
        spacing = float(np.median(steps))
        dup = np.flatnonzero(steps < 1e-3)
        duplicates = int(dup.size)
        if dup.size:
            notes.append(f"{dup.size} duplicate slice position(s), first at slice {int(dup[0]) + 1}")
        if spacing > 0:
            gaps = np.flatnonzero(steps > 1.5 * spacing)
            gap_count = int(gaps.size)
            for g in gaps[:5]:
                notes.append(f"gap of {steps[g]:.2f} mm after slice {int(g) + 1} (spacing {spacing:.2f} mm)")
            if len(gaps) > 5:
                notes.append(f"... {len(gaps) - 5} more gaps")
            uneven = np.abs(steps - spacing) > 0.1 * spacing
            if uneven.any() and not gaps.size and not dup.size:
                notes.append("uneven slice spacing")
    notes += [note if n == len(slices) else f"{note} ({n} of {len(slices)} slices)" for note, n in slice_notes.items()]
    return Series(study_uid, series_uid, slices, spacing, duplicates, gap_count, notes)
