"""Geometry for the phantom: ellipsoids, capsule chains, random plane waves, the head's pose and point sets.

All functions work on flat arrays of points in the canonical head frame (see :mod:`ich.phantom.anatomy`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def _q(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: Sequence[float], radii: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Normalised squared ellipsoid radius: < 1 inside."""
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2


def _q2(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Normalised squared ellipse radius in the axial plane."""
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2


def _segment_distance(
    px: np.ndarray, py: np.ndarray, pz: np.ndarray, a: np.ndarray, b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distance from points to segment a-b (3-D) and the position along it in [0, 1]."""
    d = b - a
    t = np.clip(((px - a[0]) * d[0] + (py - a[1]) * d[1] + (pz - a[2]) * d[2]) / float(d @ d), 0.0, 1.0)
    return np.sqrt((px - a[0] - t * d[0]) ** 2 + (py - a[1] - t * d[1]) ** 2 + (pz - a[2] - t * d[2]) ** 2), t


def _tube(px: np.ndarray, py: np.ndarray, pz: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Signed distance (approximate) to a chain of capsules with linearly varying radius."""
    out = np.full(px.shape, np.inf, np.float32)
    for k in range(len(knots) - 1):
        a, b = knots[k], knots[k + 1]
        dist, t = _segment_distance(px, py, pz, a[:3], b[:3])
        np.minimum(out, dist - (a[3] + t * (b[3] - a[3])), out=out)
    return out


def _waves(n: int, wavelength: tuple[float, float], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random 3-D plane waves: wave vectors (3, n) and phases (n,)."""
    direction = rng.normal(size=(3, n))
    direction /= np.linalg.norm(direction, axis=0)
    k = direction * (2 * np.pi / rng.uniform(*wavelength, size=n))
    return k.astype(np.float32), rng.uniform(0, 2 * np.pi, n).astype(np.float32)


def _wave_sum(points: np.ndarray, waves: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Sum of unit cosines at ``points`` (m, 3), normalised to unit variance."""
    k, phase = waves
    arg = points @ k
    arg += phase
    np.cos(arg, out=arg)
    return arg.sum(axis=1) * np.float32(math.sqrt(2.0 / k.shape[1]))


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Head orientation: pitch about x (nodding), roll about y, yaw about z (in-plane), degrees."""
    a, b, c = np.radians([pitch, roll, yaw])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


# =========================================================================== pose and point sets
@dataclass(frozen=True)
class _Pose:
    """Canonical head frame -> patient (world) coordinates: world = R @ (scale * canonical) + t."""

    rotation: np.ndarray
    scale: np.ndarray
    translation: np.ndarray

    def to_world(self, canonical: np.ndarray) -> np.ndarray:
        return (canonical * self.scale) @ self.rotation.T + self.translation

    def canonical_z(self, world_z: float) -> float:
        """Approximate canonical height of a world slice (ignoring tilt)."""
        return (world_z - self.translation[2]) / self.scale[2]


@dataclass
class _Points:
    """A set of pixels of one (sub-)slice in canonical coordinates, plus their world y."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    wy: np.ndarray

    def take(self, index: np.ndarray) -> _Points:
        return _Points(self.x[index], self.y[index], self.z[index], self.wy[index])


@dataclass
class _Cavity(_Points):
    """Intracranial points with the fields the hemorrhages need."""

    d_in: np.ndarray  # signed distance to the inner table, mm (< 0 inside)
    posterior: np.ndarray  # behind the petrous ridges (posterior fossa column)
    supratentorial: np.ndarray
    # The tissue, set by the renderer once the brain is laid out (the bleeds are placed after).
    code: np.ndarray = field(init=False)
    sulcus_wide: np.ndarray = field(init=False)
    third_fourth_ventricle: np.ndarray = field(init=False)
