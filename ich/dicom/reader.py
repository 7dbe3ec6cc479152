"""Parse one DICOM file into Hounsfield-unit slices.

Header checks refuse, by name, what is not a greyscale CT image and what a lying header would make
us allocate; a Deflated-syntax file is inflated under the zip limits of :mod:`.sources` (at most
``MAX_COMPRESSION_RATIO`` times its size and ``MAX_FILE_BYTES``), counted in chunks before pydicom
inflates it whole. Pixels are decoded by pydicom and converted to HU (with the RSNA 12-bit wrap fix),
and a multi-frame (enhanced) CT object is split into one slice per frame. Anything unusable raises a
:class:`DicomError` naming the file.
"""

from __future__ import annotations

import io
import zlib
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from ich.dicom.series import DicomError, OtherObject, Slice, is_wrapped
from ich.dicom.sources import MAX_COMPRESSION_RATIO, MAX_FILE_BYTES, READ_CHUNK, Source, open_source, size_text

# A lying header must not make us allocate gigabytes: no CT slice is larger than this.
MAX_DIM = 4096
MAX_FRAMES = 2048
HEADER_DEFER_BYTES = 4096  # values above this stay unread in a header-only pass (the pixel data)
PIXEL_DATA = 0x7FE00010
_INFLATE_INPUT = 1 << 16  # compressed bytes fed per step while counting a Deflated dataset

# Undoing the RSNA 2019 wrap (see :func:`ich.dicom.series.is_wrapped`): shift by the offset, modulo 4096.
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
# CT, Enhanced CT and Legacy Converted Enhanced CT Image Storage: a colour one is a damaged CT image, not another object.
_CT_CLASSES = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")


def quiet_invalid_values() -> None:
    """Let pydicom read invalid values (RSNA's UIDs like ``ID_30ea2b02d4``) without a warning each.

    This changes pydicom's reading validation for the whole process, so the library never calls
    it: the product's entry points do, once (``python -m ich``, the dashboard, ``train.prepare``
    and ``train.bundle``). Code that imports :mod:`ich` keeps pydicom's own validation.
    """
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def _deflated_start(fp: io.BytesIO) -> int | None:
    """Where a Deflated Explicit VR Little Endian file's dataset starts; ``None`` for any other file."""
    try:
        read_preamble(fp, force=True)  # pydicom reads the file meta of a file without a preamble too
        # pydicom's public read_file_meta_info takes a path only; this is what it calls on the open file.
        syntax = _read_file_meta_info(fp).get("TransferSyntaxUID")
        start = fp.tell()
    except Exception:  # noqa: BLE001 - an unreadable header is reported, by name, by the parse that follows
        return None
    finally:
        fp.seek(0)
    return start if syntax == DeflatedExplicitVRLittleEndian else None


def _check_deflated(fp: io.BytesIO, name: str) -> None:
    """Refuse a Deflated-syntax file inflating past the limits: pydicom would inflate it whole, unbounded."""
    start = _deflated_start(fp)
    if start is None:
        return
    data = fp.getvalue()
    compressed = len(data) - start
    limit = min(MAX_FILE_BYTES, MAX_COMPRESSION_RATIO * max(compressed, 1))
    inflater, inflated = zlib.decompressobj(-zlib.MAX_WBITS), 0
    try:
        for offset in range(start, len(data), _INFLATE_INPUT):
            chunk = data[offset : offset + _INFLATE_INPUT]
            while chunk and not inflater.eof:
                inflated += len(inflater.decompress(chunk, READ_CHUNK))  # max_length: never more than a chunk
                if inflated > limit:
                    raise DicomError(
                        name,
                        f"decompression bomb suspected: Deflated dataset inflates past {size_text(limit)} "
                        f"(limit {MAX_COMPRESSION_RATIO}x its {size_text(compressed)}, "
                        f"at most {size_text(MAX_FILE_BYTES)})",
                    )
                chunk = inflater.unconsumed_tail
    except zlib.error as exc:
        raise DicomError(name, f"corrupt Deflated dataset ({exc})") from None


def _parse(fp: Any, name: str, pixels: bool) -> Dataset:
    _check_deflated(fp, name)
    # Headers only: large values (the pixel data) are left unread, but their length is still known,
    # so a file whose pixel data is missing or cut short is reported without decoding an image.
    defer = None if pixels else HEADER_DEFER_BYTES
    try:
        return pydicom.dcmread(fp, defer_size=defer)
    except InvalidDicomError:
        pass
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt headers; all become DicomError
        raise DicomError(name, f"truncated or corrupt DICOM header ({type(exc).__name__}: {exc})") from None
    # No DICM preamble: some exporters write a bare dataset. Accept only if it parses to an image.
    if hasattr(fp, "seek"):
        fp.seek(0)
    try:
        ds = pydicom.dcmread(fp, force=True, defer_size=defer)
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


def _strings(value: Any) -> tuple[str, ...]:
    """A multi-valued string element (one value comes back from pydicom as a bare string)."""
    if value is None or value == "":
        return ()
    values = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip() for v in values)


