"""The canonical head: tissue HU, anatomical landmarks and surfaces, and the per-study variation.

Every structure is a function of position in a canonical head frame, in mm: ``x`` towards the
patient's left, ``y`` posterior, ``z`` superior (DICOM LPS), origin on the midline at the level of
the foramen magnum.

Anatomy: scalp, skull with diploe and tables, skull base (anterior / middle / posterior fossae,
dense petrous ridges, clivus, sella), air in the frontal / ethmoid / sphenoid / maxillary sinuses
and mastoids, orbits, nasal cavity, cervical canal and C1; cerebrum with gyri and sulci (a 3-D
folding field), cortex and white matter, basal ganglia and thalami, lateral / third / fourth
ventricles, sylvian and interhemispheric fissures with the falx, basal cisterns, brainstem,
tentorium and cerebellum with folia.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ich.phantom.geometry import _Points, _q2, _waves

# --------------------------------------------------------------------------- Hounsfield units
AIR_HU = -1000.0
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
CLOT_HU = (58.0, 82.0)  # acute hemorrhage, before partial volume and noise
SAH_HU = (58.0, 75.0)  # blood diluted in CSF
CALCIFICATION_HU = (130.0, 500.0)


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
VENTRICLE_BODY = (
    (12.0, -35.0, 59.0, 3.0),
    (8.0, -25.0, 63.0, 5.5),
    (8.0, -8.0, 68.0, 5.0),
    (11.0, 10.0, 69.0, 5.0),
    (20.0, 27.0, 62.0, 7.0),
    (17.0, 46.0, 57.0, 2.5),
)
VENTRICLE_TEMPORAL = (
    (20.0, 27.0, 62.0, 5.0),
    (28.0, 20.0, 48.0, 3.5),
    (30.0, 4.0, 38.0, 2.5),
    (30.0, -10.0, 33.0, 1.5),
)
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


# Tissue codes used while rendering one slice (the HU comes from _TISSUE_HU or an override).
(
    T_AIR,
    T_FAT,
    T_SOFT,
    T_BONE,
    T_CSF_SUB,
    T_CSF_VENT,
    T_GREY,
    T_WHITE,
    T_DEEP,
    T_STEM,
    T_CEREB,
    T_DURA,
    T_GLOBE,
    T_LENS,
    T_OEDEMA,
    T_BLOOD,
    T_CALC,
) = range(17)
_TISSUE_HU = np.array(
    [
        AIR_HU,
        FAT_HU,
        SOFT_TISSUE_HU,
        CORTICAL_BONE_HU,
        CSF_HU,
        CSF_HU,
        GREY_HU,
        WHITE_HU,
        DEEP_GREY_HU,
        BRAINSTEM_HU,
        CEREBELLUM_HU,
        DURA_HU,
        GLOBE_HU,
        LENS_HU,
        OEDEMA_HU,
        CLOT_HU[0],
        CALCIFICATION_HU[0],
    ],
    np.float32,
)
_SOFT_TISSUES = (T_SOFT, T_CSF_SUB, T_CSF_VENT, T_GREY, T_WHITE, T_DEEP, T_STEM, T_CEREB, T_DURA, T_GLOBE, T_OEDEMA)
_PARENCHYMA = (T_GREY, T_WHITE, T_DEEP, T_STEM, T_CEREB)


# =========================================================================== surfaces of the canonical head
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
    middle_floor = np.clip(MIDDLE_FOSSA_Z + 16 * ((ax - 42) / 28) ** 2, MIDDLE_FOSSA_Z, 30.0) + 10 * np.clip(
        (sphenoid_ridge + 18 - y) / 18, 0.0, 1.0
    )
    # Orbital roofs dome up over the orbits on both sides of the cribriform plate.
    anterior_floor = (
        ANTERIOR_FOSSA_Z
        - 5
        + 7 * np.exp(-(((ax - 28) / 13) ** 2))
        - (ANTERIOR_FOSSA_Z - CRIBRIFORM_Z) * np.exp(-((x / 7) ** 2))
    )
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
    return (
        np.maximum(floor, ridge).astype(np.float32),
        thickness.astype(np.float32),
        ridge_dist.astype(np.float32),
        posterior,
    )


def _tentorium(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height of the tentorium: highest at the notch, sloping down to the transverse sinuses."""
    return TENTORIUM_Z - 0.3 * np.abs(x) - 0.22 * np.clip(y - 20.0, 0.0, None)


def _surface_point(z: float, azimuth: float) -> np.ndarray:
    """Point on the inner table at height ``z`` and azimuth (radians, 0 = patient left, pi/2 = back)."""
    c, power = (CRANIUM_C_UP, CRANIUM_TOP_POWER) if z > CRANIUM_Z_EQ else (CRANIUM_C_LOW, 2.0)
    f = math.sqrt(max(1e-3, 1.0 - abs((z - CRANIUM_Z_EQ) / c) ** power))
    return np.array([CRANIUM_A * f * math.cos(azimuth), CRANIUM_Y + CRANIUM_B * f * math.sin(azimuth), z], np.float32)


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
