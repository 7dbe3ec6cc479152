"""Read head-CT DICOM into Hounsfield-unit series.

Sources are file paths, folders (walked recursively), ``.zip`` archives (read in memory, never
extracted) and :class:`Upload` objects (bytes with a file name, as a browser sends them). Every file
that cannot be used becomes a :class:`Problem` naming the file and the reason; the rest still load.

Only :mod:`numpy` and :mod:`pydicom` are needed here, so ``python -m ich info`` starts quickly.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

__all__ = [
    "Upload",
    "Problem",
    "DicomError",
    "Slice",
    "Series",
    "LoadResult",
    "read_slice",
    "read_file",
    "quiet_invalid_values",
    "iter_sources",
    "load",
    "iter_series",
    "read_member",
    "metadata_frame",
]

log = logging.getLogger(__name__)

# A lying header must not make us allocate gigabytes: no CT slice is larger than this.
MAX_DIM = 4096
MAX_FRAMES = 2048
# Zip-bomb guards: total inflated size and per-member compression ratio. DICOM compresses
# 2-5x in a zip; 200x only happens for crafted or empty data.
MAX_ARCHIVE_BYTES = 8 << 30
MAX_COMPRESSION_RATIO = 200
MAX_ZIP_DEPTH = 2
# Files a folder or archive of a study commonly holds beside the images; not worth a problem line.
SKIPPED_SUFFIXES = frozenset({".csv", ".txt", ".md", ".json", ".xml", ".html", ".png", ".jpg", ".jpeg", ".gif", ".pdf"})
SKIPPED_NAMES = frozenset({"DICOMDIR", ".DS_Store", "Thumbs.db"})

# The RSNA 2019 "wrapped pixel" files: 12-bit unsigned storage whose negative HU wrapped round 4096.
_WRAP_MODULUS = 4096
_WRAP_OFFSET = 1000

# Modalities that are not CT but are refused by name rather than as "unknown".
_MODALITY_NAMES = {
    "MR": "magnetic resonance",
    "US": "ultrasound",
    "CR": "computed radiography",
    "DX": "digital radiography",
    "XA": "X-ray angiography",
    "NM": "nuclear medicine",
    "PT": "PET",
    "MG": "mammography",
    "SR": "structured report",
    "PR": "presentation state",
    "SEG": "segmentation",
    "RTSTRUCT": "RT structure set",
    "RTPLAN": "RT plan",
    "RTDOSE": "RT dose",
    "RTIMAGE": "RT image",
    "KO": "key object selection",
    "DOC": "encapsulated document",
}
_IDENTIFYING = {
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "accession_number": "AccessionNumber",
    "institution_name": "InstitutionName",
}
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")


def quiet_invalid_values() -> None:
    """Let pydicom read invalid values (RSNA's UIDs like ``ID_30ea2b02d4``) without a warning each.

    This changes pydicom's reading validation for the whole process, so the library never calls
    it: the product's entry points do, once (``python -m ich``, the dashboard, ``train.prepare``
    and ``train.bundle``). Code that imports :mod:`ich` keeps pydicom's own validation.
    """
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


@dataclass(frozen=True)
class Upload:
    """A file's bytes with the name the user gave it (a browser upload or a zip member)."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Problem:
    """A file that could not be used, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class DicomError(ValueError):
    """A specific file cannot be used; ``reason`` says why in words a user can act on."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


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
            "wrapped": _is_wrapped(self.bits_stored, self.pixel_representation, self.intercept),
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


Source = str | os.PathLike | Upload


# --------------------------------------------------------------------------- parsing one file


def _parse(fp: Any, name: str, pixels: bool) -> Dataset:
    try:
        return pydicom.dcmread(fp, stop_before_pixels=not pixels)
    except InvalidDicomError:
        pass
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt headers; all become DicomError
        raise DicomError(name, f"truncated or corrupt DICOM header ({type(exc).__name__}: {exc})") from None
    # No DICM preamble: some exporters write a bare dataset. Accept only if it parses to an image.
    if hasattr(fp, "seek"):
        fp.seek(0)
    try:
        ds = pydicom.dcmread(fp, force=True, stop_before_pixels=not pixels)
        if "Rows" in ds and "SOPInstanceUID" in ds:
            return ds
    except Exception:  # noqa: BLE001 - forced parsing of a non-DICOM file fails in arbitrary ways
        pass
    raise DicomError(name, "not a DICOM file (no 'DICM' marker and no readable DICOM dataset)")


