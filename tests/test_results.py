"""ich.results for any worklist study: the SR and key image built from the store's header copy, as a download."""

from __future__ import annotations

import io
import zipfile

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from ich import dicom, results
from ich.worklist import Worklist, ingest
from ich.worklist.store import _header_key
from tests.helpers import FakePredictor, uploads


def unpacked(data: bytes) -> dict[str, io.BytesIO]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name: io.BytesIO(zf.read(name)) for name in zf.namelist()}


def test_an_uploaded_study_downloads_as_sr_and_key_image_in_its_scanned_study(tmp_path):
    wl, files = Worklist(tmp_path), uploads(5)
    (study_id,) = ingest(wl, FakePredictor({"any": 0.8, "subdural": 0.6}), files).added
    original = [dcmread(io.BytesIO(f.data)) for f in files]
    got = unpacked(results.study_results_zip(wl, study_id, aggregation="top-2"))
    assert sorted(got) == [f"ich-study-{study_id}-key-image-SC.dcm", f"ich-study-{study_id}-report-SR.dcm"]
    report = hd.sr.srread(got[f"ich-study-{study_id}-report-SR.dcm"])
    key = dcmread(got[f"ich-study-{study_id}-key-image-SC.dcm"])
    assert report.SOPClassUID == ComprehensiveSRStorage and key.SOPClassUID == SecondaryCaptureImageStorage
    study = original[0].StudyInstanceUID
    assert report.StudyInstanceUID == study == key.StudyInstanceUID  # PACS files both with the scan
    assert len({report.SeriesInstanceUID, key.SeriesInstanceUID, original[0].SeriesInstanceUID}) == 3  # new series
    assert report.PatientID == original[0].PatientID == key.PatientID  # from the kept header, not the database
    assert str(report.PatientName) == "DOE^JANE"
    items = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in report.ContentSequence}
    assert "NOT FOR DIAGNOSTIC USE" in items["Disclaimer"].TextValue
    assert items["Triage flag"].TextValue.startswith("FLAGGED")
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in original}  # every slice is evidence
    keys = [i for i in report.ContentSequence if i.ValueType == "IMAGE"]
    assert len(keys) == results.KEY_SLICES
    assert key.BurnedInAnnotation == "YES" and "not for diagnosis" in key.SeriesDescription
    assert key.pixel_array.shape[-1] == 3 and key.pixel_array.shape[:2] == original[0].pixel_array.shape


def test_a_study_stored_before_headers_were_kept_says_why_and_delete_removes_the_copy(tmp_path):
    wl = Worklist(tmp_path)
    (old,) = ingest(wl, FakePredictor(), uploads(3)).added
    (kept,) = ingest(wl, FakePredictor(), uploads(3)).added
    record = wl.study(old)
    (tmp_path / "headers" / _header_key(record.study_uid, record.series_uid)).unlink()  # as before this change
    assert wl.header(old) is None
    with pytest.raises(LookupError, match=r"stored before headers were kept.*upload it again"):
        results.study_results_zip(wl, old)
    header = wl.header(kept)
    assert header is not None and "PixelData" not in header and header.PatientName == "DOE^JANE"
    wl.delete_study(kept)
    assert not list((tmp_path / "headers").iterdir())


def test_header_copies_are_named_by_hash(tmp_path):
    wl, files = Worklist(tmp_path), uploads(2)
    ingest(wl, FakePredictor(), files)
    ds = dcmread(io.BytesIO(files[0].data))
    names = [p.name for p in tmp_path.rglob("*")]
    assert any(n.endswith(".dcm") for n in names)
    for value in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.PatientID, "DOE"):
        assert not [n for n in names if value in n]


def test_a_real_anonymised_series_gets_results(tmp_path, shared_data):
    """RSNA's files: UIDs like ``ID_30ea2b02d4`` and no SOP Class UID; the results still build."""
    dicom.quiet_invalid_values()
    series = next(s for s in dicom.load(shared_data / "rsna-sample", pixels=False).series if len(s) <= 40)
    wl = Worklist(tmp_path)
    (study_id,) = ingest(wl, FakePredictor({"any": 0.9}), [s.path for s in series.slices]).added
    got = unpacked(results.study_results_zip(wl, study_id))
    report, key = (dcmread(f) for f in got.values())
    assert report.StudyInstanceUID == series.study_uid == key.StudyInstanceUID
    assert len(
        report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    ) == len(series)
