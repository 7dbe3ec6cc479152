"""ich.results for any worklist study: a TID 1500 SR and a key image built from the store's header copy, as a
download; a re-send replaces the last results PACS accepted; building them logs no identifier."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import zipfile
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage, generate_uid

from ich import __version__, dicom, results
from ich.worklist import Worklist, ingest
from tests.dicom_factory import make_ct, to_bytes
from tests.helpers import FakePredictor, uploads


def unpacked(data: bytes) -> dict[str, io.BytesIO]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name: io.BytesIO(zf.read(name)) for name in zf.namelist()}


def written(ds: Dataset) -> Dataset:
    """``ds`` through a pydicom write and read."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer)


def scored(tmp_path: Path, n: int = 5, **row: float) -> tuple[Worklist, int, list[Dataset]]:
    """A worklist with one uploaded study; its id and the uploaded slices."""
    wl, files = Worklist(tmp_path), uploads(n)
    (study_id,) = ingest(wl, FakePredictor(row or {"any": 0.8, "subdural": 0.6}), files).added
    return wl, study_id, [dcmread(io.BytesIO(f.data)) for f in files]


def test_an_uploaded_study_downloads_as_sr_and_key_image_in_its_scanned_study(tmp_path):
    wl, study_id, original = scored(tmp_path)
    got = unpacked(results.study_results_zip(wl, study_id, aggregation="top-2"))
    assert sorted(got) == [f"ich-study-{study_id}-key-image-SC.dcm", f"ich-study-{study_id}-report-SR.dcm"]
    report = hd.sr.srread(got[f"ich-study-{study_id}-report-SR.dcm"])
    key = dcmread(got[f"ich-study-{study_id}-key-image-SC.dcm"])
    assert report.SOPClassUID == ComprehensiveSRStorage and key.SOPClassUID == SecondaryCaptureImageStorage
    study = original[0].StudyInstanceUID
    assert report.StudyInstanceUID == study == key.StudyInstanceUID  # PACS files both with the scan
    assert len({report.SeriesInstanceUID, key.SeriesInstanceUID, original[0].SeriesInstanceUID}) == 3  # new series
    assert report.InstanceNumber == key.InstanceNumber == 1 and "PredecessorDocumentsSequence" not in report
    assert report.PatientID == original[0].PatientID == key.PatientID  # from the kept header, not the database
    assert str(report.PatientName) == "DOE^JANE"
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in original}  # every slice is evidence
    assert key.BurnedInAnnotation == "YES" and "not for diagnosis" in key.SeriesDescription
    assert key.pixel_array.shape[-1] == 3 and key.pixel_array.shape[:2] == original[0].pixel_array.shape
    (source,) = key.SourceImageSequence  # the slice it shows
    assert source.ReferencedSOPInstanceUID in referenced and source.ReferencedSOPClassUID == original[0].SOPClassUID
    assert not list((tmp_path / results.RESULTS_DIR).glob("*"))  # a download is not a send: nothing recorded


