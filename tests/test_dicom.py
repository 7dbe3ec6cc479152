"""ich.dicom on synthetic files: ordering, HU, sources, and one specific error per kind of bad input."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
    generate_uid,
)

from ich import dicom
from tests.dicom_factory import make_ct, make_enhanced_ct, make_non_image, to_bytes
from tests.helpers import zip_bytes


def series_files(tmp_path, n=5, spacing=5.0, shuffle=True, **kw):
    series, study = generate_uid(), generate_uid()
    paths = []
    order = np.random.default_rng(0).permutation(n) if shuffle else range(n)
    for k, i in enumerate(order):
        hu = np.full((16, 16), float(i * 10), dtype=np.float32)
        ds = make_ct(hu, z=i * spacing, series_uid=series, study_uid=study, instance=int(i) + 1, **kw)
        path = tmp_path / f"f{k:02d}.dcm"
        path.write_bytes(to_bytes(ds))
        paths.append(path)
    return paths


def test_series_sorted_along_normal_and_hu_exact(tmp_path):
    series_files(tmp_path, n=6)
    result = dicom.load(tmp_path)
    assert result.problems == []
    (s,) = result.series
    assert len(s) == 6 and s.spacing == pytest.approx(5.0)
    vol = s.volume()
    assert vol.dtype == np.float32 and vol.shape == (6, 16, 16)
    np.testing.assert_array_equal(vol[:, 0, 0], np.arange(6) * 10.0)
    assert s.duplicates == 0 and s.gaps == 0


def test_projection_on_tilted_normal(tmp_path):
    series, study = generate_uid(), generate_uid()
    normal = np.array([0.0, np.sin(0.3), np.cos(0.3)])
    for i in [3, 0, 2, 1]:
        ds = make_ct(
            series_uid=series,
            study_uid=study,
            instance=10 - i,
            ImageOrientationPatient=[1, 0, 0, 0, float(np.cos(0.3)), float(-np.sin(0.3))],
        )
        ds.ImagePositionPatient = list(map(float, normal * 5.0 * i))
        ds.InstanceNumber = 10 - i  # deliberately opposite to the geometry
        (tmp_path / f"{i}.dcm").write_bytes(to_bytes(ds))
    (s,) = dicom.load(tmp_path).series
    locations = [sl.location for sl in s.slices]
    assert np.all(np.diff(locations) > 0)
    assert s.spacing == pytest.approx(5.0)


def test_gap_and_duplicate_reported(tmp_path):
    series, study = generate_uid(), generate_uid()
    for k, z in enumerate([0, 5, 10, 10, 25, 30]):
        (tmp_path / f"{k}.dcm").write_bytes(to_bytes(make_ct(z=z, series_uid=series, study_uid=study, instance=k + 1)))
    (s,) = dicom.load(tmp_path).series
    assert s.duplicates == 1 and s.gaps == 1
    assert any("gap of 15.00 mm" in n for n in s.notes)


def test_instance_number_fallback(tmp_path):
    series, study = generate_uid(), generate_uid()
    for i in [2, 0, 1]:
        ds = make_ct(np.full((8, 8), i * 100.0), series_uid=series, study_uid=study, instance=i + 1)
        del ds.ImagePositionPatient
        (tmp_path / f"{i}.dcm").write_bytes(to_bytes(ds))
    (s,) = dicom.load(tmp_path).series
    assert [sl.instance_number for sl in s.slices] == [1, 2, 3]
    assert any("InstanceNumber" in n for n in s.notes)


def test_groups_by_study_and_series(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir(), b.mkdir()
    series_files(a, n=3)
    series_files(b, n=4)
    result = dicom.load(tmp_path)
    assert sorted(len(s) for s in result.series) == [3, 4]


def test_wrapped_12bit_fix():
    hu = np.array([[-1000, -20], [40, 1500]], dtype=np.float32)
    # Stored as the buggy RSNA files do: HU in 12-bit unsigned, negatives wrapped round 4096, intercept 0.
    ds = make_ct(hu, bits_stored=12, intercept=0.0)
    ds.PixelData = (hu.astype(np.int32) % 4096).astype(np.uint16).tobytes()
    s = dicom.read_slice(dicom.Upload("wrapped.dcm", to_bytes(ds)))
    np.testing.assert_array_equal(s.hu, hu)
    assert any("wrap fix" in n for n in s.notes)


def test_plain_12bit_not_touched():
    hu = np.array([[-1000, -20], [40, 1500]], dtype=np.float32)
    s = dicom.read_slice(dicom.Upload("plain12.dcm", to_bytes(make_ct(hu, bits_stored=12, intercept=-1024.0))))
    np.testing.assert_array_equal(s.hu, hu)
    assert s.notes == []


def test_multivalued_window_and_slope():
    hu = np.array([[0, 100]], dtype=np.float32)
    ds = make_ct(hu, intercept=-1024.0)
    ds.RescaleSlope = 0.5
    ds.PixelData = ((hu + 1024) / 0.5).astype(np.int16).tobytes()
    ds.WindowCenter = [40, 300]
    ds.WindowWidth = [80, 1500]
    s = dicom.read_slice(dicom.Upload("w.dcm", to_bytes(ds)))
    np.testing.assert_allclose(s.hu, hu)
    assert (s.window_center, s.window_width) == (40.0, 80.0)


def test_invalid_uids_read_and_pydicom_left_as_it_was(monkeypatch):
    """Reading RSNA's invalid UIDs works, and does not switch off validation for the rest of the process."""
    import pydicom

    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.WARN)
    data = to_bytes(
        make_ct(SOPInstanceUID="ID_30ea2b02d4", SeriesInstanceUID="ID_0ab5820b2a", StudyInstanceUID="ID_aa")
    )
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):
        s = dicom.read_slice(dicom.Upload("rsna.dcm", data))
    assert s.sop_uid == "ID_30ea2b02d4" and s.series_uid == "ID_0ab5820b2a"
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.WARN
    with pytest.warns(UserWarning, match="Invalid value for VR UI"):  # a plain read elsewhere still validates
        _ = pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID
    # The product's entry points opt in once; then the same read is quiet.
    dicom.quiet_invalid_values()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dicom.read_slice(dicom.Upload("rsna.dcm", data)).sop_uid == "ID_30ea2b02d4"


