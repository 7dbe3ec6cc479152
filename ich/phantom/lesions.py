"""Hemorrhages and their mimics: 3-D objects in the canonical head, sampled per study.

Hemorrhages (acute blood, 55-85 HU): epidural (biconvex lens on the inner table), subdural
(crescent along the convexity), intraparenchymal (irregular blob, optional oedema rim),
intraventricular (dependent layering, level perpendicular to gravity), subarachnoid (blood in
sulci, fissures and cisterns). Large ones push the brain (midline shift). Mimics that a model must
not call blood: choroid plexus / pineal / basal ganglia / falx calcifications (> 100 HU), the lens,
the falx, and beam-hardening streaks at the skull base.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ich.labels import SUBTYPES
from ich.phantom.anatomy import (
    _PARENCHYMA,
    ATRIUM,
    CALCIFICATION_HU,
    CLOT_HU,
    GLOBUS_PALLIDUS,
    LENTIFORM,
    PINEAL,
    SAH_HU,
    T_CSF_SUB,
    T_CSF_VENT,
    THALAMUS,
    VENTRICLE_BODY,
    _surface_point,
)
from ich.phantom.geometry import _Cavity, _Pose, _wave_sum, _waves

SUBTYPE_WEIGHTS = {
    "epidural": 0.15,
    "intraparenchymal": 0.22,
    "intraventricular": 0.13,
    "subarachnoid": 0.25,
    "subdural": 0.25,
}  # of each hemorrhage placed
SHIFT_PER_MM = 0.35  # midline shift per mm of extra-axial thickness (and of blob radius, x0.7)
MAX_SHIFT_MM = 12.0
MASK_DTYPE = np.uint8  # hemorrhage bitmask: bit i set = SUBTYPES[i]
BLOB_WOBBLE = 0.22  # relative wobble of intraparenchymal and subarachnoid outlines
IPH_LOBE_WAVELENGTH = (1.2, 2.5)  # over unit directions: a few lobes
SAH_PATCH_WAVELENGTH_MM = (20.0, 40.0)
_BIT = {name: np.uint8(1 << i) for i, name in enumerate(SUBTYPES)}


@dataclass(frozen=True)
class _Bleed:
    """One 3-D hemorrhage in canonical coordinates."""

    subtype: str
    hu: float
    centre: np.ndarray
    size: float  # extent along the surface (extra-axial) or radius (blob), mm
    thickness: float = 0.0  # extra-axial: maximal thickness, mm
    side: float = 0.0  # extra-axial: which hemisphere (+1 left), 0 = either
    waves: tuple[np.ndarray, np.ndarray] | None = None  # blob outline perturbation
    rim_mm: float = 0.0  # intraparenchymal oedema
    level_wy: float = 0.0  # intraventricular: world y of the blood-CSF level
    cast: bool = False  # intraventricular: third and fourth ventricles filled too

    def push(self, c: _Cavity) -> np.ndarray:
        """Extra-axial collections: local thickness under each point (brain is pushed by this)."""
        s2 = ((c.x - self.centre[0]) ** 2 + (c.y - self.centre[1]) ** 2 + (c.z - self.centre[2]) ** 2) / self.size**2
        if self.subtype == "epidural":  # lens: parabolic profile, sharp convex inner margin
            h = self.thickness * np.clip(1.0 - s2, 0.0, None)
        else:  # crescent: flat middle, thin tapering tips, stays in one hemisphere
            h = self.thickness * np.sqrt(np.clip(1.0 - s2, 0.0, None))
            h = np.where(c.x * self.side > self.thickness, h, 0.0)
        return np.where(c.supratentorial | (self.subtype == "epidural"), h, 0.0).astype(np.float32)

    def region(self, c: _Cavity) -> np.ndarray:
        """Boolean mask over the cavity points occupied by this hemorrhage."""
        if self.subtype in ("epidural", "subdural"):
            return -c.d_in < self.push(c)
        if self.subtype == "intraventricular":
            r2 = (c.x - self.centre[0]) ** 2 + (c.y - self.centre[1]) ** 2 + (c.z - self.centre[2]) ** 2
            in_ventricle = c.code == T_CSF_VENT
            layered = in_ventricle & (c.wy > self.level_wy) & (r2 < self.size**2)
            return layered | (in_ventricle & c.third_fourth_ventricle) if self.cast else layered
        out = np.zeros(c.x.size, bool)
        near, r, outline = self._outline(c, 0.0)
        if self.subtype == "intraparenchymal":
            out[near] = (r < outline) & np.isin(c.code[near], _PARENCHYMA)
        else:  # subarachnoid: the CSF spaces outside the ventricles, plus sulci a little widened
            out[near] = (r < outline) & ((c.code[near] == T_CSF_SUB) | c.sulcus_wide[near])
        return out

    def oedema(self, c: _Cavity) -> np.ndarray:
        """Intraparenchymal: the parenchyma within ``rim_mm`` of the clot."""
        out = np.zeros(c.x.size, bool)
        near, r, outline = self._outline(c, self.rim_mm)
        out[near] = (r < outline + self.rim_mm) & np.isin(c.code[near], _PARENCHYMA)
        return out

    def _outline(self, c: _Cavity, margin: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Points near a blob (indices), their distance to its centre and its wobbly radius there."""
        waves = self.waves
        if waves is None:  # only the blobs (intraparenchymal, subarachnoid) are sampled with an outline
            raise ValueError(f"a {self.subtype} hemorrhage has no blob outline")
        reach = self.size * (1 + BLOB_WOBBLE * math.sqrt(2 * waves[0].shape[1])) + margin
        r2 = (c.x - self.centre[0]) ** 2 + (c.y - self.centre[1]) ** 2 + (c.z - self.centre[2]) ** 2
        near = np.flatnonzero(r2 < reach**2)
        offset = np.stack([c.x[near] - self.centre[0], c.y[near] - self.centre[1], c.z[near] - self.centre[2]], axis=1)
        r = np.sqrt(r2[near])
        # Intraparenchymal: lobulated outline (waves over the direction); subarachnoid: ragged patch.
        where = offset / np.maximum(r, 1e-3)[:, None] if self.subtype == "intraparenchymal" else offset / self.size
        return near, r, self.size * (1 + BLOB_WOBBLE * _wave_sum(where.astype(np.float32), waves))