def test_the_report_follows_tid_1500_with_standard_codes_and_reads_back(tmp_path):
    wl, study_id, original = scored(tmp_path)
    sr, _ = results.study_objects(wl, study_id, aggregation="top-2")
    again = written(sr)
    assert isinstance(hd.sr.srread(io.BytesIO(to_bytes(again))), hd.sr.ComprehensiveSR)
    document = hd.sr.ComprehensiveSR.from_dataset(again)
    report = hd.sr.MeasurementReport.from_sequence(document.content)  # refuses a root that is not TID 1500
    assert again.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    (device,) = report.get_observer_contexts(observer_type=codes.DCM.Device)
    assert device.observer_identifying_attributes.name == "fake"
    procedure = hd.sr.utils.find_content_items(again, name=codes.DCM.ProcedureReported)
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "303653007"  # SCT: computed tomography of head

    (group,) = report.get_image_measurement_groups(finding_type=codes.SCT.IntracranialHemorrhage)
    assert group.finding_type.value == "1386000" and group.finding_type.scheme_designator == "SCT"
    (likelihood,) = group.get_measurements(name=results._LIKELIHOOD)
    assert likelihood.value == pytest.approx(0.8) and likelihood.unit.value == "1"
    (highest,) = group.get_measurements(name=results._HIGHEST)
    (slice_,) = highest.referenced_images
    assert slice_.referenced_sop_instance_uid in {ds.SOPInstanceUID for ds in original}
    (flag,) = group.get_qualitative_evaluations(name=results._FLAG)
    assert flag.value == results._FLAGGED
    assert len(group.source_images) == results.KEY_SLICES  # the key slices
    algorithm = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
        for item in group[0].ContentSequence
        if item.RelationshipType == "HAS CONCEPT MOD" and item.ValueType == "TEXT"
    }
    assert algorithm["Algorithm Name"] == "fake" and algorithm["Algorithm Version"] == __version__
    parameters = [i.TextValue for i in group[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111002"]
    assert (
        parameters[0] == "series likelihood: top-2"
        and "operating point: flagged at series likelihood >= 0.500" in parameters[1]
    )

    by_finding = {g.finding_type.meaning: g for g in report.get_image_measurement_groups()}
    assert len(by_finding) == 6  # every class with a probability
    assert by_finding["Subarachnoid intracranial hemorrhage"].finding_type.value == "21454007"
    assert by_finding["Cerebral hemorrhage"].finding_type.value == "274100004"  # RSNA's "intraparenchymal"
    assert by_finding["Subdural hemorrhage"].finding_type.scheme_designator == results.SCHEME  # no checked SCT code
    (subdural,) = by_finding["Subdural hemorrhage"].get_measurements(name=results._HIGHEST)
    assert subdural.value == pytest.approx(0.6)

    (evaluations,) = hd.sr.utils.find_content_items(again, name=results._QUALITATIVE_EVALUATIONS)
    assert evaluations.ContentSequence[0].TextValue == results.NOT_FOR_DIAGNOSIS
    assert again.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == results.SCHEME


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed (Debian: apt-get install dicom3tools dcmtk)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def result_files(tmp_path) -> tuple[Path, Path]:
    wl, study_id, _ = scored(tmp_path / "worklist")
    got = unpacked(results.study_results_zip(wl, study_id, aggregation="top-2"))
    sr, sc = tmp_path / "sr.dcm", tmp_path / "sc.dcm"
    sr.write_bytes(got[f"ich-study-{study_id}-report-SR.dcm"].getvalue())
    sc.write_bytes(got[f"ich-study-{study_id}-key-image-SC.dcm"].getvalue())
    return sr, sc


def test_dciodvfy_finds_no_error_in_either_object(result_files):
    for path, iod in zip(result_files, ("ComprehensiveSR", "SCImage")):
        lines = _run("dciodvfy", "-new", str(path)).stderr.splitlines()
        assert iod in lines and not [line for line in lines if line.startswith("Error")], lines
        # What it still warns about: the private scheme (declared in the SR) and the test slices' empty study
        # date, time and ID (type 2, copied as received).
        assert all("99ICH" in line or "DICOMDIR" in line for line in lines if line.startswith("Warning")), lines


def test_dsrdump_reads_the_report_without_complaint(result_files):
    out = _run("dsrdump", str(result_files[0]))
    assert out.returncode == 0 and not out.stderr, out.stderr
    assert '"Imaging Measurement Report"' in out.stdout and "(1386000,SCT," in out.stdout


def test_a_resend_replaces_the_last_accepted_results_and_a_download_records_nothing(tmp_path):
    wl, study_id, original = scored(tmp_path)
    first = results.study_objects(wl, study_id)
    results.record_sent(wl, *first)  # as SendResults does once PACS accepted both
    (record,) = (tmp_path / results.RESULTS_DIR).iterdir()
    assert original[0].StudyInstanceUID not in record.name and record.suffix == ".json"
    assert set(json.loads(record.read_text())) == {
        "sr_series_uid", "sc_series_uid", "sr_sop_uid", "sr_sop_class_uid", "instance_number"
    }  # fmt: skip
    kept = record.read_text()

    sr, key = (written(ds) for ds in results.study_objects(wl, study_id))
    assert (sr.SeriesInstanceUID, key.SeriesInstanceUID) == (first[0].SeriesInstanceUID, first[1].SeriesInstanceUID)
    assert sr.InstanceNumber == key.InstanceNumber == 2
    assert sr.SOPInstanceUID != first[0].SOPInstanceUID and key.SOPInstanceUID != first[1].SOPInstanceUID
    (predecessor,) = sr.PredecessorDocumentsSequence
    assert predecessor.StudyInstanceUID == original[0].StudyInstanceUID
    (series,) = predecessor.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first[0].SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first[0].SOPInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPClassUID == ComprehensiveSRStorage
    tracked = {
        g.tracking_uid
        for g in hd.sr.MeasurementReport.from_sequence(
            hd.sr.srread(io.BytesIO(to_bytes(sr))).content
        ).get_image_measurement_groups()
    }
    assert len(tracked) == 6  # one per finding, the same in every version of the exam's report
    assert tracked == {
        g.tracking_uid for g in hd.sr.MeasurementReport.from_sequence(first[0].content).get_image_measurement_groups()
    }

    download = unpacked(results.study_results_zip(wl, study_id))
    assert dcmread(download[f"ich-study-{study_id}-report-SR.dcm"]).InstanceNumber == 2  # it replaces the last sent
    assert record.read_text() == kept  # but is not a send: the record is unchanged


def test_another_exam_has_its_own_record_and_a_damaged_record_starts_afresh(tmp_path, caplog):
    wl, study_id, _ = scored(tmp_path)
    results.record_sent(wl, *results.study_objects(wl, study_id))
    (other,) = ingest(wl, FakePredictor({"any": 0.2}), uploads(3)).added
    sr, _ = results.study_objects(wl, other)
    assert sr.InstanceNumber == 1 and "PredecessorDocumentsSequence" not in sr
    (record,) = (tmp_path / results.RESULTS_DIR).iterdir()
    record.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="ich"):
        sr, _ = results.study_objects(wl, study_id)
    assert sr.InstanceNumber == 1 and "unreadable" in caplog.text and record.name in caplog.text


def test_building_results_puts_no_identifier_in_a_warning_or_a_log_line(tmp_path, caplog, recwarn):
    wl = Worklist(tmp_path)
    people = {"Doe^Jane": "PID-12345", "CQ500-CT-0": "PID-67890"}  # highdicom warns about the second name
    identifiers = ["Doe", "Jane", "CQ500-CT-0", "Smith", *people.values()]
    for name, patient_id in people.items():
        study, series = generate_uid(), generate_uid()
        slices = [
            make_ct(
                z=5.0 * i,
                study_uid=study,
                series_uid=series,
                instance=i + 1,
                PatientName=name,
                PatientID=patient_id,
                ReferringPhysicianName="Smith",
            )
            for i in range(3)
        ]
        identifiers += [study, series, *(ds.SOPInstanceUID for ds in slices)]
        (study_id,) = ingest(
            wl, FakePredictor({"any": 0.9}), [dicom.Upload(f"{i}.dcm", to_bytes(ds)) for i, ds in enumerate(slices)]
        ).added
        caplog.clear()
        recwarn.clear()
        with caplog.at_level(logging.DEBUG):  # every logger, highdicom's and pydicom's included
            results.study_results_zip(wl, study_id)
        said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn]
        assert not [i for i in identifiers if any(i in line for line in said)], said
        if name == "CQ500-CT-0":
            assert "UserWarning" in caplog.text  # highdicom did warn; only the category was logged
    assert logging.getLogger("highdicom").level == logging.NOTSET  # the libraries' levels are back


def test_a_study_stored_before_headers_were_kept_says_why_and_delete_removes_the_copy(tmp_path):
    wl = Worklist(tmp_path)
    (old,) = ingest(wl, FakePredictor(), uploads(3)).added
    (kept,) = ingest(wl, FakePredictor(), uploads(3)).added
    record = wl.study(old)
    (tmp_path / "headers" / record.header_file).unlink()  # as before header copies were kept
    assert wl.header(old) is None
    with pytest.raises(LookupError, match=r"stored before headers were kept.*upload it again"):
        results.study_results_zip(wl, old)
    header = wl.header(kept)
    assert header is not None and "PixelData" not in header and header.PatientName == "DOE^JANE"
    wl.delete_study(kept)
    assert not list((tmp_path / "headers").iterdir())


def test_header_copies_are_named_by_hash(tmp_path):
    wl, files = Worklist(tmp_path), uploads(3)
    (study_id,) = ingest(wl, FakePredictor(), files).added
    results.record_sent(wl, *results.study_objects(wl, study_id))  # the results record too
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