def _float(value: Any) -> float | None:
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        # WindowCenter/Width may hold several values (RSNA: "[00040, 00040]"): the first is the default.
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _vector(value: Any, n: int) -> np.ndarray | None:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _transfer_syntax(ds: Dataset) -> UID | None:
    """The file's TransferSyntaxUID, or ``None`` for a bare dataset without file meta."""
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return UID(str(syntax)) if syntax else None


def _check_kind(ds: Dataset, name: str, notes: list[str]) -> str:
    """Refuse what is not a greyscale CT image, by name."""
    sop_class = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    class_name = UID(str(sop_class)).name if sop_class else "unknown SOP class"
    modality = str(ds.get("Modality", "")).upper()
    if modality in _MODALITY_NAMES:
        raise DicomError(name, f"not a CT image: modality {modality} ({_MODALITY_NAMES[modality]}; {class_name})")
    if "PixelData" not in ds and "Rows" not in ds:
        if "Image Storage" in class_name:
            # pydicom stops quietly at end of file: an image object without its image header was cut short.
            raise DicomError(
                name, f"truncated file: {class_name} header ends before the image (no Rows/Columns/PixelData)"
            )
        raise DicomError(name, f"no pixel data: {class_name} is not an image")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in _COLOUR or int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomError(name, f"colour image ({photometric}, {class_name}): a head CT slice is greyscale")
    if modality == "OT":
        notes.append("secondary capture (modality OT): pixel values taken as Hounsfield units")
    elif modality not in ("CT", ""):
        raise DicomError(name, f"not a CT image: modality {modality} ({class_name})")
    return modality or "CT"


def _check_dimensions(ds: Dataset, name: str, pixels: bool) -> tuple[int, int, int]:
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not (0 < rows <= MAX_DIM and 0 < cols <= MAX_DIM) or not 0 < frames <= MAX_FRAMES:
        raise DicomError(
            name,
            f"impossible image dimensions (Rows={rows}, Columns={cols}, frames={frames}; limit {MAX_DIM}x{MAX_DIM})",
        )
    bits = int(ds.get("BitsAllocated", 16) or 16)
    if bits not in (8, 16, 32):
        raise DicomError(name, f"unsupported BitsAllocated={bits}")
    if pixels:
        if "PixelData" not in ds:
            raise DicomError(name, "no pixel data (the file has an image header but no PixelData element)")
        syntax = _transfer_syntax(ds)
        if syntax is None or not syntax.is_compressed:
            expected = rows * cols * frames * bits // 8
            found = len(ds.PixelData)
            if found < expected:
                raise DicomError(
                    name,
                    f"pixel data too short: {found} bytes for {rows}x{cols}x{frames} at {bits} bits ({expected} needed)",
                )
    return rows, cols, frames


def _rescale(src: Dataset, name: str) -> tuple[float, float]:
    """``(slope, intercept)`` of ``src`` (a file, or an enhanced CT frame's transformation item)."""
    slope = _float(src.get("RescaleSlope", 1))
    intercept = _float(src.get("RescaleIntercept", 0))
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    if not np.isfinite(slope) or not np.isfinite(intercept) or slope == 0 or abs(slope) > 1e3 or abs(intercept) > 1e5:
        raise DicomError(name, f"unusable rescale values (RescaleSlope={slope}, RescaleIntercept={intercept})")
    return slope, intercept


def _is_wrapped(bits_stored: int, pixel_representation: int, intercept: float) -> bool:
    return bits_stored == 12 and pixel_representation == 0 and intercept > -100


def _to_hu(raw: np.ndarray, slope: float, intercept: float, bits_stored: int, pixel_representation: int) -> np.ndarray:
    if _is_wrapped(bits_stored, pixel_representation, intercept):
        # Kaggle RSNA fix: shift so air is positive, undo the 12-bit wrap, fix the intercept.
        raw = (raw.astype(np.int32) + _WRAP_OFFSET) % _WRAP_MODULUS
        intercept = -float(_WRAP_OFFSET)
    hu = raw.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    hu += np.float32(intercept)
    return hu


def _decode(ds: Dataset, name: str) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - each pixel handler raises its own types; all become DicomError
        syntax = _transfer_syntax(ds)
        raise DicomError(name, f"cannot decode pixel data ({syntax.name if syntax else '?'}): {exc}") from None


def _frame_items(ds: Dataset, index: int, attr: str) -> Dataset | None:
    """The functional-group item for ``attr`` of frame ``index`` (per-frame first, then shared)."""
    for group in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(group)
        if not seq:
            continue
        item = seq[index] if group.startswith("PerFrame") and index < len(seq) else seq[0]
        inner = item.get(attr)
        if inner:
            return inner[0]
    return None


