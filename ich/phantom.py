"""Synthetic head-CT studies with labelled hemorrhages, written as CT DICOM in the RSNA layout.

A study is rendered from an analytic 3-D head (every structure is a function of position in a
canonical head frame), so each object is consistent across adjacent slices and the slice
thickness only changes sampling. The canonical frame is in mm: ``x`` towards the patient's left,
``y`` posterior, ``z`` superior (DICOM LPS), origin on the midline at the level of the foramen
magnum. Per study the head is scaled, tilted, rotated and shifted, then cut into axial slices.

Anatomy: scalp, skull with diploe and tables, skull base (anterior / middle / posterior fossae,
dense petrous ridges, clivus, sella), air in the frontal / ethmoid / sphenoid / maxillary sinuses
and mastoids, orbits, nasal cavity, cervical canal and C1; cerebrum with gyri and sulci (a 3-D
folding field), cortex and white matter, basal ganglia and thalami, lateral / third / fourth
ventricles, sylvian and interhemispheric fissures with the falx, basal cisterns, brainstem,
tentorium and cerebellum with folia; the patient table below the head.

Hemorrhages (acute blood, 55-85 HU): epidural (biconvex lens on the inner table), subdural
(crescent along the convexity), intraparenchymal (irregular blob, optional oedema rim),
intraventricular (dependent layering, level perpendicular to gravity), subarachnoid (blood in
sulci, fissures and cisterns). Large ones push the brain (midline shift). Mimics that a model must
not call blood: choroid plexus / pineal / basal ganglia / falx calcifications (> 100 HU), the lens,
the falx, and beam-hardening streaks at the skull base.

Files (:func:`write_study`, :func:`write_dataset`) follow the RSNA 2019 layout::

    OUT/stage_2_train/<SOPInstanceUID>.dcm
    OUT/stage_2_train.csv          ID,Label with ID = <SOPInstanceUID>_<class>, six rows per slice
    OUT/masks/<SOPInstanceUID>.png optional: uint8 bitmask, bit i set = SUBTYPES[i] (epidural = bit 0)

Storage kinds (``bits``): ``"16"`` 16-bit signed, intercept 0, Explicit VR Little Endian;
``"12"`` 12-bit unsigned, intercept -1024, Implicit VR Little Endian (as many RSNA files);
``"wrapped"`` 12-bit unsigned holding HU modulo 4096 with intercept 0: the broken RSNA files that
need the "wrapped pixel" fix (stored = HU mod 4096; fixed HU = ((stored + 1000) mod 4096) - 1000),
which can only represent HU >= -1000, so air below -1000 is clipped there.
``jpeg=True`` writes **JPEG 2000 Lossless** (1.2.840.10008.1.2.4.90) through pylibjpeg-openjpeg:
pydicom 3 has no encoder for JPEG Lossless Process 14 (1.2.840.10008.1.2.4.70) and JPEG-LS needs
pyjpegls, which is not installed; JPEG 2000 Lossless is the best lossless JPEG-family syntax that
is encodable here (RLE Lossless is the other one).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from tqdm import tqdm

from ich.labels import CLASSES, INDEX_NAME, SUBTYPES, read_rsna_csv, write_rsna_csv
from ich.windowing import BRAIN, SUBDURAL

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

# --------------------------------------------------------------------------- Hounsfield units
AIR_HU = -1000.0
FOV_PADDING_HU = -1024.0  # outside the reconstruction circle, as real 12-bit scanners store it
HU_MAX = 3071.0  # top of the 12-bit range with intercept -1024
WRAPPED_HU_MIN = -1000.0  # lowest HU the "wrapped" storage survives (see module docstring)
FAT_HU = -90.0
SOFT_TISSUE_HU = 42.0  # scalp, muscle, pinna
CSF_HU = 6.0
GREY_HU = 38.0
WHITE_HU = 29.0
DEEP_GREY_HU = 36.0  # basal ganglia, thalami: a little below cortex on CT
BRAINSTEM_HU = 31.0
CEREBELLUM_HU = 36.0
DURA_HU = 52.0  # falx and tentorium: thin, slightly dense
OEDEMA_HU = 16.0  # perihaematomal oedema, below white matter
GLOBE_HU = 10.0
LENS_HU = 105.0
CORTICAL_BONE_HU = 1750.0
DIPLOE_HU = 750.0
SKULL_BASE_HU = 1300.0
PETROUS_HU = 2300.0
TABLE_HU = 300.0
CLOT_HU = (58.0, 82.0)  # acute hemorrhage, before partial volume and noise
SAH_HU = (58.0, 75.0)  # blood diluted in CSF
CALCIFICATION_HU = (130.0, 500.0)

# --------------------------------------------------------------------------- scanner and series
MATRIX = 512
COARSE_STEP = 4  # pixels per side of the blocks tested for being near the head
PIXEL_SPACING_MM = (0.45, 0.5)
NOISE_SIGMA_HU = (2.0, 3.5)  # inside the head; five RSNA scanners measure 2-3 HU
NOISE_AIR_SIGMA_HU = 1.0  # real air is nearly noise free (short paths through the patient)
NOISE_CORRELATION_MM = 0.45  # reconstruction kernel: noise grain of about a pixel
PSF_SIGMA_MM = 0.4  # in-plane blur of edges (reconstruction kernel)
SUBSAMPLE_MM = 2.5  # thicker slices average sub-slices at most this far apart (partial volume)
DEFAULT_SLICE_RANGE = (28, 40)  # slices in a default 5 mm series
MIN_LABEL_AREA_MM2 = 6.0  # a slice is positive for a subtype above this much blood in it
BITS_KINDS = ("16", "12", "wrapped")
DATASET_SEED_STRIDE = 1_000_000  # study i of write_dataset(seed) uses seed * stride + i
TABLE_PROBABILITY = 0.75  # some scans crop the table out of the field of view
TABLE_RADIUS_MM = (180.0, 320.0)
TABLE_THICKNESS_MM = (2.5, 5.0)

# --------------------------------------------------------------------------- patient variation
HEAD_SCALE = (0.9, 1.07)
HEAD_SHAPE = 0.04  # +- relative breadth vs length
YAW_SD_DEG, ROLL_SD_DEG = 6.0, 2.5
PITCH_DEG = (-12.0, 8.0)  # nodding relative to the canonical (orbitomeatal-like) plane
SUBTYPE_WEIGHTS = {"epidural": 0.15, "intraparenchymal": 0.22, "intraventricular": 0.13,
                   "subarachnoid": 0.25, "subdural": 0.25}  # of each hemorrhage placed
SHIFT_PER_MM = 0.35  # midline shift per mm of extra-axial thickness (and of blob radius, x0.7)
MAX_SHIFT_MM = 12.0

# --------------------------------------------------------------------------- canonical anatomy (mm)
# Inner table of the cranial vault: two half-ellipsoids joined at the widest level Z_EQ, the upper
# one flattened (|z| ** CRANIUM_TOP_POWER) so the vertex is broad, as real skulls are.
CRANIUM_A, CRANIUM_B = 70.0, 85.0  # half breadth (left-right), half length (antero-posterior)
CRANIUM_TOP_POWER = 2.6
CRANIUM_Y = 0.0
EGG = 0.07  # the head is narrower in front: x is stretched by 1 + EGG * y / CRANIUM_B
FACE_TAPER, FACE_TAPER_Z = 0.25, 15.0  # and the face below the orbits narrower still
CRANIUM_Z_EQ, CRANIUM_C_UP, CRANIUM_C_LOW = 45.0, 74.0, 105.0
VERTEX_Z = CRANIUM_Z_EQ + CRANIUM_C_UP
VENTRICLES_Z = 60.0  # height of the lateral ventricles: a short series is centred here
LOWEST_Z = -30.0  # nothing is modelled below this

# Skull base: petrous ridge from apex to lateral end (x >= 0 side), sphenoid ridge, fossa floors.
PETROUS_APEX = (14.0, -8.0)
PETROUS_LATERAL = (62.0, 22.0)
PETROUS_HALF_WIDTH = 13.0
PETROUS_CREST_Z = 32.0
ANTERIOR_FOSSA_Z = 38.0
CRIBRIFORM_Z = 32.0
SELLA_Z = 26.0
MIDDLE_FOSSA_Z = 10.0
POSTERIOR_FOSSA_RIM_Z = 34.0  # the posterior fossa bowl rises to this at its rim
FORAMEN_MAGNUM = (0.0, 26.0, 15.0, 18.0)  # x, y, half-width, half-length
SKULL_BASE_MM = (12.0, 2.5, 24.0, 12.0)  # posterior, anterior, sellar (sphenoid body), middle fossa
CLIVUS_MM = 14.0
FACE_BONE_Z = -12.0
ORBIT_RIM_X = 42.0
NASAL_BONE_X = 8.0
BASE_WALL_MM = 15.0  # bone inside the inner table around the posterior fossa
POSTERIOR_WALL_Y = -30.0  # behind this the skull reaches down to the foramen magnum
PETROUS_BOTTOM_Z = -4.0
TENTORIUM_Z = 54.0
FLOOR_MAX_Z = 60.0  # above this no point is below the cranial floor

# Brainstem cross-section along z (knots): half-width, half-length, centre y.
MIDBRAIN_TOP_Z = 53.0
STEM_RIM_MM = 2.2  # prepontine and ambient cisterns around the brainstem
BASAL_TOP_Z = 66.0  # no brainstem, cistern or sylvian fissure above this
BRAINSTEM_Z = (-30.0, 0.0, 15.0, 22.0, 32.0, 40.0, 47.0, 56.0)
BRAINSTEM_RX = (6.5, 8.5, 9.5, 15.0, 15.0, 11.0, 12.5, 12.5)
BRAINSTEM_RY = (5.5, 7.5, 8.0, 12.0, 12.0, 8.5, 9.5, 9.5)
BRAINSTEM_CY = (26.0, 22.0, 18.0, 12.0, 12.0, 15.0, 13.0, 12.0)
CISTERNA_MAGNA = ((0.0, 58.0, 4.0), (5.0, 12.0, 10.0))
FOURTH_VENTRICLE_Z = (10.0, 16.0, 26.0, 33.0)
FOURTH_VENTRICLE_RX = (0.0, 5.0, 7.5, 0.0)

# Lateral ventricle centre lines (x >= 0 side): (x, y, z, radius) knots.
VENTRICLE_BODY = ((12.0, -35.0, 59.0, 3.0), (8.0, -25.0, 63.0, 5.5), (8.0, -8.0, 68.0, 5.0),
                  (11.0, 10.0, 69.0, 5.0), (20.0, 27.0, 62.0, 7.0), (17.0, 46.0, 57.0, 2.5))
VENTRICLE_TEMPORAL = ((20.0, 27.0, 62.0, 5.0), (28.0, 20.0, 48.0, 3.5), (30.0, 4.0, 38.0, 2.5),
                      (30.0, -10.0, 33.0, 1.5))
ATRIUM = VENTRICLE_BODY[4][:3]
THIRD_VENTRICLE = (0.0, 2.0, 53.0, 1.6, 13.0, 9.0)  # centre, half-width, half-length, half-height
PINEAL = (0.0, 24.0, 55.0)
# (centre), (radii) of deep grey nuclei, x >= 0 side.
CAUDATE = ((12.5, -17.0, 61.0), (6.0, 10.0, 11.0))
LENTIFORM = ((24.0, -4.0, 51.0), (7.0, 16.0, 10.0))
THALAMUS = ((10.0, 10.0, 54.0), (8.5, 12.0, 9.0))
GLOBUS_PALLIDUS = (18.0, -2.0, 51.0)
INSULA_X = 35.0
CORTEX_MM = 2.5
GREY_FIELD = 0.45  # |folding field| below this near a sulcus is cortex (about CORTEX_MM from it)
SULCUS_DEPTH_MM = 8.0
FOLDING_WAVELENGTH_MM = (17.0, 26.0)
FOLIA_WAVELENGTH_MM = (15.0, 25.0)  # wobble of the folia
FOLIUM_MM = 4.5
FOLDING_RADIUS_MM = 72.0  # sulci are drawn on a sphere of this radius, squeezed radially
FOLDING_RADIAL_SQUEEZE = 0.3  # < 1: the field varies slowly with depth, so sulci run radially
STRIPE_WAVELENGTH_MM = (18.0, 26.0)  # two sulci per wavelength
STRIPE_WOBBLE_MM = 10.0
SLOW_WAVELENGTH_MM = (40.0, 70.0)  # modulates sulcal depth and the stripes' course
AIR_CELL_WAVELENGTH_MM = (6.0, 10.0)  # mastoid and ethmoid cells
SKIN_MM = 2.0

# Skull-base cavities and face: (centre), (radii).
SPHENOID_SINUS = ((0.0, -33.0, 14.0), (17.0, 13.0, 10.0))
ETHMOID_CELLS = ((0.0, -62.0, 22.0), (12.0, 22.0, 11.0))
FRONTAL_SINUS = ((0.0, -90.0, 52.0), (19.0, 7.0, 12.0))
FRONTAL_BOSS = ((0.0, -88.0, 50.0), (26.0, 16.0, 18.0))  # where the frontal bone thickens
FRONTAL_BOSS_MM = 7.0
MAXILLARY_SINUS = ((26.0, -54.0, -12.0), (13.0, 16.0, 17.0))
NASAL_CAVITY = ((0.0, -64.0, -6.0), (11.0, 26.0, 22.0))
MASTOID = ((56.0, 26.0, 10.0), (14.0, 16.0, 15.0))
GLOBE = ((31.0, -70.0, 20.0), 11.5)
LENS = ((31.0, -80.0, 20.0), (4.5, 2.0, 4.5))
ORBIT_FAT = ((27.0, -58.0, 20.0), (11.5, 20.0, 10.0))
OPTIC_NERVE = ((31.0, -72.0, 20.0), (16.0, -40.0, 20.0), 2.2)  # from the globe to the apex, radius
NOSE = ((0.0, -100.0, -8.0), (10.0, 16.0, 27.0))
EAR = ((79.0, 14.0, 14.0), (5.0, 13.0, 22.0))
SINUS_WALL = 1.25  # bony walls of air cavities reach this normalised squared radius
C1_RING = (0.0, 24.0, 21.0, 23.0, -19.0, -5.0)  # x, y, half-width, half-length, z range
DENS = (0.0, 5.0, 7.0, -30.0, -4.0)  # x, y, radius, z range
PHARYNX = (0.0, -12.0, 14.0, 5.0, -2.0)  # x, y, half-width, half-length, below z
MANDIBLE = (0.0, -30.0, 50.0, 58.0, 5.0, -6.0)  # arch: centre x, y, half-width, half-length, thickness, below z
ZYGOMA = (58.0, -22.0, 5.0, 22.0, 0.0, 12.0)  # arches: x, y, half-width, half-length, z range

MASK_DTYPE = np.uint8
BLOB_WOBBLE = 0.22  # relative wobble of intraparenchymal and subarachnoid outlines
IPH_LOBE_WAVELENGTH = (1.2, 2.5)  # over unit directions: a few lobes
SAH_PATCH_WAVELENGTH_MM = (20.0, 40.0)
_BIT = {name: np.uint8(1 << i) for i, name in enumerate(SUBTYPES)}

# Tissue codes used while rendering one slice (the HU comes from _TISSUE_HU or an override).
(T_AIR, T_FAT, T_SOFT, T_BONE, T_CSF_SUB, T_CSF_VENT, T_GREY, T_WHITE, T_DEEP, T_STEM, T_CEREB,
 T_DURA, T_GLOBE, T_LENS, T_OEDEMA, T_BLOOD, T_CALC) = range(17)
_TISSUE_HU = np.array([AIR_HU, FAT_HU, SOFT_TISSUE_HU, CORTICAL_BONE_HU, CSF_HU, CSF_HU, GREY_HU,
                       WHITE_HU, DEEP_GREY_HU, BRAINSTEM_HU, CEREBELLUM_HU, DURA_HU, GLOBE_HU,
                       LENS_HU, OEDEMA_HU, CLOT_HU[0], CALCIFICATION_HU[0]], np.float32)
_SOFT_TISSUES = (T_SOFT, T_CSF_SUB, T_CSF_VENT, T_GREY, T_WHITE, T_DEEP, T_STEM, T_CEREB, T_DURA,
                 T_GLOBE, T_OEDEMA)
_PARENCHYMA = (T_GREY, T_WHITE, T_DEEP, T_STEM, T_CEREB)


# =========================================================================== small geometry helpers
def _q(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Normalised squared ellipsoid radius: < 1 inside."""
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2


