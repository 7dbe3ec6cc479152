"""Synthetic head-CT studies with labelled hemorrhages, written as CT DICOM in the RSNA layout.

A study is rendered from an analytic 3-D head (every structure is a function of position in a
canonical head frame), so each object is consistent across adjacent slices and the slice
thickness only changes sampling. Per study the head is scaled, tilted, rotated and shifted, then
cut into axial slices.

Modules, each importing only those listed before it:

- :mod:`~ich.phantom.geometry`: ellipsoids, capsule chains, random plane waves, pose, point sets.
- :mod:`~ich.phantom.anatomy`: tissue HU, the canonical head's landmarks and surfaces, and its
  random per-study variation.
- :mod:`~ich.phantom.lesions`: hemorrhages and calcifications, sampled per study.
- :mod:`~ich.phantom.render`: noise-free HU and hemorrhage bits at points of the head.
- :mod:`~ich.phantom.scan`: slicing and CT image formation (partial volume, table, streaks, blur,
  noise, field of view).
- :mod:`~ich.phantom.study`: :class:`PhantomStudy` and :func:`generate_study`.
- :mod:`~ich.phantom.writer`: the RSNA DICOM layout, :func:`write_study` and :func:`write_dataset`.
"""

from ich.phantom.anatomy import AIR_HU as AIR_HU
from ich.phantom.scan import FOV_PADDING_HU as FOV_PADDING_HU
from ich.phantom.scan import HU_MAX as HU_MAX
from ich.phantom.study import MATRIX as MATRIX
from ich.phantom.study import MIN_LABEL_AREA_MM2, PhantomStudy, generate_study
from ich.phantom.writer import BITS_KINDS, DATASET_SEED_STRIDE, WRAPPED_HU_MIN, write_dataset, write_study

# The same public API as the single module this package replaces; AIR_HU, FOV_PADDING_HU, HU_MAX
# and MATRIX were never in __all__ but callers read them as ich.phantom.<name>.
__all__ = [
    "PhantomStudy",
    "generate_study",
    "write_study",
    "write_dataset",
    "BITS_KINDS",
    "DATASET_SEED_STRIDE",
    "MIN_LABEL_AREA_MM2",
    "WRAPPED_HU_MIN",
]
