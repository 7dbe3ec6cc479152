"""Build small CT datasets in memory for tests, so no DICOM file is ever committed."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def make_ct(
    hu: np.ndarray | None = None,
    *,
    z: float = 0.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    instance: int = 1,
    bits_stored: int = 16,
    intercept: float = -1024.0,
    **overrides,
) -> Dataset:
    """A minimal valid axial CT slice holding ``hu`` (default: a 32x32 disc of 30 HU in air)."""
    if hu is None:
        yy, xx = np.mgrid[:32, :32]
        hu = np.where((yy - 16) ** 2 + (xx - 16) ** 2 < 100, 30.0, -1000.0)
    raw = np.round(np.asarray(hu) - intercept)
    signed = bits_stored == 16
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "TEST-0001"
    ds.PatientName = "DOE^JANE"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 5.0
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 80
    ds.PixelData = raw.astype(np.int16 if signed else np.uint16).tobytes()
    for key, value in overrides.items():
        setattr(ds, key, value)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
