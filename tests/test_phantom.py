"""ich.phantom: synthetic head CT, its labels and its DICOM files (small matrices keep this fast)."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, CTImageStorage

from ich import dicom, phantom
from ich.labels import CLASSES, SUBTYPES, read_rsna_csv
from ich.windowing import head_bbox

SIZE = 128  # pixels; the field of view stays that of a 512 matrix, so anatomy is the same


@pytest.fixture(scope="module")
def normal() -> phantom.PhantomStudy:
    """Eight slices around the lateral ventricles, no hemorrhage."""
    return phantom.generate_study(7, n_slices=8, size=SIZE, hemorrhage=False)


@pytest.fixture(scope="module", params=SUBTYPES)
def bleed(request) -> tuple[str, phantom.PhantomStudy]:
    """A whole series with exactly one hemorrhage of each subtype."""
    return request.param, phantom.generate_study(
        100 + SUBTYPES.index(request.param), size=SIZE, subtypes=[request.param]
    )


def _bit(subtype: str) -> int:
    return 1 << SUBTYPES.index(subtype)


def _read_hu(path) -> tuple[pydicom.Dataset, np.ndarray]:
    """HU as a careful reader gets them: rescale, after the RSNA wrapped-pixel fix."""
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.float64)
    if ds.BitsStored == 12 and ds.PixelRepresentation == 0 and float(ds.RescaleIntercept) > -100:
        stored = np.mod(stored + 1000, 4096)
        return ds, stored - 1000
    return ds, stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_deterministic_per_seed():
    a = phantom.generate_study(3, n_slices=3, size=64, hemorrhage=True)
    b = phantom.generate_study(3, n_slices=3, size=64, hemorrhage=True)
    c = phantom.generate_study(4, n_slices=3, size=64, hemorrhage=True)
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.masks, b.masks)
    assert a.labels.equals(b.labels)
    assert (a.study_uid, a.series_uid, a.sop_uids) == (b.study_uid, b.series_uid, b.sop_uids)
    assert not np.array_equal(a.hu, c.hu)
    assert a.study_uid != c.study_uid


def test_shapes_types_and_identifiers(normal):
    n = len(normal)
    assert n == 8
    assert normal.hu.shape == normal.masks.shape == (n, SIZE, SIZE)
    assert normal.hu.dtype == np.float32 and normal.masks.dtype == np.uint8
    assert np.array_equal(normal.hu, np.rint(normal.hu))  # integer HU, as stored
    assert list(normal.labels.columns) == list(CLASSES) and list(normal.labels.index) == normal.sop_uids
    assert normal.patient_name == "PHANTOM^0007"
    for uid in [normal.study_uid, normal.series_uid, *normal.sop_uids]:
        assert UID(uid).is_valid
    assert len(set(normal.sop_uids)) == n
    assert np.allclose(np.diff(normal.positions[:, 2]), normal.thickness)  # ascending, evenly spaced
    assert sorted(normal.instance_numbers) == list(range(1, n + 1))


def test_default_series_covers_the_head():
    study = phantom.generate_study(11, size=32)
    assert 28 <= len(study) <= 40
    # Head outline grows from the skull base, then shrinks towards the vertex.
    area = (study.hu > -500).reshape(len(study), -1).sum(axis=1)
    top = int(area.argmax())
    assert 0 < top < len(study) - 3
    assert area[-1] < 0.5 * area[top]


def test_hounsfield_units(normal):
    mid = normal.hu[len(normal) // 2]
    assert abs(np.median(mid[SIZE // 2, 1:6]) - phantom.AIR_HU) < 10  # air beside the head
    y0, y1, x0, x1 = head_bbox(mid)
    h, w = y1 - y0, x1 - x0
    roi = mid[y0 + int(0.3 * h) : y1 - int(0.3 * h), x0 + int(0.3 * w) : x1 - int(0.3 * w)]
    assert 20 <= np.median(roi) <= 45  # brain
    assert np.median(mid[mid > 300]) > 700  # skull
    assert normal.hu.min() >= phantom.FOV_PADDING_HU and normal.hu.max() <= phantom.HU_MAX


def test_normal_study_has_no_blood(normal):
    assert not normal.masks.any()
    assert normal.labels.to_numpy().sum() == 0


def test_hemorrhage_density_labels_and_masks_agree(bleed):
    subtype, study = bleed
    assert study.hemorrhages == [subtype]
    present = (study.masks & _bit(subtype)) > 0
    assert not (study.masks & ~np.uint8(_bit(subtype))).any()  # nothing of another subtype
    assert 50 <= np.median(study.hu[present]) <= 90  # acute blood
    area = present.reshape(len(study), -1).sum(axis=1) * study.spacing[0] * study.spacing[1]
    expected = (area > phantom.MIN_LABEL_AREA_MM2).astype(int)
    assert expected.sum() >= 1
    np.testing.assert_array_equal(study.labels[subtype].to_numpy(), expected)
    np.testing.assert_array_equal(study.labels["any"].to_numpy(), expected)
    others = [c for c in SUBTYPES if c != subtype]
    assert study.labels[others].to_numpy().sum() == 0


@pytest.mark.parametrize("subtype", ["epidural", "subdural", "intraparenchymal"])
def test_hemorrhage_is_one_object_across_adjacent_slices(subtype):
    study = phantom.generate_study(200 + SUBTYPES.index(subtype), size=SIZE, subtypes=[subtype])
    present = (study.masks & _bit(subtype)) > 0
    slices = np.flatnonzero(present.any(axis=(1, 2)))
    assert len(slices) >= 2
    assert np.array_equal(slices, np.arange(slices[0], slices[-1] + 1))  # no gaps
    gaps = []
    for i, j in itertools.pairwise(slices):
        distance = cv2.distanceTransform((~present[j]).astype(np.uint8), cv2.DIST_L2, 5)
        gaps.append(distance[present[i]].min() * study.spacing[0])
    # Neighbouring cross-sections overlap; only where the skull is cut tangentially (vertex) does
    # the inner table, and an extra-axial collection on it, move a few mm between slices.
    assert np.median(gaps) == 0
    assert max(gaps) <= 2 * study.thickness


def test_about_half_the_studies_bleed():
    bleeding = [bool(phantom.generate_study(s, n_slices=1, size=16).hemorrhages) for s in range(60)]
    assert 0.3 <= np.mean(bleeding) <= 0.7


def test_bad_arguments():
    with pytest.raises(ValueError, match="subtype"):
        phantom.generate_study(1, n_slices=1, size=16, subtypes=["chronic"])
    with pytest.raises(ValueError):
        phantom.generate_study(1, n_slices=1, size=16, subtypes=["epidural"], hemorrhage=False)
    with pytest.raises(ValueError, match="bits"):
        phantom.write_study(phantom.generate_study(1, n_slices=1, size=16), "unused", bits="10")


@pytest.mark.parametrize("jpeg", [False, True], ids=["native", "jpeg2000"])
@pytest.mark.parametrize("bits", phantom.BITS_KINDS)
def test_write_read_round_trip(tmp_path, bits, jpeg):
    study = phantom.generate_study(5, n_slices=3, size=SIZE, subtypes=["subdural"])
    paths = phantom.write_study(study, tmp_path, bits=bits, jpeg=jpeg, masks=True)
    assert [p.parent.name for p in paths] == ["stage_2_train"] * 3
    # "wrapped" storage, like the real broken RSNA files, holds nothing below -1000 HU.
    expected = np.maximum(study.hu, phantom.WRAPPED_HU_MIN) if bits == "wrapped" else study.hu
    for i, path in enumerate(paths):
        ds, hu = _read_hu(path)
        assert np.abs(hu - expected[i]).max() <= 1
        assert ds.SOPClassUID == CTImageStorage and ds.Modality == "CT"
        assert ds.SOPInstanceUID == study.sop_uids[i] == path.stem
        assert ds.file_meta.TransferSyntaxUID.is_compressed == jpeg
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], study.positions[i], atol=1e-3)
        assert (ds.BitsStored, ds.PixelRepresentation) == ((16, 1) if bits == "16" else (12, 0))
        assert str(ds.PatientName) == study.patient_name and ds.InstanceNumber == study.instance_numbers[i]
        mask = cv2.imread(str(tmp_path / "masks" / f"{path.stem}.png"), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(mask, study.masks[i])
    assert read_rsna_csv(tmp_path / "stage_2_train.csv").equals(study.labels.sort_index())


def test_write_study_merges_the_csv(tmp_path):
    a = phantom.generate_study(1, n_slices=2, size=32)
    b = phantom.generate_study(2, n_slices=3, size=32)
    for study in (a, b, a):  # writing a study again replaces its rows
        phantom.write_study(study, tmp_path)
    labels = read_rsna_csv(tmp_path / "stage_2_train.csv")
    assert sorted(labels.index) == sorted(a.sop_uids + b.sop_uids)
    assert len(list((tmp_path / "stage_2_train").glob("*.dcm"))) == 5


def test_write_dataset(tmp_path):
    frame = phantom.write_dataset(tmp_path, 3, seed=2, n_slices=2, size=32, masks=True, progress=False)
    assert list(frame.columns) == ["sop_uid", "study_uid", "series_uid", "patient_id", *CLASSES]
    assert len(frame) == 6 and frame["study_uid"].nunique() == 3
    assert (
        frame["patient_id"].iloc[0]
        == phantom.generate_study(2 * phantom.DATASET_SEED_STRIDE, n_slices=1, size=16).patient_id
    )
    labels = read_rsna_csv(tmp_path / "stage_2_train.csv")
    assert labels.equals(frame.set_index("sop_uid")[list(CLASSES)].sort_index())
    assert len(list((tmp_path / "masks").glob("*.png"))) == 6
    storage = {}
    for row in frame.itertuples():  # "mixed" cycles the storage kinds over the studies
        ds = pydicom.dcmread(tmp_path / "stage_2_train" / f"{row.sop_uid}.dcm", stop_before_pixels=True)
        storage[row.study_uid] = (ds.BitsStored, ds.PixelRepresentation, float(ds.RescaleIntercept))
    assert sorted(storage.values()) == [(12, 0, -1024.0), (12, 0, 0.0), (16, 1, 0.0)]


def test_round_trip_through_ich_dicom(tmp_path):
    studies = [phantom.generate_study(s, n_slices=4, size=SIZE, subtypes=["intraventricular"]) for s in (21, 22, 23)]
    for study, bits in zip(studies, phantom.BITS_KINDS):
        phantom.write_study(study, tmp_path, bits=bits, jpeg=bits == "12")
    result = dicom.load([tmp_path])
    assert not result.problems
    labels = read_rsna_csv(tmp_path / "stage_2_train.csv")
    by_series = {s.series_uid: s for s in result.series}
    for study, bits in zip(studies, phantom.BITS_KINDS):
        series = by_series[study.series_uid]
        assert series.study_uid == study.study_uid and series.modality == "CT"
        assert [s.sop_uid for s in series.slices] == study.sop_uids  # sorted inferior -> superior
        expected = np.maximum(study.hu, phantom.WRAPPED_HU_MIN) if bits == "wrapped" else study.hu
        assert np.abs(series.volume() - expected).max() <= 1
        assert series.spacing == pytest.approx(study.thickness, abs=1e-3)
        joined = labels.loc[[s.sop_uid for s in series.slices]]
        assert joined.equals(study.labels)
