"""NIfTI-1 bytes of a study for the browser viewer: int16 HU, and the heatmap as uint8.

DICOM gives positions in patient LPS; NIfTI's world is RAS, so the affine's first two axes flip. The
viewer then shows the patient's right on the screen's left (radiological convention) from the affine
alone, and its orientation letters are the scanner's, not a guess.
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np

__all__ = ["LPS_TO_RAS", "volume_nifti", "heatmap_nifti", "slice_axis"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
HEATMAP_SCALE = 255  # heatmap [0, 1] stored as uint8 0..255


def _nifti(data: np.ndarray, affine_lps: np.ndarray | None) -> bytes:
    """gzip-compressed NIfTI-1 of ``data`` ``(N, H, W)`` (slice, row, column) on the given voxel-to-LPS affine.

    Without an affine (a volume stored before one was kept) the voxels are 1 mm, axial, LPS-aligned.
    """
    affine = LPS_TO_RAS @ (np.eye(4) if affine_lps is None else np.asarray(affine_lps, np.float64))
    image = nib.Nifti1Image(np.ascontiguousarray(np.transpose(data, (2, 1, 0))), affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)  # scanner coordinates
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes(), compresslevel=1)  # CT air compresses well; level 1 is fast


def volume_nifti(hu: np.ndarray, affine_lps: np.ndarray | None) -> bytes:
    """The study's int16 HU ``(N, H, W)`` as ``.nii.gz`` bytes."""
    return _nifti(np.clip(np.rint(hu), -32768, 32767).astype(np.int16), affine_lps)


def heatmap_nifti(heatmap: np.ndarray, affine_lps: np.ndarray | None) -> bytes:
    """A study heatmap ``(N, H, W)`` in [0, 1] as uint8 ``.nii.gz`` bytes (0..255) on the volume's grid."""
    return _nifti(np.rint(np.clip(heatmap, 0.0, 1.0) * HEATMAP_SCALE).astype(np.uint8), affine_lps)


def slice_axis(affine_lps: np.ndarray | None, n_slices: int) -> tuple[list[float], list[float]]:
    """(unit normal in RAS, each slice's position along it in mm) for the NIfTI written from ``affine_lps``.

    The viewer finds the slice under its crosshair by this position, whatever order it keeps voxels in.
    The positions are the DICOM slice locations: flipping x and y flips both vectors of the dot product.
    """
    affine = LPS_TO_RAS @ (np.eye(4) if affine_lps is None else np.asarray(affine_lps, np.float64))
    step = affine[:3, 2]
    normal = step / np.linalg.norm(step)
    origins = affine[:3, 3] + np.outer(np.arange(n_slices), step)
    return normal.tolist(), (origins @ normal).tolist()