def _int(value: Any) -> int | None:
    try:
        return int(value)
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


def _sop_class(ds: Dataset) -> str:
    return str(ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None) or "")


def _class_name(sop_class: str) -> str:
    return UID(sop_class).name if sop_class else "unknown SOP class"


def other_object(ds: Dataset, sop_class: str | None = None) -> OtherObject:
    """What an object of another kind than a CT image says of itself, to be listed with its exam's series (an
    upload's file, or an instance the DICOM listener set aside: ``sop_class`` as its C-STORE request named it)."""
    sop_class = sop_class or _sop_class(ds)
    return OtherObject(
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        number=_int(ds.get("SeriesNumber")),
        description=str(ds.get("SeriesDescription", "") or ""),
        modality=str(ds.get("Modality", "") or "").strip().upper(),
        sop_class=sop_class,
        sop_class_name=_class_name(sop_class),
    )


def _check_kind(ds: Dataset, name: str, notes: list[str]) -> str:
    """Refuse what is not a greyscale CT image, by name. An object of another kind (another modality, not an
    image, a colour image of a class other than CT's) carries what it is (:class:`OtherObject`); a damaged CT
    image does not."""
    sop_class = _sop_class(ds)
    class_name = _class_name(sop_class)
    modality = str(ds.get("Modality", "")).upper()
    if modality in _MODALITY_NAMES:
        raise DicomError(
            name,
            f"not a CT image: modality {modality} ({_MODALITY_NAMES[modality]}; {class_name})",
            other_object(ds),
        )
    if "PixelData" not in ds and "Rows" not in ds:
        if "Image Storage" in class_name:
            # pydicom stops quietly at end of file: an image object without its image header was cut short.
            raise DicomError(
                name, f"truncated file: {class_name} header ends before the image (no Rows/Columns/PixelData)"
            )
        raise DicomError(name, f"no pixel data: {class_name} is not an image", other_object(ds))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric in _COLOUR or int(ds.get("SamplesPerPixel", 1)) != 1:
        other = other_object(ds) if sop_class and sop_class not in _CT_CLASSES else None
        raise DicomError(name, f"colour image ({photometric}, {class_name}): a head CT slice is greyscale", other)
    if modality == "OT":
        notes.append("secondary capture (modality OT): pixel values taken as Hounsfield units")
    elif modality not in ("CT", ""):
        raise DicomError(name, f"not a CT image: modality {modality} ({class_name})", other_object(ds))
    return modality or "CT"


def _pixel_bytes(ds: Dataset, fp: io.BytesIO) -> int:
    """Bytes of pixel data the file really holds (a deferred value is measured against the file's end)."""
    element = ds.get_item("PixelData")
    if isinstance(element, RawDataElement) and element.value is None and element.value_tell is not None:
        return max(0, min(element.length, fp.getbuffer().nbytes - element.value_tell))
    return len(element.value or b"")


def _check_dimensions(ds: Dataset, name: str, fp: io.BytesIO) -> tuple[int, int, int]:
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
    if "PixelData" not in ds:
        raise DicomError(name, "no pixel data (the file has an image header but no PixelData element)")
    syntax = _transfer_syntax(ds)
    if syntax is None or not syntax.is_compressed:  # compressed frames have no length to expect
        expected = rows * cols * frames * bits // 8
        found = _pixel_bytes(ds, fp)
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


def _to_hu(raw: np.ndarray, slope: float, intercept: float, bits_stored: int, pixel_representation: int) -> np.ndarray:
    if is_wrapped(bits_stored, pixel_representation, intercept):
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


def _header(ds: Dataset) -> Dataset:
    """The header without its pixel data, in a new dataset: ``ds`` itself holds the whole file's bytes."""
    header = Dataset({tag: element for tag, element in ds.items() if tag != PIXEL_DATA})
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    return header


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
    name, fp = open_source(source)
    if fp is None:
        raise DicomError(name, "empty file (0 bytes)")
    ds = _parse(fp, name, pixels)
    notes: list[str] = []
    modality = _check_kind(ds, name, notes)
    rows, cols, frames = _check_dimensions(ds, name, fp)
    slope, intercept = _rescale(ds, name)
    bits_stored = int(ds.get("BitsStored", 16) or 16)
    pixel_representation = int(ds.get("PixelRepresentation", 0) or 0)
    if is_wrapped(bits_stored, pixel_representation, intercept):
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
        study_date=str(ds.get("StudyDate", "") or ""),
        study_time=str(ds.get("StudyTime", "") or ""),
        study_description=str(ds.get("StudyDescription", "") or ""),
        series_description=str(ds.get("SeriesDescription", "") or ""),
        contrast_agent=str(ds.get("ContrastBolusAgent", "") or ""),
        patient_age=str(ds.get("PatientAge", "") or ""),
        image_type=tuple(v.upper() for v in _strings(ds.get("ImageType"))),
        kernel="\\".join(_strings(ds.get("ConvolutionKernel"))),
        sop_class_uid=_sop_class(ds),
        series_number=_int(ds.get("SeriesNumber")),
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
    if raw is not None:
        base["header"] = _header(ds)
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
