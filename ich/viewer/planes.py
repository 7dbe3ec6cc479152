"""What the viewer steps through: a series' own slices, or a thin series as the ~5 mm slabs the model scored.

A thin series (0.6 mm, 238 slices) is scored on slab means (:mod:`ich.slabs`); its slices in one slab share
the slab's probabilities. Shown as slabs by default, the reader sees what the model saw, the gallery shows
six different slabs rather than six neighbours of one, and the browser holds an eighth of the voxels: it
loads and re-windows in software WebGL within the reading room's patience (issue 25). The thin slices stay
one toggle away. Streamlit-free: the dashboard maps between plane and slice indices through this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ich import slabs
from ich.viewer.nifti import slice_axis

__all__ = ["Planes"]


@dataclass(frozen=True)
class Planes:
    """Planes ``0..P-1`` of a series of ``N`` slices: plane ``k`` covers slices ``first[k]..last[k]``."""

    first: np.ndarray  # (P,) intp, 0-based
    last: np.ndarray  # (P,) intp, inclusive
    of_slice: np.ndarray  # (N,) intp: the plane holding each slice
    slabbed: bool

    @classmethod
    def of(
        cls, n_slices: int, affine_lps: np.ndarray | None, thin: bool = False, locations: np.ndarray | None = None
    ) -> Planes:
        """The series' slabs when it is thin and ``thin`` is not asked for; else one plane per slice.

        ``locations`` are the slices' own positions along the normal (mm, as stored with the volume): grouped
        on them, the slabs are the ones the model scored, also after a missing slice. Volumes stored without
        them fall back on the affine's even grid. Without either the geometry is unknown: never slabbed.
        """
        groups = None
        if not thin and n_slices > 1:
            if locations is None and affine_lps is not None:
                locations = np.asarray(slice_axis(affine_lps, n_slices)[1])
            if locations is not None:
                groups = slabs.slab_of_slice(locations, slabs.median_step(locations))
        if groups is None:
            index = np.arange(n_slices, dtype=np.intp)
            return cls(index, index.copy(), index.copy(), False)
        first = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
        last = np.r_[first[1:] - 1, n_slices - 1]
        return cls(first.astype(np.intp), last.astype(np.intp), groups.astype(np.intp), True)

    def __len__(self) -> int:
        return len(self.first)

    @property
    def unit(self) -> str:
        return "Slab" if self.slabbed else "Slice"

    def volume(self, hu: np.ndarray) -> np.ndarray:
        """The planes' HU ``(P, H, W)``: the series itself, or each slab's mean (the 5 mm slice a scanner makes)."""
        return slabs.slab_means(hu, self.of_slice) if self.slabbed else hu

    def affine(self, affine_lps: np.ndarray | None) -> np.ndarray | None:
        """Voxel (column, row, plane) to LPS for :meth:`volume`: plane ``k`` at the centre of its slices.

        NIfTI needs one step between planes: the usual one, so only a slab of another size (a merged tail, one
        short of a missing slice) sits off its centre, by under a slab; :meth:`centres` gives the true ones.
        """
        if affine_lps is None or not self.slabbed:
            return affine_lps
        centre = (self.first + self.last) / 2.0
        step = float(np.median(np.diff(centre))) if len(self) > 1 else 1.0
        to_slices = np.eye(4)
        to_slices[2, 2], to_slices[2, 3] = step, centre[0]
        return np.asarray(affine_lps, np.float64) @ to_slices

    def centres(self, locations: np.ndarray | list[float]) -> list[float]:
        """Each plane's position along the normal (mm): the mean of its slices' ``locations``."""
        loc = np.asarray(locations, np.float64)
        return [float(loc[a : b + 1].mean()) for a, b in zip(self.first, self.last)]

    def label(self, k: int, of_total: bool = True) -> str:
        """``"Slice 12 / 36"``, or ``"Slab 12 / 30 (slices 89–96)"``; ``k`` 0-based; without the `` / 30``
        when not ``of_total`` (where the count is plain, as in the gallery)."""
        name = f"{self.unit} {k + 1}" + (f" / {len(self)}" if of_total else "")
        if self.slabbed:
            name += f" (slices {self.first[k] + 1}–{self.last[k] + 1})"
        return name
