"""One synthetic series (:func:`generate_study`): pose, slices, rendering, labels and identifiers.

Per study the head is scaled, tilted, rotated and shifted (its back resting on the table), then
cut into axial slices. The labels come from the rendered hemorrhage masks, the DICOM UIDs from the
seed alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydicom.uid import generate_uid

from ich.labels import CLASSES, INDEX_NAME, SUBTYPES
from ich.phantom.anatomy import CRANIUM_B, VENTRICLES_Z, VERTEX_Z, _Anatomy
from ich.phantom.geometry import _Pose, _rotation
from ich.phantom.lesions import _sample_calcifications, _sample_pathology
from ich.phantom.render import _Renderer
from ich.phantom.scan import TABLE_PROBABILITY, TABLE_THICKNESS_MM, _render_series, _Slicer, _table

# --------------------------------------------------------------------------- series
MATRIX = 512
PIXEL_SPACING_MM = (0.45, 0.5)
DEFAULT_SLICE_RANGE = (28, 40)  # slices in a default 5 mm series
MIN_LABEL_AREA_MM2 = 6.0  # a slice is positive for a subtype above this much blood in it

# --------------------------------------------------------------------------- patient variation
HEAD_SCALE = (0.9, 1.07)
HEAD_SHAPE = 0.04  # +- relative breadth vs length
YAW_SD_DEG, ROLL_SD_DEG = 6.0, 2.5
PITCH_DEG = (-12.0, 8.0)  # nodding relative to the canonical (orbitomeatal-like) plane


@dataclass
class PhantomStudy:
    """One synthetic axial CT series. Slices are ordered inferior -> superior (ascending z)."""

    seed: int
    hu: np.ndarray  # float32 (N, H, W), integer-valued HU
    masks: np.ndarray  # uint8 (N, H, W), bit i set = SUBTYPES[i] present in the pixel
    labels: pd.DataFrame  # index sop_uid (N rows, slice order), columns CLASSES, int 0/1
    positions: np.ndarray  # (N, 3) ImagePositionPatient of each slice, mm
    spacing: tuple[float, float]  # PixelSpacing (row, column), mm
    thickness: float  # SliceThickness = distance between slice centres, mm
    patient_id: str
    patient_name: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_uids: list[str]
    instance_numbers: list[int]
    hemorrhages: list[str]  # subtypes of the hemorrhage objects placed (may miss the slices)

    def __len__(self) -> int:
        return self.hu.shape[0]


def _uid(seed: int, *parts: object) -> str:
    """A valid DICOM UID derived only from the seed (same seed -> same UIDs)."""
    return str(generate_uid(entropy_srcs=["ich.phantom", str(seed), *map(str, parts)]))


def _sample_pose(rng: np.random.Generator, fov: float) -> tuple[_Pose, float]:
    """Head size, shape, tilt, in-plane rotation and position; the back of the head rests on the
    table, whose top (world y, mm) is returned too."""
    s = rng.uniform(*HEAD_SCALE)
    shape = rng.uniform(-HEAD_SHAPE, HEAD_SHAPE)  # long and narrow .. short and broad
    scale = np.array([s * (1 + shape), s * (1 - shape), s * rng.uniform(0.96, 1.04)])
    rotation = _rotation(yaw=rng.normal(0, YAW_SD_DEG), pitch=rng.uniform(*PITCH_DEG), roll=rng.normal(0, ROLL_SD_DEG))
    back = (CRANIUM_B + 14.0) * scale[1]  # inner table + skull + scalp behind the centre
    front = (CRANIUM_B + 30.0) * scale[1]  # and the nose in front
    gap = rng.uniform(0.5, 4.0)  # head rest padding
    lo, hi = -fov / 2 + front, fov / 2 - back - gap - TABLE_THICKNESS_MM[1]
    ty = rng.uniform(lo, hi) if lo < hi else (lo + hi) / 2
    translation = np.array([rng.uniform(-12, 12), ty, rng.uniform(-150, 100)])
    return _Pose(rotation, scale, translation), ty + back + gap


def _slice_positions(rng: np.random.Generator, pose: _Pose, n_slices: int | None, thickness: float) -> np.ndarray:
    """World z of the slice centres, ascending: foramen magnum to above the vertex, or ``n_slices``
    centred on the lateral ventricles."""
    t, sz = pose.translation[2], pose.scale[2]
    if n_slices is None:
        bottom = t + rng.uniform(-22.0, -4.0) * sz  # C1 / maxillary sinuses
        top = t + (VERTEX_Z + 8.0) * sz + rng.uniform(0.0, 12.0)  # scalp, then maybe an empty slice
        lo, hi = (max(1, round(n * 5.0 / thickness)) for n in DEFAULT_SLICE_RANGE)
        n = int(np.clip(math.ceil((top - bottom) / thickness) + 1, lo, hi))
        return top - thickness * np.arange(n)[::-1]
    return t + VENTRICLES_Z * sz + thickness * (np.arange(n_slices) - (n_slices - 1) / 2)


def generate_study(
    seed: int,
    *,
    n_slices: int | None = None,
    thickness: float = 5.0,
    hemorrhage: bool | None = None,
    subtypes: Sequence[str] | None = None,
    size: int = MATRIX,
) -> PhantomStudy:
    """Render one synthetic head CT series, deterministically from ``seed``.

    ``n_slices`` defaults to whatever covers skull base to vertex (28-40 at 5 mm); a given number
    is centred on the lateral ventricles. ``hemorrhage`` None -> about half the studies bleed;
    True -> one to three hemorrhages; False -> none. ``subtypes`` places exactly these (one
    object each, repeats allowed) and implies ``hemorrhage=True``. ``size`` is the matrix (tests
    use small ones; the field of view stays that of a 512 matrix).
    """
    if subtypes is not None and hemorrhage is False:
        raise ValueError("subtypes given but hemorrhage=False")
    if thickness <= 0:
        raise ValueError("thickness must be positive")
    if n_slices is not None and n_slices < 1:
        raise ValueError("n_slices must be >= 1")
    rng = np.random.default_rng(seed)
    fov = MATRIX * rng.uniform(*PIXEL_SPACING_MM)
    spacing = fov / size
    pose, table_top = _sample_pose(rng, fov)
    z_world = _slice_positions(rng, pose, n_slices, thickness)
    cover = (pose.canonical_z(z_world[0]) + 3.0, pose.canonical_z(z_world[-1]) - 3.0)
    anatomy = _Anatomy.sample(rng)
    bleeds, shift = _sample_pathology(rng, hemorrhage, subtypes, cover, pose)
    renderer = _Renderer(anatomy, bleeds, _sample_calcifications(rng), shift)

    xs = ((np.arange(size) - (size - 1) / 2) * spacing).astype(np.float32)
    ys = xs.copy()
    table = _table(xs, ys, table_top, rng) if rng.random() < TABLE_PROBABILITY else np.zeros((size, size), bool)
    hu_vol, mask_vol = _render_series(renderer, _Slicer(pose, xs, ys), z_world, thickness, table, fov, rng)
    n = len(z_world)

    # ---- identifiers and labels
    study_uid = _uid(seed, "study")
    sop_uids = [_uid(seed, "sop", i) for i in range(n)]
    descending = bool(rng.random() < 0.5)  # scanners number slices either way
    instance_numbers = [n - i if descending else i + 1 for i in range(n)]
    labels = _labels_from_masks(mask_vol, spacing, sop_uids)
    return PhantomStudy(
        seed=seed,
        hu=hu_vol,
        masks=mask_vol,
        labels=labels,
        positions=np.stack([np.full(n, xs[0]), np.full(n, ys[0]), z_world], axis=1),
        spacing=(spacing, spacing),
        thickness=float(thickness),
        patient_id=f"PHANTOM{seed:04d}",
        patient_name=f"PHANTOM^{seed:04d}",
        study_uid=study_uid,
        series_uid=_uid(seed, "series"),
        frame_of_reference_uid=_uid(seed, "frame"),
        sop_uids=sop_uids,
        instance_numbers=instance_numbers,
        hemorrhages=[b.subtype for b in bleeds],
    )


def _labels_from_masks(masks: np.ndarray, spacing: float, sop_uids: list[str]) -> pd.DataFrame:
    """Per-slice 0/1 labels: a subtype counts when it covers more than MIN_LABEL_AREA_MM2."""
    min_pixels = MIN_LABEL_AREA_MM2 / spacing**2
    counts = np.stack([((masks >> k) & 1).reshape(len(masks), -1).sum(axis=1) for k in range(len(SUBTYPES))], axis=1)
    sub = (counts > min_pixels).astype(int)
    frame = pd.DataFrame(sub, columns=list(SUBTYPES), index=pd.Index(sop_uids, name=INDEX_NAME))
    frame.insert(0, "any", sub.max(axis=1) if len(sub) else np.zeros(0, int))
    return frame[list(CLASSES)]