def read_file(source: Source, pixels: bool = True) -> list[Slice]:
    """Read one DICOM file into slices (one, or one per frame of a multi-frame object).

    Raises :class:`DicomError` naming the file for anything unusable.
    """
    name, fp = _open(source)
    if fp is None:
        raise DicomError(name, "empty file (0 bytes)")
    ds = _parse(fp, name, pixels)
    notes: list[str] = []
    modality = _check_kind(ds, name, notes)
    rows, cols, frames = _check_dimensions(ds, name, pixels)
    slope, intercept = _rescale(ds, name)
    bits_stored = int(ds.get("BitsStored", 16) or 16)
    pixel_representation = int(ds.get("PixelRepresentation", 0) or 0)
    if _is_wrapped(bits_stored, pixel_representation, intercept):
        notes.append("12-bit unsigned with wrapped pixels: RSNA wrap fix applied")

    syntax = _transfer_syntax(ds)
    spacing = _vector(ds.get("PixelSpacing", ()), 2)
    base: dict[str, Any] = dict(
        path=name,
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
        modality=modality,
        pixel_spacing=tuple(spacing) if spacing is not None else None,
        thickness=_float(ds.get("SliceThickness")),
        rows=rows,
        columns=cols,
        bits_stored=bits_stored,
        pixel_representation=pixel_representation,
        window_center=_float(ds.get("WindowCenter")),
        window_width=_float(ds.get("WindowWidth")),
        transfer_syntax=syntax.name if syntax else "unknown",
        identifiers={key: str(ds.get(tag, "") or "") for key, tag in _IDENTIFYING.items()},
    )
    sop = str(ds.get("SOPInstanceUID", "") or "") or name
    if not base["series_uid"]:
        notes.append("no SeriesInstanceUID: grouped on its own")
        base["series_uid"] = f"no-series:{name}"
    # MATLAB writes column-major arrays: its secondary captures come out transposed.
    transposed = modality == "OT" and str(ds.get("SecondaryCaptureDeviceManufacturerModelName", "")).upper() == "MATLAB"
    if transposed:
        notes.append("MATLAB export: image transposed back to radiological orientation")

    raw = _decode(ds, name) if pixels else None
    if frames == 1:
        hu = None if raw is None else _to_hu(raw, slope, intercept, bits_stored, pixel_representation)
        if hu is not None and transposed:
            hu = np.ascontiguousarray(hu.T)
        instance = ds.get("InstanceNumber")
        return [
            Slice(
                sop_uid=sop,
                instance_number=int(instance) if instance not in (None, "") else None,
                position=_vector(ds.get("ImagePositionPatient", ()), 3),
                orientation=_vector(ds.get("ImageOrientationPatient", ()), 6),
                slope=slope,
                intercept=intercept,
                notes=notes,
                hu=hu,
                **base,
            )
        ]
    return _split_frames(ds, name, raw, base, sop, notes)


def _split_frames(
    ds: Dataset, name: str, raw: np.ndarray | None, base: dict[str, Any], sop: str, notes: list[str]
) -> list[Slice]:
    """Enhanced (multi-frame) CT: one slice per frame, geometry from the functional groups."""
    frames = int(ds.NumberOfFrames)
    if raw is not None and raw.shape[0] != frames:
        raise DicomError(name, f"multi-frame pixel data holds {raw.shape[0]} frames, header says {frames}")
    out = []
    for i in range(frames):
        plane = _frame_items(ds, i, "PlanePositionSequence")
        orient = _frame_items(ds, i, "PlaneOrientationSequence")
        transform = _frame_items(ds, i, "PixelValueTransformationSequence")
        slope, intercept = _rescale(transform if transform is not None else ds, name)
        hu = (
            None if raw is None else _to_hu(raw[i], slope, intercept, base["bits_stored"], base["pixel_representation"])
        )
        out.append(
            Slice(
                sop_uid=f"{sop}[{i + 1}]",
                instance_number=i + 1,
                position=_vector(plane.get("ImagePositionPatient", ()), 3) if plane is not None else None,
                orientation=_vector(orient.get("ImageOrientationPatient", ()), 6) if orient is not None else None,
                slope=slope,
                intercept=intercept,
                notes=[*notes, f"multi-frame object split into {frames} frames"],
                hu=hu,
                **base,
            )
        )
    return out