@dataclass(frozen=True)
class _Calcification:
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    hu: float


def _within(lo: float, hi: float, cover: tuple[float, float], rng: np.random.Generator) -> float:
    """Uniform height in [lo, hi] intersected with the covered range (nearest end if disjoint)."""
    a, b = max(lo, cover[0]), min(hi, cover[1])
    if a > b:
        return float(np.clip((lo + hi) / 2, cover[0], cover[1]))
    return float(rng.uniform(a, b))


def _sample_bleed(subtype: str, rng: np.random.Generator, cover: tuple[float, float], world: _Pose) -> _Bleed:
    hu = float(rng.uniform(*CLOT_HU))
    if subtype == "epidural":  # mostly temporal / parietal, occasionally frontal or occipital
        z = _within(28, 100, cover, rng)
        centre = _surface_point(z, rng.choice([0.0, np.pi]) + rng.normal(0, 0.5))
        return _Bleed(subtype, hu, centre, size=rng.uniform(22, 38), thickness=rng.uniform(7, 20))
    if subtype == "subdural":
        side = float(rng.choice([-1.0, 1.0]))
        z = _within(45, 95, cover, rng)
        azimuth = (0.0 if side > 0 else np.pi) + rng.normal(0, 0.35) * side
        return _Bleed(
            subtype, hu, _surface_point(z, azimuth), size=rng.uniform(50, 85), thickness=rng.uniform(3, 13), side=side
        )
    if subtype == "intraparenchymal":
        side = float(rng.choice([-1.0, 1.0]))
        if rng.random() < 0.45:  # hypertensive: basal ganglia or thalamus
            nucleus = LENTIFORM[0] if rng.random() < 0.6 else THALAMUS[0]
            centre = np.array([side * nucleus[0], nucleus[1], _within(nucleus[2] - 6, nucleus[2] + 6, cover, rng)])
        else:  # lobar: a few cm under the cortex
            z = _within(40, 100, cover, rng)
            centre = _surface_point(z, rng.uniform(0, 2 * np.pi)) * np.array([0.6, 0.65, 1.0])
            centre[0] = abs(centre[0]) * side
        centre = centre + rng.normal(0, 2.0, 3)
        return _Bleed(
            subtype,
            hu,
            centre.astype(np.float32),
            size=rng.uniform(6, 20),
            waves=_waves(6, IPH_LOBE_WAVELENGTH, rng),
            rim_mm=rng.uniform(1.5, 5.0) * (rng.random() < 0.7),
        )
    if subtype == "intraventricular":
        # Fill the most dependent (posterior in the supine patient) part of the lateral ventricles.
        horns = np.array([[s * VENTRICLE_BODY[-1][0], VENTRICLE_BODY[-1][1], VENTRICLE_BODY[-1][2]] for s in (1, -1)])
        lowest = float(world.to_world(horns)[:, 1].max())
        centre = np.array([0.0, ATRIUM[1], _within(ATRIUM[2] - 4, ATRIUM[2] + 4, cover, rng)], np.float32)
        return _Bleed(subtype, hu, centre, size=60.0, level_wy=lowest - rng.uniform(6, 22), cast=rng.random() < 0.3)
    if subtype == "subarachnoid":
        site = rng.choice(["convexity", "basal", "sylvian", "interhemispheric"], p=[0.4, 0.25, 0.2, 0.15])
        side = float(rng.choice([-1.0, 1.0]))
        if site == "convexity":
            centre = _surface_point(_within(45, 110, cover, rng), rng.uniform(0, 2 * np.pi))
        elif site == "basal":
            centre = np.array([0.0, -6.0, _within(36, 50, cover, rng)])
        elif site == "sylvian":
            centre = np.array([side * 45.0, -12.0, _within(38, 58, cover, rng)])
        else:
            centre = np.array([0.0, rng.uniform(-60, 50), _within(55, 105, cover, rng)])
        return _Bleed(
            subtype,
            float(rng.uniform(*SAH_HU)),
            np.asarray(centre, np.float32),
            size=rng.uniform(18, 34),
            waves=_waves(6, SAH_PATCH_WAVELENGTH_MM, rng),
        )
    raise ValueError(f"unknown hemorrhage subtype {subtype!r}; expected one of {SUBTYPES}")


