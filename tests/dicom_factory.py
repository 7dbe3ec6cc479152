"""Build small CT datasets in memory for tests, so no DICOM file is ever committed."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

MiB = 1 << 20


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


def deflated(pixel_bytes: int, hu: np.ndarray | None = None) -> bytes:
    """A Deflated Explicit VR Little Endian CT file whose PixelData holds ``pixel_bytes`` zeros (or ``hu``).

    Zeros are deflated once per 16 MiB block, flushed so that the block can be repeated: gigabytes of
    pixel data cost milliseconds and a few MB.
    """
    ds = make_ct(hu)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    if hu is not None:
        return to_bytes(ds)
    del ds.PixelData
    meta, body = DicomBytesIO(), DicomBytesIO()
    for fp in (meta, body):
        fp.is_little_endian, fp.is_implicit_VR = True, False
    meta.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(meta, ds.file_meta)
    write_dataset(body, ds)
    block = 16 * MiB
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = deflate.compress(body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))
    head += deflate.flush(zlib.Z_FULL_FLUSH)
    zeros = deflate.compress(bytes(block)) + deflate.flush(zlib.Z_FULL_FLUSH)
    rest = deflate.compress(bytes(pixel_bytes % block)) + deflate.flush()
    return meta.getvalue() + head + zeros * (pixel_bytes // block) + rest


def make_enhanced_ct(
    n_frames: int = 4,
    *,
    frames: np.ndarray | None = None,
    spacing: float = 5.0,
    series_uid: str | None = None,
    study_uid: str | None = None,
    **overrides,
) -> Dataset:
    """An Enhanced CT (multi-frame) object of ``n_frames`` axial frames ``spacing`` mm apart, each the
    :func:`make_ct` disc (or the HU ``frames``, ``(n, H, W)``), its geometry and rescale in the functional groups
    as the standard puts them."""
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedCTImageStorage

    ds = make_ct(None if frames is None else frames[0], series_uid=series_uid, study_uid=study_uid)
    if frames is not None:
        n_frames = len(frames)
    pixels = np.tile(np.frombuffer(ds.PixelData, np.int16), n_frames) if frames is None else frames + 1024
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    ds.NumberOfFrames = n_frames
    ds.PixelData = np.asarray(pixels, np.int16).tobytes()
    del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.RescaleIntercept, ds.RescaleSlope
    per_frame = []
    for i in range(n_frames):
        item, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = [0.0, 0.0, spacing * i]
        item.PlanePositionSequence = Sequence([plane])
        per_frame.append(item)
    shared, orient, transform = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = Sequence([orient])
    transform.RescaleSlope, transform.RescaleIntercept = 1, -1024
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    for key, value in overrides.items():
        setattr(ds, key, value)
    return ds


def make_non_image(sop_class: str, modality: str, *, study_uid: str | None = None, **overrides) -> Dataset:
    """An instance of another storage class (a dose SR, a structured report) in a CT exam: :func:`make_ct`'s
    identifiers without its image, as far as a Storage SCP that sets it aside needs."""
    from pydicom.uid import UID

    ds = make_ct(study_uid=study_uid, Modality=modality, **overrides)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    for keyword in ("PixelData", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
                    "BitsStored", "HighBit", "PixelRepresentation", "RescaleIntercept", "RescaleSlope", "WindowCenter",
                    "WindowWidth", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):  # fmt: skip
        delattr(ds, keyword)
    return ds
