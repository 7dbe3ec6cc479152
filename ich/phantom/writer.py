"""CT DICOM output of phantom studies in the RSNA layout.

Files (:func:`write_study`, :func:`write_dataset`) follow the RSNA 2019 layout::

    OUT/stage_2_train/<SOPInstanceUID>.dcm
    OUT/stage_2_train.csv          ID,Label with ID = <SOPInstanceUID>_<class>, six rows per slice
    OUT/masks/<SOPInstanceUID>.png optional: uint8 bitmask, bit i set = SUBTYPES[i] (epidural = bit 0)

Storage kinds (``bits``): ``"16"`` 16-bit signed, intercept 0, Explicit VR Little Endian;
``"12"`` 12-bit unsigned, intercept -1024, Implicit VR Little Endian (as many RSNA files);
``"wrapped"`` 12-bit unsigned holding HU modulo 4096 with intercept 0: the broken RSNA files that
need the "wrapped pixel" fix (stored = HU mod 4096; fixed HU = ((stored + 1000) mod 4096) - 1000),
which can only represent HU >= -1000, so air below -1000 is clipped there.
``jpeg=True`` writes **JPEG 2000 Lossless** (1.2.840.10008.1.2.4.90) through pylibjpeg-openjpeg:
pydicom 3 has no encoder for JPEG Lossless Process 14 (1.2.840.10008.1.2.4.70) and JPEG-LS needs
pyjpegls, which is not installed; JPEG 2000 Lossless is the best lossless JPEG-family syntax that
is encodable here (RLE Lossless is the other one).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)
from tqdm import tqdm

from ich.labels import CLASSES, INDEX_NAME, read_rsna_csv, write_rsna_csv
from ich.phantom.study import MATRIX, PhantomStudy, generate_study
from ich.windowing import BRAIN, SUBDURAL

WRAPPED_HU_MIN = -1000.0  # lowest HU the "wrapped" storage survives (see module docstring)
BITS_KINDS = ("16", "12", "wrapped")
DATASET_SEED_STRIDE = 1_000_000  # study i of write_dataset(seed) uses seed * stride + i


def _check_bits(bits: str) -> None:
    if bits not in BITS_KINDS:
        raise ValueError(f"bits must be one of {BITS_KINDS}, got {bits!r}")


def _stored_pixels(hu: np.ndarray, bits: str) -> tuple[np.ndarray, int, int, float]:
    """HU slice -> (stored array, BitsStored, PixelRepresentation, RescaleIntercept)."""
    if bits == "16":
        return hu.astype(np.int16), 16, 1, 0.0
    if bits == "12":
        return np.clip(hu + 1024, 0, 4095).astype(np.uint16), 12, 0, -1024.0
    # "wrapped", the broken RSNA files: HU modulo 4096 in 12 unsigned bits, intercept 0
    return np.mod(np.maximum(hu, WRAPPED_HU_MIN).astype(np.int32), 4096).astype(np.uint16), 12, 0, 0.0


def _ds_number(value: float) -> str:
    """A DS string (at most 16 characters)."""
    return f"{value:.6f}".rstrip("0").rstrip(".")[:16]


def _dataset(study: PhantomStudy, i: int, bits: str, jpeg: bool) -> Dataset:
    stored, bits_stored, representation, intercept = _stored_pixels(study.hu[i], bits)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(study.sop_uids[i])
    # Uncompressed 12-bit files are implicit VR, as many RSNA files are; the rest explicit VR.
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if bits != "16" else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = study.sop_uids[i]
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = study.series_uid
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Manufacturer = "ich.phantom"
    ds.StudyDescription = "CT HEAD WITHOUT CONTRAST (SYNTHETIC)"
    ds.SeriesDescription = "Synthetic head CT (phantom)"
    ds.BodyPartExamined = "HEAD"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = study.instance_numbers[i]
    ds.KVP = 120
    ds.SliceThickness = _ds_number(study.thickness)
    ds.SpacingBetweenSlices = _ds_number(study.thickness)
    ds.ImagePositionPatient = [_ds_number(v) for v in study.positions[i]]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = _ds_number(study.positions[i][2])
    ds.PixelSpacing = [_ds_number(v) for v in study.spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = representation
    ds.RescaleIntercept = _ds_number(intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    if study.seed % 2:  # real files carry one or several windows
        ds.WindowCenter = [_ds_number(BRAIN.level), _ds_number(SUBDURAL.level)]
        ds.WindowWidth = [_ds_number(BRAIN.width), _ds_number(SUBDURAL.width)]
    else:
        ds.WindowCenter = _ds_number(BRAIN.level)
        ds.WindowWidth = _ds_number(BRAIN.width)
    if jpeg:
        ds.compress(JPEG2000Lossless, stored, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    else:
        ds.PixelData = stored.tobytes()
    return ds


def _write_files(study: PhantomStudy, out: Path, bits: str, jpeg: bool, masks: bool) -> list[Path]:
    images = out / "stage_2_train"
    images.mkdir(parents=True, exist_ok=True)
    if masks:
        (out / "masks").mkdir(exist_ok=True)
    paths = []
    for i, sop in enumerate(study.sop_uids):
        path = images / f"{sop}.dcm"
        pydicom.dcmwrite(path, _dataset(study, i, bits, jpeg), enforce_file_format=True)
        paths.append(path)
        if masks and not cv2.imwrite(str(out / "masks" / f"{sop}.png"), study.masks[i]):
            raise OSError(f"could not write mask for {sop} under {out / 'masks'}")
    return paths


def write_study(
    study: PhantomStudy, out_dir: Path, *, bits: str = "16", jpeg: bool = False, masks: bool = False
) -> list[Path]:
    """Write one study in the RSNA layout under ``out_dir``; returns the DICOM paths (slice order).

    ``out_dir/stage_2_train/<SOPInstanceUID>.dcm``, its rows merged into
    ``out_dir/stage_2_train.csv`` (so several calls build one CSV), and with ``masks`` the
    bitmask PNGs ``out_dir/masks/<SOPInstanceUID>.png``. ``bits``: see :data:`BITS_KINDS`.
    """
    out_dir = Path(out_dir)
    _check_bits(bits)
    paths = _write_files(study, out_dir, bits, jpeg, masks)
    csv = out_dir / "stage_2_train.csv"
    labels = study.labels
    if csv.exists():
        previous = read_rsna_csv(csv)
        labels = pd.concat([previous.drop(labels.index, errors="ignore"), labels])
    write_rsna_csv(labels, csv)
    return paths


def write_dataset(
    out: Path,
    n_studies: int,
    seed: int,
    *,
    thickness: float = 5.0,
    bits: str = "mixed",
    jpeg: bool = False,
    masks: bool = False,
    progress: bool = True,
    n_slices: int | None = None,
    size: int = MATRIX,
) -> pd.DataFrame:
    """Generate and write ``n_studies`` studies in the RSNA layout under ``out``.

    Study ``i`` is ``generate_study(seed * DATASET_SEED_STRIDE + i)``, so datasets made with
    different seeds never share a study. ``bits="mixed"`` cycles 16-bit, 12-bit and wrapped
    storage over the studies. ``n_slices`` and ``size`` go to :func:`generate_study` (tests use
    small ones). Returns one row per slice: ``sop_uid, study_uid, series_uid,
    patient_id`` and the :data:`CLASSES` columns (the CSV holds the same labels).
    """
    if not 0 <= n_studies <= DATASET_SEED_STRIDE:
        raise ValueError(f"n_studies must be in [0, {DATASET_SEED_STRIDE}]")
    kinds = BITS_KINDS if bits == "mixed" else (bits,)
    _check_bits(kinds[0])  # before the long loop
    out = Path(out)
    rows = []
    for i in tqdm(range(n_studies), desc="phantom studies", unit="study", disable=not progress):
        study = generate_study(seed * DATASET_SEED_STRIDE + i, thickness=thickness, n_slices=n_slices, size=size)
        _write_files(study, out, kinds[i % len(kinds)], jpeg, masks)
        frame = study.labels.reset_index()
        frame.insert(1, "study_uid", study.study_uid)
        frame.insert(2, "series_uid", study.series_uid)
        frame.insert(3, "patient_id", study.patient_id)
        rows.append(frame)
    columns = [INDEX_NAME, "study_uid", "series_uid", "patient_id", *CLASSES]
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)
    out.mkdir(parents=True, exist_ok=True)
    write_rsna_csv(table.set_index(INDEX_NAME)[list(CLASSES)], out / "stage_2_train.csv")
    return table[columns]