def _q2(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Normalised squared ellipse radius in the axial plane."""
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2


def _segment_distance(px, py, pz, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance from points to segment a-b (3-D) and the position along it in [0, 1]."""
    d = b - a
    t = np.clip(((px - a[0]) * d[0] + (py - a[1]) * d[1] + (pz - a[2]) * d[2]) / float(d @ d), 0.0, 1.0)
    return np.sqrt((px - a[0] - t * d[0]) ** 2 + (py - a[1] - t * d[1]) ** 2 + (pz - a[2] - t * d[2]) ** 2), t


def _tube(px, py, pz, knots: np.ndarray) -> np.ndarray:
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


# =========================================================================== per-study anatomy
@dataclass(frozen=True)
class _Anatomy:
    """Random per-study variation of the canonical head."""

    skull_mm: float
    scalp_mm: float
    fat_mm: float  # subcutaneous fat of face and neck
    csf_mm: float  # subarachnoid space over the convexity (grows with atrophy)
    sulcus_width: float  # threshold on the folding field (grows with atrophy)
    open_sulcus_mm: float  # sulci hold CSF down to this depth (grows with atrophy)
    fissure_mm: float  # half-width of the interhemispheric and sylvian fissures
    ventricle_scale: float
    hu_offset: float  # scanner calibration: shifts all soft tissue
    grey_white_gap: float  # extra grey-white contrast, HU
    folding: tuple[np.ndarray, np.ndarray]
    sulcus_depth: tuple[np.ndarray, np.ndarray]  # slow field modulating sulcal depth and stripes
    stripe_k: float  # wave number of the sulcal stripes, rad/mm
    stripe_phase: float
    folia: tuple[np.ndarray, np.ndarray]
    air_cells: tuple[np.ndarray, np.ndarray]  # mastoid and ethmoid septa
    ventricles: tuple[np.ndarray, ...]  # capsule chains, both sides

    @staticmethod
    def sample(rng: np.random.Generator) -> _Anatomy:
        atrophy = rng.beta(1.5, 2.5)  # 0 young .. 1 old: wider sulci, fissures, ventricles
        vscale = 0.8 + 0.7 * atrophy + rng.uniform(-0.08, 0.08)
        chains = []
        for side in (1.0, -1.0):
            for knots in (VENTRICLE_BODY, VENTRICLE_TEMPORAL):
                arr = np.array(knots, np.float32)
                arr[:, 0] *= side * (0.85 + 0.15 * vscale)
                arr[:, 3] *= vscale
                chains.append(arr)
        return _Anatomy(
            skull_mm=rng.uniform(5.0, 7.5),
            scalp_mm=rng.uniform(3.5, 6.5),
            fat_mm=rng.uniform(3.0, 9.0),
            csf_mm=0.6 + 2.2 * atrophy,
            sulcus_width=0.05 + 0.16 * atrophy,
            open_sulcus_mm=3.0 + 14.0 * atrophy,
            fissure_mm=0.5 + 1.3 * atrophy,
            ventricle_scale=vscale,
            hu_offset=rng.uniform(-3.0, 3.0),
            grey_white_gap=rng.uniform(-1.5, 1.5),
            folding=_waves(8, FOLDING_WAVELENGTH_MM, rng),
            sulcus_depth=_waves(4, SLOW_WAVELENGTH_MM, rng),
            stripe_k=2 * np.pi / rng.uniform(*STRIPE_WAVELENGTH_MM),
            stripe_phase=rng.uniform(0, 2 * np.pi),
            folia=_waves(8, FOLIA_WAVELENGTH_MM, rng),
            air_cells=_waves(10, AIR_CELL_WAVELENGTH_MM, rng),
            ventricles=tuple(chains),
        )


# =========================================================================== hemorrhages and mimics
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
        reach = self.size * (1 + BLOB_WOBBLE * math.sqrt(2 * self.waves[0].shape[1])) + margin
        r2 = (c.x - self.centre[0]) ** 2 + (c.y - self.centre[1]) ** 2 + (c.z - self.centre[2]) ** 2
        near = np.flatnonzero(r2 < reach**2)
        offset = np.stack([c.x[near] - self.centre[0], c.y[near] - self.centre[1], c.z[near] - self.centre[2]], axis=1)
        r = np.sqrt(r2[near])
        # Intraparenchymal: lobulated outline (waves over the direction); subarachnoid: ragged patch.
        where = offset / np.maximum(r, 1e-3)[:, None] if self.subtype == "intraparenchymal" else offset / self.size
        return near, r, self.size * (1 + BLOB_WOBBLE * _wave_sum(where.astype(np.float32), self.waves))


@dataclass(frozen=True)
class _Calcification:
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    hu: float


def _surface_point(z: float, azimuth: float) -> np.ndarray:
    """Point on the inner table at height ``z`` and azimuth (radians, 0 = patient left, pi/2 = back)."""
    c, power = (CRANIUM_C_UP, CRANIUM_TOP_POWER) if z > CRANIUM_Z_EQ else (CRANIUM_C_LOW, 2.0)
    f = math.sqrt(max(1e-3, 1.0 - abs((z - CRANIUM_Z_EQ) / c) ** power))
    return np.array([CRANIUM_A * f * math.cos(azimuth), CRANIUM_Y + CRANIUM_B * f * math.sin(azimuth), z], np.float32)


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
        return _Bleed(subtype, hu, _surface_point(z, azimuth), size=rng.uniform(50, 85),
                      thickness=rng.uniform(3, 13), side=side)
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
        return _Bleed(subtype, hu, centre.astype(np.float32), size=rng.uniform(6, 20),
                      waves=_waves(6, IPH_LOBE_WAVELENGTH, rng), rim_mm=rng.uniform(1.5, 5.0) * (rng.random() < 0.7))
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
        return _Bleed(subtype, float(rng.uniform(*SAH_HU)), np.asarray(centre, np.float32),
                      size=rng.uniform(18, 34), waves=_waves(6, SAH_PATCH_WAVELENGTH_MM, rng))
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


# =========================================================================== pose and slice points
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

    d_in: np.ndarray = field(default=None)  # signed distance to the inner table, mm (< 0 inside)
    posterior: np.ndarray = field(default=None)  # behind the petrous ridges (posterior fossa column)
    supratentorial: np.ndarray = field(default=None)
    code: np.ndarray = field(default=None)
    sulcus_wide: np.ndarray = field(default=None)
    third_fourth_ventricle: np.ndarray = field(default=None)


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


# =========================================================================== rendering
def _inner_table(p: _Points) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Signed distance to the inner table (mm, first order; < 0 inside) and the normalised vector."""
    up = p.z > CRANIUM_Z_EQ
    c = np.where(up, np.float32(CRANIUM_C_UP), np.float32(CRANIUM_C_LOW))
    ux, uy, uz = p.x / CRANIUM_A, (p.y - CRANIUM_Y) / CRANIUM_B, (p.z - CRANIUM_Z_EQ) / c
    az = np.abs(uz)
    power = np.where(up, np.float32(CRANIUM_TOP_POWER), np.float32(2.0))
    rho = np.sqrt(ux * ux + uy * uy + az**power) + np.float32(1e-6)
    dz = 0.5 * power * az ** (power - 1) / c  # d(rho^2)/dz / 2
    grad = np.sqrt((ux / CRANIUM_A) ** 2 + (uy / CRANIUM_B) ** 2 + dz * dz) / rho
    return (rho - 1.0) / grad, ux, uy, uz


def _floor(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cranial floor under (x, y): height, bone thickness, distance to the petrous ridge, posterior-fossa flag."""
    ax = np.abs(x)
    (x0, y0), (x1, y1) = PETROUS_APEX, PETROUS_LATERAL
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((ax - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    ridge_dist = np.hypot(ax - x0 - t * dx, y - y0 - t * dy)
    posterior = y > y0 + np.maximum(ax - x0, 0.0) * (dy / dx)
    sphenoid_ridge = np.where(ax < 12, -26.0, -20.0 - (ax - 12) * 0.4)
    anterior = y < sphenoid_ridge
    central = ~posterior & ~anterior & (ax < x0)

    fm_x, fm_y, fm_rx, fm_ry = FORAMEN_MAGNUM
    # A flat-bottomed bowl: the cerebellum fills a broad fossa just above the foramen magnum.
    bowl = POSTERIOR_FOSSA_RIM_Z * ((x / 64.0) ** 2 + ((y - fm_y) / 56.0) ** 2) ** 1.7
    clivus = np.where(ax < 16, POSTERIOR_FOSSA_RIM_Z - 1.9 * (y - y0), -np.inf)
    posterior_floor = np.where(_q2(x, y, fm_x, fm_y, fm_rx, fm_ry) < 1, -np.inf, np.maximum(bowl, clivus))
    middle_floor = (np.clip(MIDDLE_FOSSA_Z + 16 * ((ax - 42) / 28) ** 2, MIDDLE_FOSSA_Z, 30.0)
                    + 10 * np.clip((sphenoid_ridge + 18 - y) / 18, 0.0, 1.0))
    # Orbital roofs dome up over the orbits on both sides of the cribriform plate.
    anterior_floor = (ANTERIOR_FOSSA_Z - 5 + 7 * np.exp(-(((ax - 28) / 13) ** 2))
                      - (ANTERIOR_FOSSA_Z - CRIBRIFORM_Z) * np.exp(-((x / 7) ** 2)))
    # The anterior and middle fossae meet in a rounded step along the sphenoid ridge.
    front = 0.5 - 0.5 * np.tanh((y - sphenoid_ridge) / 5.0)
    middle_floor = front * anterior_floor + (1 - front) * middle_floor
    middle_mm = front * SKULL_BASE_MM[1] + (1 - front) * SKULL_BASE_MM[3]
    regions = [posterior, anterior, central]
    floor = np.select(regions, [posterior_floor, anterior_floor, SELLA_Z], middle_floor)
    thickness = np.select(regions, list(SKULL_BASE_MM[:3]), middle_mm)
    thickness = np.where(posterior & (ax < 16) & (y < fm_y - fm_ry), CLIVUS_MM, thickness)

    crest = PETROUS_CREST_Z - 8 * ((ax - 38) / 26) ** 2
    ridge = np.where((ax > 10) & (ax < 66), crest * (1 - ridge_dist / PETROUS_HALF_WIDTH), -np.inf)
    return (np.maximum(floor, ridge).astype(np.float32), thickness.astype(np.float32),
            ridge_dist.astype(np.float32), posterior)


def _tentorium(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height of the tentorium: highest at the notch, sloping down to the transverse sinuses."""
    return TENTORIUM_Z - 0.3 * np.abs(x) - 0.22 * np.clip(y - 20.0, 0.0, None)


class _Renderer:
    """Noise-free HU and hemorrhage bits for arbitrary points of the canonical head."""

    def __init__(self, anatomy: _Anatomy, bleeds: list[_Bleed], calcifications: list[_Calcification], shift_mm: float):
        self.a = anatomy
        self.bleeds = bleeds
        self.extra_axial = [b for b in bleeds if b.subtype in ("epidural", "subdural")]
        self.calcifications = calcifications
        self.shift_mm = shift_mm
        self.hu_lut = _TISSUE_HU.copy()
        self.hu_lut[list(_SOFT_TISSUES)] += anatomy.hu_offset
        self.hu_lut[T_GREY] += anatomy.grey_white_gap / 2
        self.hu_lut[T_WHITE] -= anatomy.grey_white_gap / 2

    # ------------------------------------------------------------------ whole head
    def _shell(self, p: _Points, ax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Skull and scalp thickness (mm): skull thicker front and back, thin over the temporal
        squama, thick at the frontal sinus; scalp thick over the suboccipital muscles."""
        skull = self.a.skull_mm * (0.85 + 0.45 * np.clip(p.y / CRANIUM_B, -1, 1) ** 2)
        temporal = np.clip((ax / CRANIUM_A - 0.6) / 0.4, 0, 1) * np.clip((60 - p.z) / 30, 0, 1)
        skull *= 1 - 0.4 * temporal
        skull += FRONTAL_BOSS_MM * np.clip(1 - _q(p.x, p.y, p.z, *FRONTAL_BOSS), 0, 1)
        suboccipital = np.clip((p.y - 20) / 60, 0, 1) * np.clip((50 - p.z) / 50, 0, 1)
        return skull, self.a.scalp_mm * (1 + 1.5 * suboccipital)

    @staticmethod
    def _skin(p: _Points, ax: np.ndarray, d_in: np.ndarray, shell: np.ndarray, margin: float) -> np.ndarray:
        """Inside the skin (grown by ``margin`` mm): head, ears, nose."""
        inside = (d_in < shell + margin) | (_q(ax, p.y, p.z, EAR[0], np.add(EAR[1], margin)) < 1)
        inside |= _q(p.x, p.y, p.z, NOSE[0], np.add(NOSE[1], margin)) < 1
        return inside & (p.z > LOWEST_Z - margin)

    def inside_skin(self, p: _Points, margin: float) -> np.ndarray:
        ax = np.abs(p.x)
        return self._skin(p, ax, _inner_table(p)[0], sum(self._shell(p, ax)), margin)

    def render(self, p: _Points) -> tuple[np.ndarray, np.ndarray]:
        """HU (float32) and hemorrhage bitmask (uint8) at the points."""
        n = p.x.size
        code = np.full(n, T_AIR, np.uint8)
        hu_override = np.full(n, np.nan, np.float32)
        bits = np.zeros(n, MASK_DTYPE)

        d_in, ux, uy, uz = _inner_table(p)
        floor = np.full(n, -np.inf, np.float32)
        base_mm = np.zeros(n, np.float32)
        ridge_dist = np.full(n, np.inf, np.float32)
        posterior = np.zeros(n, bool)
        low = np.flatnonzero(p.z < FLOOR_MAX_Z)
        floor[low], base_mm[low], ridge_dist[low], posterior[low] = _floor(p.x[low], p.y[low])

        ax = np.abs(p.x)
        skull, scalp = self._shell(p, ax)

        cavity = (d_in < 0) & (p.z > floor)
        # Bone encloses the brain: above the skull base, and around the posterior fossa down to
        # the foramen magnum (the face in front stays soft tissue with its own bones).
        cranial = (p.z > floor - base_mm) | ((p.z > 0) & (p.y > POSTERIOR_WALL_Y))
        face = (p.z > FACE_BONE_Z) & ((ax > ORBIT_RIM_X) | (ax < NASAL_BONE_X))  # orbital rims, nasal bones
        outer = self._skin(p, ax, d_in, skull + scalp, 0.0)
        code[outer] = T_SOFT
        # Face and neck (below the vault) have a layer of subcutaneous fat under the skin.
        under_skin = skull + scalp - SKIN_MM - d_in
        code[outer & ~cranial & (under_skin > 0) & (under_skin < self.a.fat_mm)] = T_FAT
        vault = (d_in >= 0) & (d_in < skull) & (cranial | face)
        code[vault] = T_BONE
        across = np.clip(d_in / np.maximum(skull, 1e-3), 0, 1)  # 0 inner table .. 1 outer table
        hu_override[vault] = np.where(np.abs(across[vault] - 0.5) > 0.28, CORTICAL_BONE_HU, DIPLOE_HU)
        frontal_sinus = vault & (_q(p.x, p.y, p.z, *FRONTAL_SINUS) < 1) & (across > 0.2) & (across < 0.8)
        code[frontal_sinus] = T_AIR
        hu_override[frontal_sinus] = np.nan
        # Skull base: under the fossae, and the thick lateral / posterior walls around the posterior fossa.
        base = (d_in < 0) & ~cavity & ((p.z > floor - base_mm) | (cranial & (d_in > -BASE_WALL_MM)))
        code[base] = T_BONE
        hu_override[base] = SKULL_BASE_HU

        below = np.flatnonzero(outer & ~cavity & (p.z < ANTERIOR_FOSSA_Z + 8) & ~vault)
        if below.size:
            self._skull_base(p.take(below), ridge_dist[below], code, hu_override, below)

        inside = np.flatnonzero(cavity)
        if inside.size:
            cav = _Cavity(**vars(p.take(inside)))
            cav.d_in = d_in[inside]
            cav.posterior = posterior[inside]
            cav.supratentorial = ~cav.posterior | (cav.z > _tentorium(cav.x, cav.y))
            self._brain(cav, np.stack([ux[inside], uy[inside], uz[inside]], axis=1), floor[inside])
            hu_in, bits[inside] = self._hemorrhages_and_mimics(cav)
            code[inside] = cav.code
            hu_override[inside] = hu_in

        hu = self.hu_lut[code]
        return np.where(np.isnan(hu_override), hu, hu_override), bits

    # ------------------------------------------------------------------ below the cranial floor
    def _skull_base(self, p: _Points, ridge_dist: np.ndarray, code: np.ndarray, hu: np.ndarray, index: np.ndarray) -> None:
        """Petrous bones, air cavities, orbits and the cervical canal (writes into code / hu at index)."""
        c = code[index]
        h = hu[index]
        ax = np.abs(p.x)

        def set_(sel: np.ndarray, tissue: int, value: float = np.nan) -> None:
            c[sel], h[sel] = tissue, value

        def cells(sel: np.ndarray, threshold: float) -> np.ndarray:  # air cells between bony septa
            pts = np.stack([p.x[sel], p.y[sel], p.z[sel]], axis=1)
            return _wave_sum(pts, self.a.air_cells) > threshold

        def cavity_with_wall(q: np.ndarray) -> np.ndarray:
            set_((q < SINUS_WALL) & (q >= 1.0), T_BONE, SKULL_BASE_HU)
            air = q < 1.0
            set_(air, T_AIR)
            return air

        # Petrous pyramid: widest at its base, dense and a little inhomogeneous.
        crest = PETROUS_CREST_Z - 8 * ((ax - 38) / 26) ** 2
        pyramid = ((ridge_dist < PETROUS_HALF_WIDTH * (0.55 + 0.45 * np.clip((crest - p.z) / 25, 0, 1)))
                   & (ax > 10) & (ax < 64) & (p.z < crest) & (p.z > PETROUS_BOTTOM_Z))
        if pyramid.any():
            set_(pyramid, T_BONE, PETROUS_HU)
            h[pyramid] -= 500 * cells(pyramid, 0.5)
        mastoid = _q(ax, p.y, p.z, *MASTOID) < 1
        if mastoid.any():
            air = mastoid.copy()
            air[mastoid] = cells(mastoid, 0.3)
            set_(mastoid, T_BONE, SKULL_BASE_HU)
            set_(air, T_AIR)

        # Orbits: fat cone, globe, lens, thin bony walls.
        fat = _q(ax, p.y, p.z, *ORBIT_FAT)
        set_((fat < 1.15) & (fat >= 1.0), T_BONE, SKULL_BASE_HU)
        set_(fat < 1, T_FAT)
        (n0, n1, nerve_r) = OPTIC_NERVE
        set_((fat < 1) & (_segment_distance(ax, p.y, p.z, np.array(n0), np.array(n1))[0] < nerve_r), T_SOFT)
        set_(_q(ax, p.y, p.z, GLOBE[0], (GLOBE[1],) * 3) < 1, T_GLOBE)
        set_(_q(ax, p.y, p.z, *LENS) < 1, T_LENS)

        cavity_with_wall(_q(p.x, p.y, p.z, *SPHENOID_SINUS))
        ethmoid = cavity_with_wall(_q(p.x, p.y, p.z, *ETHMOID_CELLS))
        if ethmoid.any():
            septa = ethmoid.copy()
            septa[ethmoid] = ~cells(ethmoid, -0.6)
            set_(septa, T_BONE, SKULL_BASE_HU * 0.6)
        cavity_with_wall(_q(ax, p.y, p.z, *MAXILLARY_SINUS))
        nasal = _q(p.x, p.y, p.z, *NASAL_CAVITY)
        cavity_with_wall(nasal)
        set_((nasal < 1) & (ax < 1.2), T_BONE, SKULL_BASE_HU * 0.6)  # septum

        # Upper cervical spine (the canal itself continues the cavity through the foramen magnum):
        # C1 ring, dens in front, pharynx further forward, mandible and zygomatic arches.
        cx, cy, rx, ry, z0, z1 = C1_RING
        set_((_q2(p.x, p.y, cx, cy, rx, ry) < 1) & (p.z > z0) & (p.z < z1), T_BONE, SKULL_BASE_HU)
        dx, dy, dr, dz0, dz1 = DENS
        set_((_q2(p.x, p.y, dx, dy, dr, dr) < 1) & (p.z > dz0) & (p.z < dz1), T_BONE, SKULL_BASE_HU)
        px_, py_, prx, pry, pz = PHARYNX
        set_((_q2(p.x, p.y, px_, py_, prx, pry) < 1) & (p.z < pz), T_AIR)
        mx, my, mrx, mry, mt, mz = MANDIBLE
        arch = np.sqrt(_q2(p.x, p.y, mx, my, mrx, mry))
        set_((np.abs(arch - 1) * min(mrx, mry) < mt / 2) & (p.y < my + 20) & (p.z < mz), T_BONE, SKULL_BASE_HU)
        zx, zy, zrx, zry, zz0, zz1 = ZYGOMA
        set_((_q2(ax, p.y, zx, zy, zrx, zry) < 1) & (p.z > zz0) & (p.z < zz1), T_BONE, SKULL_BASE_HU)
        code[index], hu[index] = c, h

    # ------------------------------------------------------------------ brain
    def _brain(self, c: _Cavity, u: np.ndarray, floor: np.ndarray) -> None:
        """Tissue codes of intracranial points (sets c.code, c.sulcus_wide, c.third_fourth_ventricle)."""
        a = self.a
        n = c.x.size
        inf = np.float32(np.inf)
        code = np.full(n, T_CSF_SUB, np.uint8)
        # Mass effect: displace the midline structures away from the bleeds (subfalcine shift).
        bump = np.exp(-((c.x / 45) ** 2 + (c.y / 55) ** 2 + ((c.z - 62) / 35) ** 2) / 2)
        xs = c.x - np.float32(self.shift_mm) * bump
        ax = np.abs(xs)
        push = np.zeros(n, np.float32)
        for b in self.extra_axial:
            np.maximum(push, b.push(c), out=push)
        supra = c.supratentorial
        infra = ~supra
        tent = _tentorium(c.x, c.y)

        # ---- distance below each brain surface; the CSF lies between the surfaces and bone or dura
        # The interhemispheric fissure runs the whole length except where the corpus callosum and
        # the diencephalon join the hemispheres.
        callosal = (np.abs(c.y - 2) < 36) & (c.z > 38) & (c.z < 78)
        diencephalic = (c.y > -22) & (c.z <= 38)
        fissure = ~(callosal | diencephalic)
        stem, stem_rim, fourth, basal_surface = self._basal(c, ax, infra)
        surfaces = np.stack([
            -(c.d_in + push) - a.csf_mm,  # convexity
            np.where(c.posterior, c.z - tent - 0.5, c.z - floor - 1.0),  # floor or tentorium
            np.where(fissure, ax - a.fissure_mm, inf),  # medial surface
            basal_surface,  # sylvian fissures, insula, basal cisterns
        ])
        depth = surfaces.min(axis=0)

        cerebrum = supra & (depth >= 0)
        code[cerebrum] = T_WHITE
        sulcus_wide = np.zeros(n, bool)
        zone = np.flatnonzero(cerebrum & (depth < SULCUS_DEPTH_MM * 1.4 + CORTEX_MM))
        if zone.size:
            d = depth[zone]
            g, slow = self._folding(c, u, xs, surfaces, zone)
            g = np.abs(g)
            sulcal_depth = SULCUS_DEPTH_MM * (1 + 0.3 * slow)
            widen = 0.35 + 1.3 * np.exp(-d / 3.0)  # sulci are closed at depth, open at the surface
            grey = (d < CORTEX_MM) | ((g < GREY_FIELD) & (d < sulcal_depth + CORTEX_MM))
            local = np.where(grey, T_GREY, T_WHITE).astype(np.uint8)
            local[(g < a.sulcus_width * widen) & (d < a.open_sulcus_mm)] = T_CSF_SUB  # deeper, banks touch
            code[zone] = local
            sulcus_wide[zone] = (g < a.sulcus_width * widen + 0.15) & (d < a.open_sulcus_mm + 3.0)
        code[supra & fissure & (ax < 0.45) & (c.z > 30)] = T_DURA  # falx
        code[c.posterior & (np.abs(c.z - tent) < 0.35) & ~stem_rim] = T_DURA  # tentorium

        # Deep grey nuclei and ventricles (in shifted coordinates), all in a central box.
        box = np.flatnonzero(supra & (c.z > 28) & (c.z < 80) & (ax < 40) & (np.abs(c.y) < 55))
        if box.size:
            bx, by, bz = ax[box], c.y[box], c.z[box]
            deep = cerebrum[box] & ((_q(bx, by, bz, *CAUDATE) < 1) | (_q(bx, by, bz, *LENTIFORM) < 1)
                                    | (_q(bx, by, bz, *THALAMUS) < 1))
            code[box[deep]] = T_DEEP
            vent = np.full(box.size, inf, np.float32)
            for chain in a.ventricles:
                np.minimum(vent, _tube(xs[box], by, bz, chain), out=vent)
            code[box[vent < 0]] = T_CSF_VENT
        tx, ty, tz, trx, try_, trz = THIRD_VENTRICLE
        third = supra & (np.abs(xs - tx) < trx * a.ventricle_scale) & (((c.y - ty) / try_) ** 2 + ((c.z - tz) / trz) ** 2 < 1)
        code[third] = T_CSF_VENT

        # ---- infratentorial: brainstem, fourth ventricle, cerebellum with folia
        code[stem & (infra | ~third)] = T_STEM
        code[fourth] = T_CSF_VENT
        outer_depth = np.minimum(-c.d_in - a.csf_mm, c.z - floor - 1.0)  # below the occipital bone
        cereb_depth = np.minimum(outer_depth, tent - c.z - 0.5)
        cisterna_magna = _q(c.x, c.y, c.z, CISTERNA_MAGNA[0], (CISTERNA_MAGNA[1][0] + 4 * a.csf_mm, *CISTERNA_MAGNA[1][1:])) < 1
        cereb = np.flatnonzero(infra & (cereb_depth > 0) & (c.z > 0) & ~stem_rim & ~fourth & ~cisterna_magna)
        if cereb.size:
            d = outer_depth[cereb]
            pts = np.stack([c.x[cereb], c.y[cereb], c.z[cereb]], axis=1)
            # Folia: thin clefts parallel to the surface, wobbling.
            phase = d / FOLIUM_MM + 0.6 * _wave_sum(pts, a.folia)
            folium = (np.abs(phase - np.round(phase)) < 0.02 + 0.2 * a.sulcus_width) & (d < 6)
            code[cereb] = np.where(folium, T_CSF_SUB, T_CEREB)
            code[cereb[(np.abs(c.x[cereb]) < 1.0 + a.fissure_mm) & (c.y[cereb] > 55) & (c.z[cereb] < 30)]] = T_CSF_SUB

        c.code = code
        c.sulcus_wide = sulcus_wide & (code != T_CSF_VENT)
        c.third_fourth_ventricle = third | fourth

    def _basal(self, c: _Cavity, ax: np.ndarray, infra: np.ndarray) -> tuple[np.ndarray, ...]:
        """Brainstem, its CSF rim, fourth ventricle, and the depth below the basal surfaces.

        Only points below BASAL_TOP_Z are evaluated: nothing here reaches higher.
        """
        n = c.x.size
        stem, rim, fourth = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        surface = np.full(n, np.inf, np.float32)
        low = np.flatnonzero(c.z < BASAL_TOP_Z)
        if not low.size:
            return stem, rim, fourth, surface
        x, y, z, bax = c.x[low], c.y[low], c.z[low], ax[low]
        # Sylvian fissure: a sheet rising backwards and running obliquely forward from the insula.
        y_syl = -18.0 + (z - 38.0) * 1.1 - 0.45 * (bax - INSULA_X) + 4.0 * np.sin((bax - INSULA_X) / 8.0)
        in_syl = (z > 30) & (z < 64)
        fissure = self.a.fissure_mm
        syl_sheet = np.where(in_syl & (bax > INSULA_X), np.abs(y - y_syl) * 0.6 - 0.2 - 0.5 * fissure, np.inf)
        syl_cistern = np.where(in_syl & (np.abs(y - y_syl) < 9), np.abs(bax - INSULA_X - 1.0) - 0.5 * fissure, np.inf)
        # Basal cisterns: suprasellar in front, a rim around the brainstem (the ambient cisterns).
        rx = np.interp(z, BRAINSTEM_Z, BRAINSTEM_RX).astype(np.float32)
        ry = np.interp(z, BRAINSTEM_Z, BRAINSTEM_RY).astype(np.float32)
        cy = np.interp(z, BRAINSTEM_Z, BRAINSTEM_CY).astype(np.float32)
        rim_q = _q2(x, y, 0.0, cy, rx + STEM_RIM_MM, ry + STEM_RIM_MM)
        stem[low] = (_q2(x, y, 0.0, cy, rx, ry) < 1) & (z < MIDBRAIN_TOP_Z)
        rim[low] = (rim_q < 1) & (z < MIDBRAIN_TOP_Z - 3)
        rim_gap = np.where(z < MIDBRAIN_TOP_Z - 3, (np.sqrt(rim_q) - 1) * (rx + STEM_RIM_MM), np.inf)
        sella_gap = np.where(z < 48, (np.sqrt(_q2(x, y, 0.0, -10.0, 9.0, 9.0)) - 1) * 9.0, np.inf)
        surface[low] = np.minimum(np.minimum(syl_sheet, syl_cistern), np.minimum(rim_gap, sella_gap))
        v4x = np.interp(z, FOURTH_VENTRICLE_Z, FOURTH_VENTRICLE_RX).astype(np.float32)
        fourth[low] = infra[low] & (_q2(x, y, 0.0, cy + ry + 3.0, np.maximum(v4x, 1e-3), 3.5) < 1)
        return stem, rim, fourth, surface

    def _folding(self, c: _Cavity, u: np.ndarray, xs: np.ndarray, surfaces: np.ndarray,
                 zone: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Folding field at the ``zone`` points (sulci are where it is near zero) and a slow field.

        The field is evaluated at the point's position on the nearest brain surface with the depth
        squeezed, so it barely changes along the surface normal and sulci run perpendicular to the
        surface. Zero lines of an isotropic random field alone form closed loops; adding wobbly
        stripes (transverse on the convexity and medial surface, antero-posterior on the base, as
        the main sulci run) makes the pattern look like gyri.
        """
        folded = surfaces[:3, zone]  # the sylvian surfaces are lined by cortex but not folded
        nearest = folded.argmin(axis=0)
        depth = folded.min(axis=0) * FOLDING_RADIAL_SQUEEZE
        uu = u[zone]
        sphere = uu / np.sqrt((uu**2).sum(axis=1, keepdims=True)) * (FOLDING_RADIUS_MM - depth)[:, None]
        x, y, z = c.x[zone], c.y[zone], c.z[zone]
        side = np.sign(xs[zone])
        base = np.stack([x, y, -2 * FOLDING_RADIUS_MM + depth], axis=1)
        medial = np.stack([side * (2 * FOLDING_RADIUS_MM + depth), y, z], axis=1)
        on_base = nearest == 1
        pts = np.where(on_base[:, None], base, sphere)
        pts = np.where((nearest == 2)[:, None], medial, pts).astype(np.float32)
        slow = _wave_sum(pts, self.a.sulcus_depth)
        stripe = np.sin((np.where(on_base, pts[:, 0], pts[:, 1]) + STRIPE_WOBBLE_MM * slow) * self.a.stripe_k + self.a.stripe_phase)
        on_medial = nearest == 2  # medial sulci show little on CT: no stripes there
        stripe_weight = np.where(on_medial, 0.0, 1.0).astype(np.float32)
        iso_weight = np.select([on_base, on_medial], [0.4, 1.0], 0.7).astype(np.float32)
        return iso_weight * _wave_sum(pts, self.a.folding) + stripe_weight * stripe, slow

    def _hemorrhages_and_mimics(self, c: _Cavity) -> tuple[np.ndarray, np.ndarray]:
        hu = np.full(c.x.size, np.nan, np.float32)
        bits = np.zeros(c.x.size, MASK_DTYPE)
        regions = [b.region(c) for b in self.bleeds]  # all on the intact anatomy
        for b in self.bleeds:  # oedema first so that blood overwrites it
            if b.subtype == "intraparenchymal" and b.rim_mm > 0:
                c.code[b.oedema(c)] = T_OEDEMA
        for b, region in zip(self.bleeds, regions):
            c.code[region] = T_BLOOD
            hu[region] = b.hu
            bits[region] |= _BIT[b.subtype]
        for k in self.calcifications:
            inside = _q(c.x, c.y, c.z, k.centre, k.radii) < 1
            c.code[inside] = T_CALC
            hu[inside] = k.hu
        return hu, bits


# =========================================================================== the study
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
        lines.append((left[left[:, 0].argmax()], right[right[:, 0].argmax()], -rng.uniform(10, 30), rng.uniform(2, 4), False))
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


def _sample_pathology(rng: np.random.Generator, hemorrhage: bool | None, subtypes: Sequence[str] | None,
                      cover: tuple[float, float], pose: _Pose) -> tuple[list[_Bleed], float]:
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


def _render_series(renderer: _Renderer, slicer: _Slicer, z_world: np.ndarray, thickness: float, table: np.ndarray,
                   fov: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
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
        img = (acc / sub).reshape(size, size)
        np.maximum(img, TABLE_HU, out=img, where=table)
        _streaks(img, xs, ys, spacing, rng)
        if blur > 0.3:
            img = cv2.GaussianBlur(img, (0, 0), blur)
        img += _noise(rng, (size, size), spacing) * np.where(img > -500, np.float32(noise_sigma), np.float32(NOISE_AIR_SIGMA_HU))
        img[fov_circle] = FOV_PADDING_HU
        np.clip(np.rint(img), FOV_PADDING_HU, HU_MAX, out=hu_vol[i])
        if hits is not None:  # a pixel bleeds when most of its sub-slices do (else it is mostly partial volume)
            for k in range(len(SUBTYPES)):
                mask_vol[i].flat[np.flatnonzero(2 * hits[k] > sub)] |= _BIT[SUBTYPES[k]]
    return hu_vol, mask_vol


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


def _noise(rng: np.random.Generator, shape: tuple[int, int], spacing: float) -> np.ndarray:
    """Unit-variance CT-like noise with a grain of about NOISE_CORRELATION_MM."""
    white = rng.standard_normal(shape, dtype=np.float32)
    sigma = NOISE_CORRELATION_MM / spacing
    if sigma < 0.3:
        return white
    grain = cv2.GaussianBlur(white, (0, 0), sigma)
    return grain / np.float32(1.0 / (2.0 * math.sqrt(math.pi) * sigma))


def _labels_from_masks(masks: np.ndarray, spacing: float, sop_uids: list[str]) -> pd.DataFrame:
    """Per-slice 0/1 labels: a subtype counts when it covers more than MIN_LABEL_AREA_MM2."""
    min_pixels = MIN_LABEL_AREA_MM2 / spacing**2
    counts = np.stack([((masks >> k) & 1).reshape(len(masks), -1).sum(axis=1) for k in range(len(SUBTYPES))], axis=1)
    sub = (counts > min_pixels).astype(int)
    frame = pd.DataFrame(sub, columns=list(SUBTYPES), index=pd.Index(sop_uids, name=INDEX_NAME))
    frame.insert(0, "any", sub.max(axis=1) if len(sub) else np.zeros(0, int))
    return frame[list(CLASSES)]


# =========================================================================== DICOM output
def _check_bits(bits: str) -> None:
    if bits not in BITS_KINDS:
        raise ValueError(f"bits must be one of {BITS_KINDS}, got {bits!r}")


def _stored_pixels(hu: np.ndarray, bits: str) -> tuple[np.ndarray, int, int, float]:
    """HU slice -> (stored array, BitsStored, PixelRepresentation, RescaleIntercept)."""
    if bits == "16":
        return hu.astype(np.int16), 16, 1, 0.0
    if bits == "12":
        return np.clip(hu + 1024, 0, 4095).astype(np.uint16), 12, 0, -1024.0
    # "wrapped", the broken RSNA files: HU modulo 4096 in 12 unsigned bits, intercept 0
    return np.mod(np.maximum(hu, WRAPPED_HU_MIN).astype(np.int32), 4096).astype(np.uint16), 12, 0, 0.0


def _ds_number(value: float) -> str:
    """A DS string (at most 16 characters)."""
    return f"{value:.6f}".rstrip("0").rstrip(".")[:16]


def _dataset(study: PhantomStudy, i: int, bits: str, jpeg: bool) -> Dataset:
    stored, bits_stored, representation, intercept = _stored_pixels(study.hu[i], bits)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = study.sop_uids[i]
    # Uncompressed 12-bit files are implicit VR, as many RSNA files are; the rest explicit VR.
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if bits != "16" else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = study.sop_uids[i]
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = study.series_uid
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Manufacturer = "ich.phantom"
    ds.StudyDescription = "CT HEAD WITHOUT CONTRAST (SYNTHETIC)"
    ds.SeriesDescription = "Synthetic head CT (phantom)"
    ds.BodyPartExamined = "HEAD"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = study.instance_numbers[i]
    ds.KVP = 120
    ds.SliceThickness = _ds_number(study.thickness)
    ds.SpacingBetweenSlices = _ds_number(study.thickness)
    ds.ImagePositionPatient = [_ds_number(v) for v in study.positions[i]]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = _ds_number(study.positions[i][2])
    ds.PixelSpacing = [_ds_number(v) for v in study.spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = representation
    ds.RescaleIntercept = _ds_number(intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    if study.seed % 2:  # real files carry one or several windows
        ds.WindowCenter = [_ds_number(BRAIN.level), _ds_number(SUBDURAL.level)]
        ds.WindowWidth = [_ds_number(BRAIN.width), _ds_number(SUBDURAL.width)]
    else:
        ds.WindowCenter = _ds_number(BRAIN.level)
        ds.WindowWidth = _ds_number(BRAIN.width)
    if jpeg:
        ds.compress(JPEG2000Lossless, stored, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    else:
        ds.PixelData = stored.tobytes()
    return ds


def _write_files(study: PhantomStudy, out: Path, bits: str, jpeg: bool, masks: bool) -> list[Path]:
    images = out / "stage_2_train"
    images.mkdir(parents=True, exist_ok=True)
    if masks:
        (out / "masks").mkdir(exist_ok=True)
    paths = []
    for i, sop in enumerate(study.sop_uids):
        path = images / f"{sop}.dcm"
        pydicom.dcmwrite(path, _dataset(study, i, bits, jpeg), enforce_file_format=True)
        paths.append(path)
        if masks and not cv2.imwrite(str(out / "masks" / f"{sop}.png"), study.masks[i]):
            raise OSError(f"could not write mask for {sop} under {out / 'masks'}")
    return paths


def write_study(study: PhantomStudy, out_dir: Path, *, bits: str = "16", jpeg: bool = False, masks: bool = False) -> list[Path]:
    """Write one study in the RSNA layout under ``out_dir``; returns the DICOM paths (slice order).

    ``out_dir/stage_2_train/<SOPInstanceUID>.dcm``, its rows merged into
    ``out_dir/stage_2_train.csv`` (so several calls build one CSV), and with ``masks`` the
    bitmask PNGs ``out_dir/masks/<SOPInstanceUID>.png``. ``bits``: see :data:`BITS_KINDS`.
    """
    out_dir = Path(out_dir)
    _check_bits(bits)
    paths = _write_files(study, out_dir, bits, jpeg, masks)
    csv = out_dir / "stage_2_train.csv"
    labels = study.labels
    if csv.exists():
        previous = read_rsna_csv(csv)
        labels = pd.concat([previous.drop(labels.index, errors="ignore"), labels])
    write_rsna_csv(labels, csv)
    return paths


def write_dataset(
    out: Path,
    n_studies: int,
    seed: int,
    *,
    thickness: float = 5.0,
    bits: str = "mixed",
    jpeg: bool = False,
    masks: bool = False,
    progress: bool = True,
    n_slices: int | None = None,
    size: int = MATRIX,
) -> pd.DataFrame:
    """Generate and write ``n_studies`` studies in the RSNA layout under ``out``.

    Study ``i`` is ``generate_study(seed * DATASET_SEED_STRIDE + i)``, so datasets made with
    different seeds never share a study. ``bits="mixed"`` cycles 16-bit, 12-bit and wrapped
    storage over the studies. ``n_slices`` and ``size`` go to :func:`generate_study` (tests use
    small ones). Returns one row per slice: ``sop_uid, study_uid, series_uid,
    patient_id`` and the :data:`CLASSES` columns (the CSV holds the same labels).
    """
    if not 0 <= n_studies <= DATASET_SEED_STRIDE:
        raise ValueError(f"n_studies must be in [0, {DATASET_SEED_STRIDE}]")
    kinds = BITS_KINDS if bits == "mixed" else (bits,)
    _check_bits(kinds[0])  # before the long loop
    out = Path(out)
    rows = []
    for i in tqdm(range(n_studies), desc="phantom studies", unit="study", disable=not progress):
        study = generate_study(seed * DATASET_SEED_STRIDE + i, thickness=thickness, n_slices=n_slices, size=size)
        _write_files(study, out, kinds[i % len(kinds)], jpeg, masks)
        frame = study.labels.reset_index()
        frame.insert(1, "study_uid", study.study_uid)
        frame.insert(2, "series_uid", study.series_uid)
        frame.insert(3, "patient_id", study.patient_id)
        rows.append(frame)
    columns = [INDEX_NAME, "study_uid", "series_uid", "patient_id", *CLASSES]
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=columns)
    out.mkdir(parents=True, exist_ok=True)
    write_rsna_csv(table.set_index(INDEX_NAME)[list(CLASSES)], out / "stage_2_train.csv")
    return table[columns]
