"""Thin series scored as ~5 mm slabs, the slice thickness the model learned from.

The training slices (RSNA 2019, PHE-SICH, PhysioNet) are about 5 mm thick; a thin reconstruction
(0.6 mm in CQ500) is noisier slice by slice and unlike them. A thick slice is the attenuation averaged
over its thickness, so the mean HU of consecutive thin slices over ~5 mm is the 5 mm slice the scanner
would have made. Scoring those means shows the model what it learned from, with ~8x fewer forward
passes. Measured on the normal CQ500-CT-0 (bundled model, 2-core CPU): 30 slabs instead of 238
slices, inference 6.6 -> 0.7 s; its score went 0.81 -> 0.89, still flagged, so that false positive is
not the thin slices' noise alone.

Only :mod:`numpy` here: the grouping is geometry, not model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["SLAB_MM", "THIN_MM", "median_step", "slab_of_slice", "slab_means"]

SLAB_MM = 5.0  # the training slices' thickness
THIN_MM = 2.5  # spacing under half a slab: slabbed. The same cut as ich.scope's "thin slices" warning.


def median_step(locations: Sequence[float] | np.ndarray) -> float | None:
    """The median step (mm) between sorted slice ``locations``, as :attr:`ich.dicom.Series.spacing` is
    computed; ``None`` for fewer than two slices."""
    return float(np.median(np.abs(np.diff(locations)))) if len(locations) > 1 else None


def slab_of_slice(locations: Sequence[float] | np.ndarray, spacing: float | None) -> np.ndarray | None:
    """Slab index (intp, ``(N,)``, 0, 0, ..., 1, 1, ...) of each slice, or ``None`` when not slabbed.

    ``locations`` are the slices' positions along the normal in mm, sorted (:attr:`ich.dicom.Slice.location`
    of a :class:`ich.dicom.Series`); ``spacing`` is the series' median step (:attr:`ich.dicom.Series.spacing`).
    Unknown spacing (no usable positions) or ``spacing >= THIN_MM`` is not slabbed: such slices are
    already what the model learned from, or cannot be placed.

    Each slice stands for ``spacing`` mm, so a slab starting at slice ``a`` takes every following slice
    while it stays no thicker than :data:`SLAB_MM`, to the nearest half step (``loc - loc[a] <
    SLAB_MM - spacing / 2``; 8 slices of 0.625 mm). Slabs are contiguous and go by position, not count:
    a missing slice leaves its slab a slice short, and a wide gap starts a new slab after it rather than
    averaging across it. The last slab is merged into the one before when both together span under
    1.5 slabs, i.e. when it is under half a slab and not beyond a gap: a 1 mm tail alone would be
    another thin slice, scored as noisily as before.
    """
    if spacing is None or not 0 < spacing < THIN_MM:
        return None
    loc = np.asarray(locations, dtype=np.float64)
    starts = [0]
    for i in range(1, len(loc)):
        if loc[i] - loc[starts[-1]] >= SLAB_MM - spacing / 2:
            starts.append(i)
    if len(starts) > 1 and loc[-1] - loc[starts[-2]] + spacing < 1.5 * SLAB_MM:
        starts.pop()
    first = np.zeros(len(loc), np.intp)
    first[starts[1:]] = 1
    return np.cumsum(first)


def slab_means(volume: Sequence[np.ndarray] | np.ndarray, slab_of_slice: np.ndarray) -> np.ndarray:
    """float32 ``(S, H, W)``: the mean HU of each slab's slices (``volume``: ``N`` HU slices ``(H, W)``).

    ``volume`` may be a list of the slices' own arrays, so a series is never stacked whole (238 slices of
    512x512 would be another 250 MB); only one slab's slices are copied at a time. Raises ``ValueError``
    when slices differ in size, as :meth:`ich.dicom.Series.volume` does.
    """
    out = np.empty((int(slab_of_slice.max()) + 1, *np.shape(volume[0])), np.float32)
    for k in range(len(out)):
        out[k] = np.mean([volume[i] for i in np.flatnonzero(slab_of_slice == k).tolist()], axis=0)
    return out