def test_multiframe_enhanced_ct_split():
    frames = np.stack([np.full((8, 8), v, np.float32) for v in (0.0, 50.0, 100.0)])
    ds = make_enhanced_ct(frames=frames, spacing=2.5)
    # Enhanced CT keeps the rescale in the functional groups; a stale top-level one must not be used.
    ds.RescaleIntercept = 0
    result = dicom.load([dicom.Upload("enhanced.dcm", to_bytes(ds))])
    (s,) = result.series
    assert len(s) == 3 and s.spacing == pytest.approx(2.5)
    np.testing.assert_array_equal(s.volume()[:, 0, 0], [0, 50, 100])
    with pytest.raises(dicom.DicomError, match="multi-frame"):
        dicom.read_slice(dicom.Upload("enhanced.dcm", to_bytes(ds)))


# ----------------------------------------------------------------------------- bad input corpus


def _bad(name: str, data: bytes) -> dicom.DicomError:
    with pytest.raises(dicom.DicomError) as info:
        dicom.read_slice(dicom.Upload(name, data))
    assert info.value.path == name
    return info.value


def test_empty_file():
    assert "empty file" in _bad("empty.dcm", b"").reason


def test_not_dicom():
    assert "not a DICOM file" in _bad("notes.dcm", b"hello, this is a text file\n" * 20).reason


def test_truncated_header():
    data = to_bytes(make_ct())
    # Cut inside the header: the image module (Rows/Columns/PixelData) is never reached.
    assert "truncated file" in _bad("cut.dcm", data[:200]).reason


def test_short_pixel_data():
    data = to_bytes(make_ct())
    assert "pixel data too short" in _bad("short.dcm", data[:-100]).reason


def test_no_pixel_data():
    ds = make_ct()
    del ds.PixelData
    assert "no pixel data" in _bad("nopix.dcm", to_bytes(ds)).reason


def test_mr_refused():
    ds = make_ct(Modality="MR", SOPClassUID=MRImageStorage)
    reason = _bad("brain_mr.dcm", to_bytes(ds)).reason
    assert "not a CT image" in reason and "MR" in reason and "magnetic resonance" in reason


def test_ultrasound_refused():
    assert "ultrasound" in _bad("us.dcm", to_bytes(make_ct(Modality="US"))).reason


def test_structured_report_refused():
    ds = make_ct(Modality="SR")
    del ds.PixelData
    assert "structured report" in _bad("report.dcm", to_bytes(ds)).reason


def test_rt_struct_refused():
    assert "RT structure set" in _bad("rt.dcm", to_bytes(make_ct(Modality="RTSTRUCT"))).reason


def test_colour_refused():
    ds = make_ct(PhotometricInterpretation="RGB", SamplesPerPixel=3)
    assert "colour image" in _bad("photo.dcm", to_bytes(ds)).reason


