"""ich.viewer: a stored study as NIfTI for the browser viewer, its heatmap, and how files are served."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

from ich import dicom, explain
from ich.inference import Predictor
from ich.labels import CLASSES
from ich.models import head_module
from ich.viewer import LPS_TO_RAS, heatmap_nifti, slice_axis, volume_nifti
from ich.worklist import Worklist
from tests.dicom_factory import make_ct, to_bytes
from tests.helpers import FakePredictor, head, make_checkpoint


def series(z: list[float], **overrides) -> dicom.Series:
    """A real series read back from DICOM bytes: 32x32 slices at the given table positions."""
    study, uid = "1.2.3", "1.2.3.4"
    files = [
        dicom.Upload(f"{i}.dcm", to_bytes(make_ct(z=p, study_uid=study, series_uid=uid, instance=i + 1, **overrides)))
        for i, p in enumerate(z)
    ]
    (s,) = dicom.load(files).series
    return s


def decode(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def test_affine_maps_voxels_to_patient_millimetres():
    s = series([10.0, 15.0, 20.0, 25.0], PixelSpacing=[0.5, 0.7])  # rows 0.5 mm apart, columns 0.7 mm
    affine = s.affine()
    assert affine is not None
    np.testing.assert_allclose(affine[:3, 0], [0.7, 0, 0])  # next column: along the row direction
    np.testing.assert_allclose(affine[:3, 1], [0, 0.5, 0])
    np.testing.assert_allclose(affine[:3, 2], [0, 0, 5.0])
    np.testing.assert_allclose(affine @ [0, 0, 3, 1], [0, 0, 25.0, 1])
    assert series([0.0], ImagePositionPatient=None).affine() is None  # no geometry, no guess


def test_volume_nifti_keeps_hu_and_geometry():
    s = series([0.0, 5.0, 10.0])
    vol = s.volume()
    img = decode(volume_nifti(vol, s.affine()))
    assert img.get_data_dtype() == np.int16 and img.shape == (32, 32, 3)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.rint(vol).astype(np.int16).transpose(2, 1, 0))
    np.testing.assert_allclose(img.affine, LPS_TO_RAS @ s.affine())
    # DICOM's patient left/posterior become NIfTI's -x/-y: the viewer shows it radiologically by itself.
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1


def test_slice_axis_gives_dicom_slice_locations():
    s = series([-30.0, -25.0, -20.0, -15.0])
    normal, locations = slice_axis(s.affine(), len(s))
    np.testing.assert_allclose(locations, [sl.location for sl in s.slices])
    np.testing.assert_allclose(normal, [0, 0, 1])
    # A volume stored without geometry: 1 mm steps from 0, so the viewer can still name each slice.
    assert slice_axis(None, 3) == ([0.0, 0.0, 1.0], [0.0, 1.0, 2.0])


def test_heatmap_nifti_is_uint8_on_the_volume_grid():
    s = series([0.0, 5.0])
    cam = np.zeros((2, 32, 32), np.float32)
    cam[1, 4, 7] = 1.0
    cam[0, 2, 3] = 0.5
    img = decode(heatmap_nifti(cam, s.affine()))
    data = np.asarray(img.dataobj)
    assert img.get_data_dtype() == np.uint8 and data.shape == (32, 32, 2)
    assert data[7, 4, 1] == 255 and data[3, 2, 0] == 128 and data.sum() == 255 + 128


def test_worklist_keeps_the_affine_with_the_volume(tmp_path):
    from ich.worklist import ingest

    wl = Worklist(tmp_path)
    files = [dicom.Upload(f"{i}.dcm", to_bytes(make_ct(z=2.5 * i, series_uid="9.9", study_uid="9"))) for i in range(3)]
    (study_id,) = ingest(wl, FakePredictor(), files).added
    affine = wl.affine(study_id)
    assert affine is not None
    np.testing.assert_allclose(affine[:3, 2], [0, 0, 2.5])


def test_study_heatmap_is_batched_grad_cam_on_one_scale(tmp_path):
    pred = Predictor.from_checkpoint(make_checkpoint(tmp_path / "ckpt", size=64), device="cpu")
    with torch.no_grad():  # a logit that grows with every feature: the maps cannot be empty
        head_module(pred.model).weight[CLASSES.index("any")] = 0.01
    volume = np.stack([head(), head(centre=(60, 100)), np.full((160, 200), -1000.0, np.float32)])
    seen: list[float] = []
    study = explain.study_heatmap(pred, volume, "any", batch=2, progress=seen.append)
    assert study.shape == volume.shape and study.dtype == np.float32 and seen == [2 / 3, 1.0]
    assert study.max() == 1.0 and not study[2].any()  # an empty slice stays empty
    for i in range(2):  # each slice: the same map as one at a time, on the study's scale
        alone = explain.grad_cam(pred, volume[i], "any")
        np.testing.assert_allclose(study[i] / study[i].max(), alone, atol=1e-4)
    raw = explain._cams(pred, list(volume), "any")
    peak = max(float(r.max()) for r in raw)
    np.testing.assert_allclose([study[i].max() for i in range(3)], [r.max() / peak for r in raw], rtol=1e-5)


@pytest.mark.parametrize("n_notes", [2, 4])
def test_slice_viewer_refuses_notes_that_do_not_match_the_slices(n_notes):
    from ich.viewer import component

    with pytest.raises(ValueError, match="for 3 slices"):
        component.slice_viewer(
            "x",
            bytes,
            3,
            normal=[0, 0, 1],
            locations=[0.0, 1.0, 2.0],
            goto=1,
            goto_nonce=0,
            window=("brain", 40, 80),
            presets={},
            slice_notes=["a"] * n_notes,
            thickness=None,
        )


def thin_affine(step: float) -> np.ndarray:
    """Voxel to LPS of an axial series: 0.5 mm pixels, slices ``step`` mm apart going up (+z)."""
    affine = np.diag([0.5, 0.5, step, 1.0])
    affine[:3, 3] = (-64.0, -64.0, 10.0)
    return affine


def test_a_thin_series_is_shown_as_the_slabs_the_model_scored():
    from ich import slabs
    from ich.viewer.planes import Planes

    n, affine = 238, thin_affine(0.625)
    planes = Planes.of(n, affine)
    _, locations = slice_axis(affine, n)
    expected = slabs.slab_of_slice(locations, 0.625)  # what inference groups the same positions into
    assert planes.slabbed and len(planes) == expected.max() + 1 == 30
    assert (planes.of_slice == expected).all()
    assert planes.first[0] == 0 and planes.last[-1] == n - 1 and (planes.first[1:] == planes.last[:-1] + 1).all()
    assert planes.label(11) == f"Slab 12 / 30 (slices {planes.first[11] + 1}–{planes.last[11] + 1})"
    assert planes.label(11, of_total=False) == f"Slab 12 (slices {planes.first[11] + 1}–{planes.last[11] + 1})"

    hu = np.arange(n, dtype=np.float32)[:, None, None] * np.ones((1, 4, 4), np.float32)
    shown = planes.volume(hu)
    assert shown.shape == (30, 4, 4) and shown[3, 0, 0] == hu[planes.first[3] : planes.last[3] + 1, 0, 0].mean()
    # Each plane sits at its slices' centre (a merged last slab within a slab of it).
    centres = planes.centres(locations)
    _, shown_at = slice_axis(planes.affine(affine), len(planes))
    assert np.allclose(shown_at[:-1], centres[:-1]) and abs(shown_at[-1] - centres[-1]) < 5.0

    thin = Planes.of(n, affine, thin=True)  # on demand: every slice, as stored
    assert not thin.slabbed and len(thin) == n and thin.affine(affine) is affine and thin.volume(hu) is hu
    assert thin.label(4) == "Slice 5 / 238"


def test_a_thin_series_missing_a_slice_is_shown_as_the_slabs_the_model_scored(tmp_path):
    """The viewer groups the stored slice positions, not the affine's even grid: after a missing slice the grid
    would shift every later slab against the scored ones."""
    from ich import slabs
    from ich.viewer.planes import Planes

    z = [0.625 * i for i in range(40) if i != 9]  # slice 10 of 40 lost in transit
    s = series(z)
    scored = slabs.slab_of_slice(s.locations(), s.spacing)  # as Predictor.predict_series groups it
    wl = Worklist(tmp_path)
    study_id = wl.add_study(s, FakePredictor().predict_series(s))
    shown = Planes.of(len(s), wl.affine(study_id), locations=wl.locations(study_id))
    assert shown.slabbed and (shown.of_slice == scored).all()
    grid = Planes.of(len(s), wl.affine(study_id))  # a volume stored without positions: the affine's grid
    assert not (grid.of_slice == scored).all()


@pytest.mark.parametrize("step", [5.0, 2.5])
def test_a_series_of_ordinary_slices_or_unknown_geometry_is_shown_slice_by_slice(step):
    from ich.viewer.planes import Planes

    for planes in (Planes.of(36, thin_affine(step)), Planes.of(36, None)):
        assert not planes.slabbed and len(planes) == 36 and (planes.of_slice == np.arange(36)).all()
