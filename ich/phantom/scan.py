"""The scanner: the pixel grid cut through the posed head, and how the CT image is formed.

Each slice averages sub-slices (partial volume) and gets the patient table below the head,
beam-hardening streaks at the skull base, the reconstruction blur, correlated noise and the
field-of-view circle, in integer HU.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from ich.labels import SUBTYPES
from ich.phantom.anatomy import AIR_HU, CRANIUM_B, EGG, FACE_TAPER, FACE_TAPER_Z, PETROUS_HU
from ich.phantom.geometry import _Points, _Pose
from ich.phantom.lesions import _BIT, MASK_DTYPE
from ich.phantom.render import _Renderer

# --------------------------------------------------------------------------- scanner
FOV_PADDING_HU = -1024.0  # outside the reconstruction circle, as real 12-bit scanners store it
HU_MAX = 3071.0  # top of the 12-bit range with intercept -1024
TABLE_HU = 300.0
COARSE_STEP = 4  # pixels per side of the blocks tested for being near the head
NOISE_SIGMA_HU = (2.0, 3.5)  # inside the head; five RSNA scanners measure 2-3 HU
NOISE_AIR_SIGMA_HU = 1.0  # real air is nearly noise free (short paths through the patient)
NOISE_CORRELATION_MM = 0.45  # reconstruction kernel: noise grain of about a pixel
PSF_SIGMA_MM = 0.4  # in-plane blur of edges (reconstruction kernel)
SUBSAMPLE_MM = 2.5  # thicker slices average sub-slices at most this far apart (partial volume)
TABLE_PROBABILITY = 0.75  # some scans crop the table out of the field of view
TABLE_RADIUS_MM = (180.0, 320.0)
TABLE_THICKNESS_MM = (2.5, 5.0)


class _Slicer:
    """The pixel grid of one study: world slice -> canonical coordinates of the pixels near the head."""

    def __init__(self, pose: _Pose, xs: np.ndarray, ys: np.ndarray) -> None:
        self.m = (pose.rotation.T / pose.scale[:, None]).astype(np.float32)  # world offset -> canonical
        self.t = pose.translation
        self.xs, self.ys = xs, ys
        # Each canonical coordinate is a sum of a column term, a row term and a slice term.
        self.col_terms = self.m[:, 0:1] * (xs - np.float32(self.t[0]))
        self.row_terms = self.m[:, 1:2] * (ys - np.float32(self.t[1]))
        size = xs.size
        self.size = size
        self.step = COARSE_STEP if size >= 16 * COARSE_STEP else 1
        centres = np.arange(self.step // 2, size, self.step)
        self.coarse = np.meshgrid(centres, centres, indexing="ij")
        # A block is kept when its sample point is within a block diagonal (canonical mm) of the head.
        self.margin = float(self.step * (xs[1] - xs[0]) / pose.scale.min()) if size > 1 else 0.0

    def _canonical(self, rows: np.ndarray, cols: np.ndarray, zw: float) -> _Points:
        z_terms = self.m[:, 2] * np.float32(zw - self.t[2])
        x, y, z = (self.col_terms[k][cols] + self.row_terms[k][rows] + z_terms[k] for k in range(3))
        x /= 1 + EGG * np.clip(y / CRANIUM_B, -1, 1)
        x *= 1 + FACE_TAPER * np.clip((FACE_TAPER_Z - z) / 40, 0, 1) * np.clip(-y / CRANIUM_B, 0, 1)
        return _Points(x, y, z, self.ys[rows])

    def points(self, zw: float, renderer: _Renderer) -> tuple[_Points, np.ndarray]:
        """Pixels of the slice at world height ``zw`` that may belong to the head, and their flat index."""
        rows, cols = (g.ravel() for g in self.coarse)
        near = renderer.inside_skin(self._canonical(rows, cols, zw), self.margin)
        block = np.kron(near.reshape(self.coarse[0].shape), np.ones((self.step, self.step), bool))
        rows, cols = np.nonzero(block[: self.size, : self.size])
        return self._canonical(rows, cols, zw), rows * self.size + cols


def _table(xs: np.ndarray, ys: np.ndarray, top_y: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean image of the patient table: a shallow arc just below the back of the head."""
    radius = rng.uniform(*TABLE_RADIUS_MM)
    thickness = rng.uniform(*TABLE_THICKNESS_MM)
    cx = rng.uniform(-10.0, 10.0)
    r = np.hypot(xs[None, :] - cx, ys[:, None] - (top_y + thickness / 2 - radius))
    return np.abs(r - radius) < thickness / 2