def test_an_object_of_another_kind_says_what_it_is_where_a_damaged_ct_image_does_not():
    """A dose SR, a colour dose page, an MR image: refused with what a listing with its exam's series needs
    (:func:`ich.exam.set_aside`); not shown in the problem line, which names the file only."""
    study, series = generate_uid(), generate_uid()
    sr = make_non_image(XRayRadiationDoseSRStorage, "SR", study_uid=study, series_uid=series, SeriesNumber=997,
                        SeriesDescription="Dose Report")  # fmt: skip
    error = _bad("dose.dcm", to_bytes(sr))
    assert error.other == dicom.OtherObject(
        study, series, sr.SOPInstanceUID, 997, "Dose Report", "SR", XRayRadiationDoseSRStorage,
        "X-Ray Radiation Dose SR Storage",
    )  # fmt: skip
    problems = dicom.load([dicom.Upload("dose.dcm", to_bytes(sr))], pixels=False).problems
    assert [(p.path, p.other) for p in problems] == [("dose.dcm", error.other)]
    assert study not in repr(problems) + str(problems[0]) and series not in repr(problems) + str(problems[0])
    assert _bad("report.dcm", to_bytes(make_non_image(ComprehensiveSRStorage, "CT"))).other.sop_class_name == (
        "Comprehensive SR Storage"
    )  # "no pixel data: Comprehensive SR Storage is not an image"
    page = make_ct(Modality="OT", SOPClassUID=SecondaryCaptureImageStorage, PhotometricInterpretation="RGB",
                   SamplesPerPixel=3)  # fmt: skip
    assert _bad("page.dcm", to_bytes(page)).other.modality == "OT"
    assert _bad("mr.dcm", to_bytes(make_ct(Modality="MR", SOPClassUID=MRImageStorage))).other.modality == "MR"
    nopix = make_ct()
    del nopix.PixelData
    colour = make_ct(PhotometricInterpretation="RGB", SamplesPerPixel=3)
    assert _bad("nopix.dcm", to_bytes(nopix)).other is None and _bad("photo.dcm", to_bytes(colour)).other is None
    assert _bad("cut.dcm", to_bytes(make_ct())[:-100]).other is None


def test_secondary_capture_accepted_with_note():
    s = dicom.read_slice(dicom.Upload("ot.dcm", to_bytes(make_ct(Modality="OT"))))
    assert s.modality == "OT" and any("Hounsfield" in n for n in s.notes)


