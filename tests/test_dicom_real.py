"""ich.dicom on the real scans in ../shared/data (RSNA, CQ500 JPEG Lossless, PhysioNet OT)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ich import dicom
from ich.windowing import BRAIN, apply_window, head_bbox

# Series of ../shared/data/rsna-sample: slice count and bits stored, from the files themselves.
RSNA_SERIES = {
    "ID_16c2475028": (36, 16),
    "ID_6254afb327": (32, 16),
    "ID_0ab5820b2a": (32, 16),
    "ID_72952d87fa": (36, 16),
    "ID_44cfc8e964": (33, 12),
    "ID_3780d48b28": (32, 12),
    "ID_02033fb12e": (34, 12),
}


@pytest.fixture(scope="module")
def rsna(shared_data):
    return dicom.load(shared_data / "rsna-sample")


def air_and_brain(hu: np.ndarray) -> tuple[float, float]:
    """Median HU of air inside the scan field (outside it: -3024 padding) and of the soft tissue
    (-100..100 HU) inside the head, which a wrong rescale would shift."""
    air = hu[(hu > -1500) & (hu < -500)]
    y0, y1, x0, x1 = head_bbox(hu)
    head = hu[y0:y1, x0:x1]
    return float(np.median(air)), float(np.median(head[(head > -100) & (head < 100)]))


def symmetry(hu: np.ndarray) -> tuple[float, float]:
    """Correlation of the windowed head with its left-right and its up-down mirror image."""
    y0, y1, x0, x1 = head_bbox(hu)
    crop = apply_window(hu[y0:y1, x0:x1], BRAIN)
    img = crop.ravel()
    return (
        float(np.corrcoef(img, crop[:, ::-1].ravel())[0, 1]),
        float(np.corrcoef(img, crop[::-1].ravel())[0, 1]),
    )


def test_rsna_series_counts_and_order(rsna):
    assert rsna.problems == []
    found = {s.series_uid: (len(s), s.slices[0].bits_stored) for s in rsna.series}
    assert found == RSNA_SERIES
    for s in rsna.series:
        locations = np.array([sl.location for sl in s.slices])
        steps = np.diff(locations)
        # ID_72952d87fa holds each slice twice (a known RSNA quirk): reported, not hidden.
        if s.series_uid == "ID_72952d87fa":
            assert s.duplicates == 8 and np.all(steps >= 0)
        else:
            assert np.all(steps > 0), s.series_uid
            assert s.spacing == pytest.approx(5.0, abs=0.1)


def test_rsna_hu_values(rsna):
    for s in rsna.series:
        # A supratentorial slice about a third of the way up (mid-series can be all ventricle).
        mid = s.slices[int(0.3 * len(s))].hu
        air, brain = air_and_brain(mid)
        assert -1030 < air < -970, s.series_uid
        assert 20 <= brain <= 45, s.series_uid
        assert mid.max() > 700, s.series_uid  # skull


def test_rsna_12bit_files_not_wrapped(rsna):
    """The sample's 12-bit files have intercept -1024: the wrap fix must not fire, and HU stay right."""
    twelve = [s for s in rsna.series if s.slices[0].bits_stored == 12]
    assert len(twelve) == 3
    for s in twelve:
        assert not any("wrap" in n for n in s.notes)
        assert s.volume().min() >= -1100  # a mis-applied fix would throw air to about +3000 or bone negative


def test_rsna_12bit_wrapped_form_round_trip(shared_data, tmp_path):
    """Re-encode a real 12-bit slice in the broken RSNA form (intercept 0, wrapped) and read it back."""
    import pydicom

    files = sorted((shared_data / "rsna-sample/stage_2_train").glob("*.dcm"))
    candidate = next(p for p in files if pydicom.dcmread(p, stop_before_pixels=True).BitsStored == 12)
    ds = pydicom.dcmread(candidate)
    ref = dicom.read_slice(candidate).hu
    hu = np.clip(ref, -1000, 3095).astype(np.int32)  # the wrapped form can only hold this range
    ds.RescaleIntercept = 0
    ds.PixelData = (hu % 4096).astype(np.uint16).tobytes()
    out = tmp_path / "wrapped.dcm"
    ds.save_as(out)
    fixed = dicom.read_slice(out)
    np.testing.assert_array_equal(fixed.hu, hu)
    assert any("wrap fix" in n for n in fixed.notes)


def test_rsna_labels_join(rsna, shared_data):
    labels = pd.read_csv(shared_data / "rsna-sample/stage_2_train.csv")
    parts = labels["ID"].str.rsplit("_", n=1, expand=True)
    table = labels.assign(sop=parts[0], cls=parts[1]).pivot(index="sop", columns="cls", values="Label")
    sops = [sop for s in rsna.series for sop in s.sop_uids]
    assert set(sops) == set(table.index) and len(sops) == 235
    positive = {s.series_uid: int(table.loc[s.sop_uids, "any"].max()) for s in rsna.series}
    assert sum(positive.values()) == 4  # 4 hemorrhage series, 3 without (data README)
    assert table.loc[sops, "epidural"].sum() == 0


def test_cq500_jpeg_lossless_thin_series(shared_data):
    result = dicom.load(shared_data / "cq500/CQ500-CT-0")
    assert result.problems == []
    (s,) = result.series
    assert len(s) == 238 and s.spacing == pytest.approx(0.625, abs=0.01)
    assert "JPEG Lossless" in s.slices[0].transfer_syntax
    assert np.all(np.diff([sl.location for sl in s.slices]) > 0)
    mid = dicom.read_slice(s.slices[120].path).hu
    air, brain = air_and_brain(mid)
    assert -1030 < air < -970 and 20 <= brain <= 45 and mid.max() > 700


def test_cq500_patient_name_kept_out(shared_data):
    frame = dicom.metadata_frame(shared_data / "cq500")
    assert len(frame) == 239 and "patient_name" not in frame.columns
    named = dicom.metadata_frame(shared_data / "cq500", identifiers=True)
    assert named["patient_name"].str.len().gt(0).all()


def test_physionet_ot_slices(shared_data):
    result = dicom.load(shared_data / "physionet-ctich/hemo_subset")
    assert result.problems == [] and sum(len(s) for s in result.series) == 26
    for s in result.series:
        assert s.modality == "OT"
        assert any("Hounsfield" in n for n in s.notes) and any("transposed" in n for n in s.notes)
        hu = s.slices[0].hu
        assert hu.min() >= -1100 and hu.max() > 700
    # Transposed back, the midline runs top to bottom: heads mirror left-right far better than up-down.
    lr, ud = np.mean([symmetry(s.slices[0].hu) for s in result.series], axis=0)
    assert lr > ud + 0.05


def test_rsna_5_samples(shared_data):
    labels = pd.read_csv(shared_data / "rsna-5-samples/labels_from_filenames.csv")
    result = dicom.load(shared_data / "rsna-5-samples/Samples")
    assert result.problems == []
    sops = {s.slices[0].sop_uid for s in result.series}
    assert sops == set(labels["img"])
    for s in result.series:
        air, brain = air_and_brain(s.slices[0].hu)
        assert -1030 < air < -970 and 15 <= brain <= 60