def _sample_calcifications(rng: np.random.Generator) -> list[_Calcification]:
    def hu() -> float:
        return float(rng.uniform(*CALCIFICATION_HU))

    out = []
    if rng.random() < 0.55:  # choroid plexus glomus in both atria
        for side in (1, -1):
            r = rng.uniform(1.5, 3.5)
            out.append(_Calcification((side * ATRIUM[0], ATRIUM[1] + 1, ATRIUM[2] - 1), (r, r * 1.3, r), hu()))
    if rng.random() < 0.5:
        r = rng.uniform(1.5, 3.5)
        out.append(_Calcification(PINEAL, (r, r, r), hu()))
    if rng.random() < 0.1:
        for side in (1, -1):
            out.append(_Calcification((side * GLOBUS_PALLIDUS[0], *GLOBUS_PALLIDUS[1:]), (2.0, 3.0, 2.0), hu()))
    if rng.random() < 0.15:  # falx plaque
        out.append(_Calcification((0.0, rng.uniform(-60, -20), rng.uniform(80, 105)), (1.2, 6.0, 4.0), hu()))
    return out


def _sample_pathology(
    rng: np.random.Generator,
    hemorrhage: bool | None,
    subtypes: Sequence[str] | None,
    cover: tuple[float, float],
    pose: _Pose,
) -> tuple[list[_Bleed], float]:
    """The hemorrhages and the midline shift (mm, + towards the patient's left) they cause."""
    if subtypes is None:
        bleeding = rng.random() < 0.5 if hemorrhage is None else hemorrhage
        count = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15])) if bleeding else 0
        weights = np.array([SUBTYPE_WEIGHTS[t] for t in SUBTYPES])
        subtypes = list(rng.choice(SUBTYPES, size=count, p=weights / weights.sum()))
    bleeds = [_sample_bleed(str(t), rng, cover, pose) for t in subtypes]
    shift = 0.0
    for b in bleeds:  # away from the space-occupying ones
        if b.subtype in ("epidural", "subdural"):
            shift -= np.sign(b.centre[0]) * SHIFT_PER_MM * b.thickness
        elif b.subtype == "intraparenchymal":
            shift -= np.sign(b.centre[0]) * SHIFT_PER_MM * 0.7 * max(b.size - 8.0, 0.0)
    return bleeds, float(np.clip(shift, -MAX_SHIFT_MM, MAX_SHIFT_MM))