@pytest.mark.parametrize("rows,cols", [(0, 32), (70000 // 2, 32), (32, 100000 // 2)])
def test_impossible_dimensions_never_allocated(rows, cols):
    ds = make_ct()
    ds.Rows, ds.Columns = rows, cols
    assert "impossible image dimensions" in _bad("huge.dcm", to_bytes(ds)).reason


def test_unusable_rescale():
    assert "unusable rescale" in _bad("slope0.dcm", to_bytes(make_ct(RescaleSlope=0))).reason


def test_one_bad_file_does_not_sink_series(tmp_path):
    paths = series_files(tmp_path, n=5)
    paths[2].write_bytes(paths[2].read_bytes()[:-50])
    (tmp_path / "junk.dcm").write_bytes(b"junk")
    result = dicom.load(tmp_path)
    assert len(result.series) == 1 and len(result.series[0]) == 4
    reasons = {p.path.split("/")[-1]: p.reason for p in result.problems}
    assert "pixel data too short" in reasons[paths[2].name]
    assert "not a DICOM file" in reasons["junk.dcm"]


def test_missing_path():
    result = dicom.load(["/nonexistent/study"])
    assert result.series == [] and "no such file" in result.problems[0].reason


# ----------------------------------------------------------------------------- zip archives


def test_zip_upload_and_file(tmp_path):
    (tmp_path / "s").mkdir()
    paths = series_files(tmp_path / "s", n=3)
    archive = zip_bytes({f"study/{p.name}": p.read_bytes() for p in paths} | {"study/labels.csv": b"ID,Label\n"})
    result = dicom.load([dicom.Upload("upload.zip", archive)])
    assert len(result.series) == 1 and len(result.series[0]) == 3 and result.problems == []
    assert result.series[0].slices[0].path.startswith("upload.zip/study/")
    zpath = tmp_path / "study.zip"
    zpath.write_bytes(archive)
    assert len(dicom.load(zpath).series[0]) == 3


def test_zip_slip_refused():
    good = to_bytes(make_ct())
    result = dicom.load([dicom.Upload("evil.zip", zip_bytes({"../../etc/evil.dcm": good, "ok.dcm": good}))])
    assert len(result.series) == 1
    assert any("zip slip" in p.reason and "evil.dcm" in p.path for p in result.problems)


def test_zip_bomb_ratio_refused():
    result = dicom.load([dicom.Upload("bomb.zip", zip_bytes({"zeros.dcm": bytes(8 << 20)}))])
    assert result.series == []
    assert any("zip bomb" in p.reason for p in result.problems)


def test_zip_bomb_total_size_refused(monkeypatch):
    monkeypatch.setattr(dicom.sources, "MAX_ARCHIVE_BYTES", 1000)  # patched where the zip guard reads it
    result = dicom.load([dicom.Upload("big.zip", zip_bytes({"a.dcm": to_bytes(make_ct())}))])
    assert "inflate" in result.problems[0].reason


def test_zip_without_dicom():
    result = dicom.load([dicom.Upload("docs.zip", zip_bytes({"readme.txt": b"hi"}))])
    assert result.series == [] and "no DICOM" in result.problems[0].reason


def test_corrupt_zip():
    result = dicom.load([dicom.Upload("broken.zip", b"PK\x03\x04garbage")])
    assert "not a valid zip" in result.problems[0].reason


# ----------------------------------------------------------------------------- metadata frame


def test_metadata_frame_hides_identifiers(tmp_path):
    series_files(tmp_path, n=3)
    frame = dicom.metadata_frame(tmp_path)
    assert len(frame) == 3 and list(frame["slice_index"]) == [0, 1, 2]
    assert not {"patient_id", "patient_name"} & set(frame.columns)
    assert "DOE" not in frame.to_csv()
    full = dicom.metadata_frame(tmp_path, identifiers=True)
    assert set(full["patient_name"]) == {"DOE^JANE"} and set(full["patient_id"]) == {"TEST-0001"}


def test_summary_is_json_without_identifiers(tmp_path):
    series_files(tmp_path, n=3)
    text = json.dumps(dicom.load(tmp_path).series[0].summary())
    assert "DOE" not in text and "TEST-0001" not in text


def test_iter_series_decodes_uploads_one_series_at_a_time(monkeypatch):
    """Uploads are parsed headers-first; pixels are decoded per series, and same-named files of two folders both count."""
    a, b, study = generate_uid(), generate_uid(), generate_uid()
    uploads = [
        dicom.Upload(
            f"{i}.dcm",
            to_bytes(make_ct(np.full((32, 32), hu, np.float32), z=i, series_uid=uid, study_uid=study, instance=i)),
        )
        for uid, hu in ((a, 10.0), (b, 60.0))
        for i in range(3)
    ]
    decoded: list[str] = []
    real_read_file = dicom.read_file

    def counting(source, pixels=True):
        if pixels:
            decoded.append(source.name)
        return real_read_file(source, pixels)

    monkeypatch.setattr(dicom.stream, "read_file", counting)  # both passes look read_file up there
    problems: list[dicom.Problem] = []
    stream = dicom.iter_series(uploads, problems)
    first = next(stream)
    assert len(decoded) == 3  # only the first series' pixels so far
    second = next(stream)
    assert next(stream, None) is None and not problems
    by_uid = {s.series_uid: s for s in (first, second)}
    assert np.allclose(by_uid[a].volume(), 10.0) and np.allclose(by_uid[b].volume(), 60.0)
    assert sorted(decoded) == ["0.dcm", "0.dcm (2)", "1.dcm", "1.dcm (2)", "2.dcm", "2.dcm (2)"]


@pytest.mark.parametrize("side", [32, 256])  # pixel data read, and left unread (deferred) by the header pass
def test_header_pass_reports_missing_or_short_pixel_data(side):
    def ct() -> Dataset:
        return make_ct(np.full((side, side), 30.0, np.float32), series_uid=series, study_uid=study)

    study, series = generate_uid(), generate_uid()
    good, short, missing = ct(), ct(), ct()
    del missing.PixelData
    uploads = [
        dicom.Upload("good.dcm", to_bytes(good)),
        dicom.Upload("short.dcm", to_bytes(short)[:-100]),
        dicom.Upload("missing.dcm", to_bytes(missing)),
    ]
    headers = dicom.load(uploads, pixels=False)
    reasons = {p.path: p.reason for p in headers.problems}
    assert "pixel data too short" in reasons["short.dcm"] and "no pixel data" in reasons["missing.dcm"]
    assert [s.path for s in headers.series[0].slices] == ["good.dcm"]