def read_slice(source: Source, pixels: bool = True) -> Slice:
    """Read a single-frame DICOM file; a multi-frame file raises :class:`DicomError` (use :func:`read_file`)."""
    slices = read_file(source, pixels)
    if len(slices) != 1:
        raise DicomError(slices[0].path, f"multi-frame object with {len(slices)} frames: read it with read_file()")
    return slices[0]


def _open(source: Source) -> tuple[str, Any]:
    """``(display name, file object or path)``; ``None`` as the file for an empty file."""
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


# --------------------------------------------------------------------------- many sources


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


def _sort_series(study_uid: str, series_uid: str, slices: list[Slice]) -> Series:
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
        reference = normals[0]
        if any(abs(float(n @ reference)) < 0.99 for n in normals):
            notes.append("slices have different orientations")
        keys = [float(np.dot(p, reference)) for p in positions]
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


def load(
    sources: Iterable[Source] | Source,
    pixels: bool = True,
    progress: Callable[[int, str], None] | None = None,
) -> LoadResult:
    """Read every source into series grouped by (study, series) UID and sorted along the normal.

    ``progress(count, name)`` is called after each file (for progress bars).
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
            problems.append(Problem(exc.path, exc.reason))
        if progress is not None:
            progress(count, name)
    series = [_sort_series(study, ser, slices) for (study, ser), slices in groups.items()]
    series.sort(key=lambda s: (s.study_uid, s.series_uid))
    return LoadResult(series, problems)


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


def iter_series(
    sources: Iterable[Source] | Source,
    problems: list[Problem],
    progress: Callable[[int, str], None] | None = None,
) -> Iterator[Series]:
    """Series with pixels, one at a time: headers of everything first, then each series' pixels.

    Files in folders and zip archives on disk (also zips inside folders, and zips inside zips) are
    read again per series, zip members from their archive (:func:`read_member`). Uploads (and the
    members of uploaded zips) are bytes already: they are kept as bytes, decoded one series at a
    time and let go once their series is read. So only one series' HU are in memory at a time. Every
    unreadable file is appended to ``problems``; a series none of whose pixels read is skipped.
    ``progress(count, name)`` is called after each file of the header pass.
    """
    if isinstance(sources, (str, os.PathLike, Upload)):
        sources = [sources]
    # Uploaded bytes by the name their slices carry. A browser sends bare file names and two folders
    # may both hold "1.dcm": a repeated name becomes "1.dcm (2)", so each name means one upload.
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
                item = held[name] = Upload(name, item.data)
            yield item

    headers = load(expanded(), pixels=False, progress=progress)
    problems += headers.problems
    log.info("headers read: %d series, %d problems", len(headers.series), len(headers.problems))
    for number, series in enumerate(headers.series, 1):
        read: dict[str, list[Slice]] = {}  # a multi-frame file is read once for all its frames
        kept: list[Slice] = []
        for s in series.slices:
            try:
                if s.path not in read:
                    read[s.path] = _read_again(s.path, held)
                found = next((f for f in read[s.path] if f.sop_uid == s.sop_uid), None)
                if found is None:
                    raise DicomError(s.path, "changed since its header was read")
                kept.append(found)
            except DicomError as exc:
                problems.append(Problem(exc.path, exc.reason))
        for path in read:
            held.pop(path, None)
        log.debug("series %d of %d: %d of %d slices read", number, len(headers.series), len(kept), len(series))
        if kept:
            yield replace(series, slices=kept)


def _read_again(path: str, held: dict[str, Upload]) -> list[Slice]:
    """Every slice, with pixels, of the file a header-only slice came from."""
    if path in held:
        return read_file(held[path])
    return read_file(path if Path(path).is_file() else Upload(path, read_member(path)))


# --------------------------------------------------------------------------- metadata


def metadata_frame(sources: Iterable[Source] | Source | LoadResult, identifiers: bool = False):
    """One row per slice of header fields (no pixels decoded) as a pandas DataFrame.

    Patient-identifying columns (``patient_id``, name, birth date, accession, institution) are left
    out unless ``identifiers=True``.
    """
    import pandas as pd  # imported here so `ich info` stays light

    result = sources if isinstance(sources, LoadResult) else load(sources, pixels=False)
    rows = []
    for series in result.series:
        for index, s in enumerate(series.slices):
            row = {"path": s.path, "slice_index": index, **s.header_row()}
            if identifiers:
                row.update(patient_id=s.patient_id, **s.identifiers)
            rows.append(row)
    return pd.DataFrame(rows)
