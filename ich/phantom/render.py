"""Noise-free HU and hemorrhage bits at arbitrary points of the canonical head.

Each point gets a tissue code, from the outside in: skin, subcutaneous fat, skull vault and base,
the structures below the cranial floor (petrous bones, sinuses, orbits, upper cervical spine),
then the brain, and last the hemorrhages and mimics. Its HU comes from the per-study table of the
codes or from an override (bone, blood, calcifications).
"""

from __future__ import annotations

import numpy as np

from ich.phantom.anatomy import (
    _SOFT_TISSUES,
    _TISSUE_HU,
    ANTERIOR_FOSSA_Z,
    BASAL_TOP_Z,
    BASE_WALL_MM,
    BRAINSTEM_CY,
    BRAINSTEM_RX,
    BRAINSTEM_RY,
    BRAINSTEM_Z,
    C1_RING,
    CAUDATE,
    CISTERNA_MAGNA,
    CORTEX_MM,
    CORTICAL_BONE_HU,
    CRANIUM_A,
    CRANIUM_B,
    DENS,
    DIPLOE_HU,
    EAR,
    ETHMOID_CELLS,
    FACE_BONE_Z,
    FLOOR_MAX_Z,
    FOLDING_RADIAL_SQUEEZE,
    FOLDING_RADIUS_MM,
    FOLIUM_MM,
    FOURTH_VENTRICLE_RX,
    FOURTH_VENTRICLE_Z,
    FRONTAL_BOSS,
    FRONTAL_BOSS_MM,
    FRONTAL_SINUS,
    GLOBE,
    GREY_FIELD,
    INSULA_X,
    LENS,
    LENTIFORM,
    LOWEST_Z,
    MANDIBLE,
    MASTOID,
    MAXILLARY_SINUS,
    MIDBRAIN_TOP_Z,
    NASAL_BONE_X,
    NASAL_CAVITY,
    NOSE,
    OPTIC_NERVE,
    ORBIT_FAT,
    ORBIT_RIM_X,
    PETROUS_BOTTOM_Z,
    PETROUS_CREST_Z,
    PETROUS_HALF_WIDTH,
    PETROUS_HU,
    PHARYNX,
    POSTERIOR_WALL_Y,
    SINUS_WALL,
    SKIN_MM,
    SKULL_BASE_HU,
    SPHENOID_SINUS,
    STEM_RIM_MM,
    STRIPE_WOBBLE_MM,
    SULCUS_DEPTH_MM,
    T_AIR,
    T_BLOOD,
    T_BONE,
    T_CALC,
    T_CEREB,
    T_CSF_SUB,
    T_CSF_VENT,
    T_DEEP,
    T_DURA,
    T_FAT,
    T_GLOBE,
    T_GREY,
    T_LENS,
    T_OEDEMA,
    T_SOFT,
    T_STEM,
    T_WHITE,
    THALAMUS,
    THIRD_VENTRICLE,
    ZYGOMA,
    _Anatomy,
    _floor,
    _inner_table,
    _tentorium,
)
from ich.phantom.geometry import _Cavity, _Points, _q, _q2, _segment_distance, _tube, _wave_sum
from ich.phantom.lesions import _BIT, MASK_DTYPE, _Bleed, _Calcification


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
        skull, scalp = self._shell(p, ax)
        return self._skin(p, ax, _inner_table(p)[0], skull + scalp, margin)

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
            pts, behind = p.take(inside), posterior[inside]
            supratentorial = ~behind | (pts.z > _tentorium(pts.x, pts.y))
            cav = _Cavity(**vars(pts), d_in=d_in[inside], posterior=behind, supratentorial=supratentorial)
            self._brain(cav, np.stack([ux[inside], uy[inside], uz[inside]], axis=1), floor[inside])
            hu_in, bits[inside] = self._hemorrhages_and_mimics(cav)
            code[inside] = cav.code
            hu_override[inside] = hu_in

        hu = self.hu_lut[code]
        return np.where(np.isnan(hu_override), hu, hu_override), bits

    # ------------------------------------------------------------------ below the cranial floor
    def _skull_base(
        self, p: _Points, ridge_dist: np.ndarray, code: np.ndarray, hu: np.ndarray, index: np.ndarray
    ) -> None:
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
        pyramid = (
            (ridge_dist < PETROUS_HALF_WIDTH * (0.55 + 0.45 * np.clip((crest - p.z) / 25, 0, 1)))
            & (ax > 10)
            & (ax < 64)
            & (p.z < crest)
            & (p.z > PETROUS_BOTTOM_Z)
        )
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
        surfaces = np.stack(
            [
                -(c.d_in + push) - a.csf_mm,  # convexity
                np.where(c.posterior, c.z - tent - 0.5, c.z - floor - 1.0),  # floor or tentorium
                np.where(fissure, ax - a.fissure_mm, inf),  # medial surface
                basal_surface,  # sylvian fissures, insula, basal cisterns
            ]
        )
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
            deep = cerebrum[box] & (
                (_q(bx, by, bz, *CAUDATE) < 1) | (_q(bx, by, bz, *LENTIFORM) < 1) | (_q(bx, by, bz, *THALAMUS) < 1)
            )
            code[box[deep]] = T_DEEP
            vent = np.full(box.size, inf, np.float32)
            for chain in a.ventricles:
                np.minimum(vent, _tube(xs[box], by, bz, chain), out=vent)
            code[box[vent < 0]] = T_CSF_VENT
        tx, ty, tz, trx, try_, trz = THIRD_VENTRICLE
        third = (
            supra
            & (np.abs(xs - tx) < trx * a.ventricle_scale)
            & (((c.y - ty) / try_) ** 2 + ((c.z - tz) / trz) ** 2 < 1)
        )
        code[third] = T_CSF_VENT

        # ---- infratentorial: brainstem, fourth ventricle, cerebellum with folia
        code[stem & (infra | ~third)] = T_STEM
        code[fourth] = T_CSF_VENT
        outer_depth = np.minimum(-c.d_in - a.csf_mm, c.z - floor - 1.0)  # below the occipital bone
        cereb_depth = np.minimum(outer_depth, tent - c.z - 0.5)
        cisterna_magna = (
            _q(c.x, c.y, c.z, CISTERNA_MAGNA[0], (CISTERNA_MAGNA[1][0] + 4 * a.csf_mm, *CISTERNA_MAGNA[1][1:])) < 1
        )
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

    def _folding(
        self, c: _Cavity, u: np.ndarray, xs: np.ndarray, surfaces: np.ndarray, zone: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
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
        stripe = np.sin(
            (np.where(on_base, pts[:, 0], pts[:, 1]) + STRIPE_WOBBLE_MM * slow) * self.a.stripe_k + self.a.stripe_phase
        )
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