def _streaks(hu: np.ndarray, xs: np.ndarray, ys: np.ndarray, spacing: float, rng: np.random.Generator) -> None:
    """Beam hardening at the skull base (in place): a dark band across the posterior fossa between
    the petrous bones, and thin bright or dark rays from dense bone. Only soft tissue is touched."""
    dense = np.argwhere(hu > PETROUS_HU * 0.9)
    if dense.shape[0] * spacing**2 < 40.0:
        return
    soft = (hu > -150) & (hu < 150)
    mm = np.stack([ys[dense[:, 0]], xs[dense[:, 1]]], axis=1)  # (row, column) positions in mm
    lines = []  # (start, end, amplitude HU, width mm, ray: fades from start to end, else flat band)
    left, right = mm[mm[:, 1] < 0], mm[mm[:, 1] >= 0]
    if len(left) and len(right):  # from the back of one petrous bone to the back of the other
        lines.append(
            (left[left[:, 0].argmax()], right[right[:, 0].argmax()], -rng.uniform(10, 30), rng.uniform(2, 4), False)
        )
    for _ in range(int(rng.integers(2, 6))):
        start = mm[rng.integers(len(mm))]
        angle = rng.uniform(0, 2 * np.pi)
        end = start + rng.uniform(25, 70) * np.array([np.sin(angle), np.cos(angle)])
        lines.append((start, end, rng.choice([-1, 1]) * rng.uniform(8, 25), rng.uniform(0.5, 1.4), True))
    yy, xx = ys[:, None], xs[None, :]
    for start, end, amplitude, width, ray in lines:
        dy, dx = end - start
        length2 = dy * dy + dx * dx + 1e-6
        t = ((yy - start[0]) * dy + (xx - start[1]) * dx) / length2  # 0 at start, 1 at end
        dist = np.abs((xx - start[1]) * dy - (yy - start[0]) * dx) / math.sqrt(length2)
        along = np.clip(1 - t, 0, 1) * (t > 0) if ray else ((t > 0) & (t < 1)).astype(np.float32)
        hu += np.where(soft, amplitude * np.exp(-0.5 * (dist / width) ** 2) * along, 0).astype(np.float32)


def _noise(rng: np.random.Generator, shape: tuple[int, int], spacing: float) -> np.ndarray:
    """Unit-variance CT-like noise with a grain of about NOISE_CORRELATION_MM."""
    white = rng.standard_normal(shape, dtype=np.float32)
    sigma = NOISE_CORRELATION_MM / spacing
    if sigma < 0.3:
        return white
    grain = cv2.GaussianBlur(white, (0, 0), sigma)
    return grain / np.float32(1.0 / (2.0 * math.sqrt(math.pi) * sigma))


def _render_series(
    renderer: _Renderer,
    slicer: _Slicer,
    z_world: np.ndarray,
    thickness: float,
    table: np.ndarray,
    fov: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """HU and hemorrhage bitmask volumes: sub-slices averaged (partial volume), table, streaks,
    reconstruction blur, noise, field-of-view circle, integer HU."""
    size = slicer.size
    xs, ys = slicer.xs, slicer.ys
    spacing = float(xs[1] - xs[0]) if size > 1 else fov
    sub = max(1, round(thickness / SUBSAMPLE_MM))
    offsets = (np.arange(sub) + 0.5) / sub * thickness - thickness / 2
    fov_circle = (xs[None, :] ** 2 + ys[:, None] ** 2) > (fov / 2) ** 2
    noise_sigma = rng.uniform(*NOISE_SIGMA_HU)
    blur = PSF_SIGMA_MM / spacing
    hu_vol = np.empty((len(z_world), size, size), np.float32)
    mask_vol = np.zeros((len(z_world), size, size), MASK_DTYPE)
    for i, zw in enumerate(z_world):
        acc = np.full(size * size, AIR_HU * sub, np.float32)
        hits = np.zeros((len(SUBTYPES), size * size), np.uint8) if renderer.bleeds else None
        for dz in offsets:
            pts, idx = slicer.points(zw + dz, renderer)
            hu_pts, bits_pts = renderer.render(pts)
            acc[idx] += hu_pts - AIR_HU
            if hits is not None:
                for k in range(len(SUBTYPES)):
                    hits[k, idx[(bits_pts >> k) & 1 == 1]] += 1
        img: np.ndarray = (acc / sub).reshape(size, size)
        np.maximum(img, TABLE_HU, out=img, where=table)
        _streaks(img, xs, ys, spacing, rng)
        if blur > 0.3:
            img = cv2.GaussianBlur(img, (0, 0), blur)
        img += _noise(rng, (size, size), spacing) * np.where(
            img > -500, np.float32(noise_sigma), np.float32(NOISE_AIR_SIGMA_HU)
        )
        img[fov_circle] = FOV_PADDING_HU
        np.clip(np.rint(img), FOV_PADDING_HU, HU_MAX, out=hu_vol[i])
        if hits is not None:  # a pixel bleeds when most of its sub-slices do (else it is mostly partial volume)
            for k in range(len(SUBTYPES)):
                mask_vol[i].flat[np.flatnonzero(2 * hits[k] > sub)] |= _BIT[SUBTYPES[k]]
    return hu_vol, mask_vol
