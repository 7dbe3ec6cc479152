"""Exams, not series, and nothing received lost: a whole exam by C-STORE, failures kept and retried, races
between processes, a re-score that fails half way, a damaged database."""

from __future__ import annotations

import contextlib
import errno
import logging
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.uid import (
    ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

import ich.worklist.store
from ich import dicom
from ich.listener import SET_ASIDE, Inbox, Listener, SendResults, retry_delay
from ich.worklist import INTAKE_FAILED, INTAKE_RECEIVING, StoreError, Worklist, ingest
from tests.dicom_factory import make_ct, make_enhanced_ct, make_non_image, to_bytes
from tests.helpers import ROOT, FakePrediction, FakePredictor, add, series_of, uploads
from tests.test_listener import QUIET, series, wait_for

AXIAL, CORONAL = [1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1]


def exam(study: str) -> dict[str, list]:
    """A head-CT exam as a PACS sends it: scout, axial soft tissue, axial bone kernel, coronal MPR, dose page."""

    def run(n: int, kernel: str, image_type: list[str], orientation=AXIAL, description: str = "") -> list:
        uid = generate_uid()
        normal = np.cross(orientation[:3], orientation[3:])
        return [
            make_ct(study_uid=study, series_uid=uid, instance=i + 1, ImagePositionPatient=list(normal * 5.0 * i),
                    ImageOrientationPatient=orientation, ConvolutionKernel=kernel, ImageType=image_type,
                    SeriesDescription=description)
            for i in range(n)
        ]  # fmt: skip

    dose = make_ct(study_uid=study, instance=1, Modality="OT", SeriesDescription="Dose report")
    dose.SOPClassUID = dose.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    return {
        "scout": run(1, "H30s", ["ORIGINAL", "PRIMARY", "LOCALIZER"], CORONAL, "Topogram"),
        "soft": run(6, "H30s", ["ORIGINAL", "PRIMARY", "AXIAL"], description="Head 5mm soft"),
        "bone": run(6, "H70h", ["ORIGINAL", "PRIMARY", "AXIAL"], description="Head 5mm bone"),
        "coronal": run(8, "H30s", ["DERIVED", "SECONDARY", "MPR"], CORONAL, "Coronal MPR"),
        "dose": [dose],
    }


class ByKernel(FakePredictor):
    """Bleeding only in the soft-tissue series: a flag shows which series was scored."""

    def predict_series(self, series, progress=None):
        self.calls += 1
        any_ = 0.9 if series.slices[0].kernel == "H30s" else 0.1
        probs = np.full((len(series), 6), 0.05, np.float32)
        probs[:, 0] = any_
        return FakePrediction(series.sop_uids, probs, any_, "subdural", any_ >= 0.5)


def send_all(port: int, datasets: list) -> list[int]:
    """One association offering each dataset's own SOP class (CT, a dose page, a dose SR, an Enhanced CT...), as a
    PACS sending a whole exam would."""
    ae = AE(ae_title="PACS")
    for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH")
    assert assoc.is_established
    try:
        return [int(s.Status) if s else -1 for s in (assoc.send_c_store(ds) for ds in datasets)]
    finally:
        assoc.release()


def test_a_whole_exam_by_c_store_is_one_row_scored_on_the_axial_soft_tissue_series(tmp_path, caplog):
    wl = Worklist(tmp_path)
    listener = Listener(wl, ByKernel(), Inbox(tmp_path / "inbox", 1.0))
    port = listener.start("127.0.0.1", 0, poll_seconds=0.05)
    parts = exam(generate_uid())
    try:
        with caplog.at_level(logging.INFO, logger="ich"):
            statuses = send_all(port, [ds for part in parts.values() for ds in part])
            assert set(statuses) == {0}  # every instance, dose page included, answered with success
            (pending,) = wl.intake().itertuples()  # arriving: shown, not scored on part of the exam
            assert pending.state == INTAKE_RECEIVING and len(wl) == 0
            wait_for(lambda: len(wl) == 1 and len(wl.intake()) == 0)
    finally:
        listener.stop()
    (study_id,) = wl.studies()["id"]
    row = wl.study(int(study_id))
    assert row.flagged and row.n_slices == 6 and row.series_uid == parts["soft"][0].SeriesInstanceUID
    reasons = {c.description: c.reason for c in row.exam_series}
    assert reasons["Head 5mm soft"] == "" and row.exam_series[0].scored
    assert reasons["Topogram"] == "localizer (scout)"
    assert "bone kernel" in reasons["Head 5mm bone"] and "coronal" in reasons["Coronal MPR"]
    # Set aside at the door (never stored), still listed, as an upload lists it ("not a CT image (modality OT)").
    assert reasons["Dose report"] == "not a CT image (modality OT, Secondary Capture Image Storage)"
    (dose,) = [c for c in row.exam_series if c.description == "Dose report"]
    assert dose.n_slices == 1 and not dose.scored and row.exam_series[-1] == dose  # by series number: none, last
    (remembered,) = (tmp_path / "inbox").rglob(SET_ASIDE)
    assert stat.S_IMODE(remembered.stat().st_mode) == 0o600 and not list(remembered.parent.glob(".*.tmp"))
    text = remembered.read_text()
    dose_uids = [parts["dose"][0].StudyInstanceUID, parts["dose"][0].SeriesInstanceUID, parts["dose"][0].SOPInstanceUID]
    assert not [v for v in [*dose_uids, "TEST-0001", "DOE"] if v in text]  # no identifier, no UID
    kept = wl.other_series(row.id)  # for the viewer: scout, bone and coronal, unscored
    assert sorted(kept.values()) == [1, 6, 8]
    coronal = parts["coronal"][0].SeriesInstanceUID
    assert wl.volume(row.id, coronal).shape == (8, 32, 32) and wl.affine(row.id, coronal) is not None
    assert "set aside (not CT images): 1 Secondary Capture Image Storage" in caplog.text
    assert len(list((tmp_path / "inbox").rglob("*.dcm"))) == 1 + 6 + 6 + 8


def test_dose_reports_and_an_enhanced_ct_by_c_store(tmp_path, caplog):
    """Structured reports are set aside (answered with success, not stored) and listed with the exam's series,
    whichever order they come in; an Enhanced CT object is stored and scored, frame by frame; a dose page sent
    after the exam was scored is added to its series list, without scoring the same images again."""
    wl = Worklist(tmp_path)
    sent: list[int] = []  # what would go to PACS (SendResults is one of these callbacks)
    listener = Listener(wl, ByKernel(), Inbox(tmp_path / "inbox", QUIET), on_scored=[sent.append])
    port = listener.start("127.0.0.1", 0, poll_seconds=0.05)
    study = generate_uid()
    dose_sr = make_non_image(XRayRadiationDoseSRStorage, "SR", study_uid=study, SeriesNumber=997,
                             SeriesDescription="Dose Report")  # fmt: skip
    report = make_non_image(ComprehensiveSRStorage, "SR", study_uid=study, SeriesNumber=998)
    enhanced = make_enhanced_ct(4, study_uid=study, SeriesNumber=2, SeriesDescription="Head enhanced",
                                ConvolutionKernel="H30s", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"])  # fmt: skip
    page = make_non_image(SecondaryCaptureImageStorage, "OT", study_uid=study, SeriesNumber=999,
                          SeriesDescription="Dose page")  # fmt: skip
    try:
        with caplog.at_level(logging.INFO, logger="ich"):
            assert send_all(port, [dose_sr, report, enhanced, dose_sr]) == [0, 0, 0, 0]  # SRs first, one twice
            wait_for(lambda: len(wl) == 1 and len(wl.intake()) == 0)
            (study_id,) = wl.studies()["id"]
            row = wl.study(int(study_id))
            assert row.series_uid == enhanced.SeriesInstanceUID and row.n_slices == 4 and row.flagged  # scored
            assert [(c.number, c.description, c.n_slices, c.scored, c.reason) for c in row.exam_series] == [
                (2, "Head enhanced", 4, True, ""),
                (997, "Dose Report", 1, False, "not a CT image (modality SR, X-Ray Radiation Dose SR Storage)"),
                (998, "", 1, False, "not a CT image (modality SR, Comprehensive SR Storage)"),
            ]
            assert send_all(port, [page]) == [0]  # after the exam was scored, alone
            wait_for(lambda: len(wl.study(int(study_id)).exam_series) == 4 and len(wl.intake()) == 0)
    finally:
        listener.stop()
    row = wl.study(int(study_id))
    assert row.exam_series[-1].reason == "not a CT image (modality OT, Secondary Capture Image Storage)"
    assert len(wl) == 1 and listener.predictor.calls == 1 and not row.updated and row.n_slices == 4
    assert sent == [int(study_id)]  # results went once: the late dose page sent nothing again
    assert "set-aside series listed, images unchanged: not scored again" in caplog.text
    assert (
        "1 stored, 0 duplicates ignored, 0 failed, set aside (not CT images): 1 Comprehensive SR Storage,"
        " 2 X-Ray Radiation Dose SR Storage" in caplog.text
    )
    assert "set aside (not CT images): 1 Secondary Capture Image Storage" in caplog.text
    assert len(list((tmp_path / "inbox").rglob("*.dcm"))) == 1  # the Enhanced CT object, whole
    assert not Inbox(tmp_path / "inbox").unscored()


def test_a_queue_worker_lists_the_series_set_aside_too(tmp_path):
    """``ich listen --queue`` stores and remembers; ``ich worker`` scores through the same score_exam."""
    procrastinate = pytest.importorskip("procrastinate")
    from ich.jobs import QUEUE, TASK, ExamJobs

    parts, inbox, wl = exam(generate_uid()), Inbox(tmp_path / "inbox"), Worklist(tmp_path)
    (dose,) = parts.pop("dose")
    study, instance = dose.StudyInstanceUID, dicom.other_object(dose)
    assert inbox.set_aside(study, [instance]) == 0  # no image of the exam stored yet: nothing kept
    for ds in (ds for part in parts.values() for ds in part):
        inbox.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, to_bytes(ds))
    (folder,) = inbox.unscored()
    jobs = ExamJobs(wl, ByKernel(), tmp_path / "inbox")

    def run() -> None:
        key = folder.name
        jobs.run(key, procrastinate.jobs.Job(id=1, queue=QUEUE, lock=key, queueing_lock=key, task_name=TASK,
                                             task_kwargs={"key": key}, attempts=0))  # fmt: skip

    run()
    (study_id,) = wl.studies()["id"]
    assert "Dose report" not in {c.description for c in wl.study(int(study_id)).exam_series}  # not sent yet
    assert inbox.set_aside(study, [instance, instance]) == 1 and inbox.set_aside(study, [instance]) == 0  # once
    assert inbox.unscored() == [folder]  # the exam changed: a worker lists it
    run()
    reasons = {c.description: c.reason for c in wl.study(int(study_id)).exam_series}
    assert reasons["Dose report"] == "not a CT image (modality OT, Secondary Capture Image Storage)"
    assert jobs.predictor.calls == 1 and not inbox.unscored() and len(wl) == 1  # the same images: not scored again
    run()  # delivered again: nothing to do
    assert jobs.predictor.calls == 1


def test_a_failed_exam_is_retried_after_30_s_then_twice_as_long_each_time_at_most_hourly(tmp_path):
    assert [retry_delay(n) for n in range(1, 10)] == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert retry_delay(5000) == 3600  # failing hourly for months: no overflow
    assert [retry_delay(n, first=0.3) for n in (1, 2, 3)] == [0.3, 0.6, 1.2]
    wl = Worklist(tmp_path)
    listener = Listener(wl, None, Inbox(tmp_path / "inbox"), enqueue=lambda key: None)  # never started: no wait
    folder = tmp_path / "inbox" / "0123abcd"
    for attempt in range(1, 10):
        before, now = time.monotonic(), pd.Timestamp.now(tz="UTC")
        listener._failed(folder, "OSError: simulated", retry=True)
        assert listener._retry[folder] - before == pytest.approx(retry_delay(attempt), abs=1)
        (row,) = wl.intake().itertuples()
        assert row.attempts == attempt and row.state == INTAKE_FAILED
        waits = (pd.Timestamp(row.next_try) - now).total_seconds()
        assert waits == pytest.approx(retry_delay(attempt), abs=2)
    del listener._retry[folder]
    listener._failed(folder, "no series to score", retry=False)  # nothing to retry: waits for more instances
    assert folder not in listener._retry and wl.intake()["next_try"].isna().all()


def test_a_sender_pausing_mid_exam_does_not_get_it_scored_on_part_of_its_slices(tmp_path):
    """Found under load in the concurrent-senders test: a pause longer than the quiet period, the association still
    open, scored the first 4 of 36 slices (flagged or not on them) until the rest came."""
    wl = Worklist(tmp_path)
    listener = Listener(wl, FakePredictor(), Inbox(tmp_path / "inbox", QUIET))
    port = listener.start("127.0.0.1", 0, poll_seconds=0.05)
    datasets = series(6)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH")
    try:
        assert [int(assoc.send_c_store(ds).Status) for ds in datasets[:3]] == [0] * 3
        time.sleep(6 * QUIET)  # the sender pauses; its association stays open
        assert len(wl) == 0 and listener.predictor.calls == 0
        assert [int(assoc.send_c_store(ds).Status) for ds in datasets[3:]] == [0] * 3
        assoc.release()
        wait_for(lambda: len(wl) == 1)
    finally:
        listener.stop()
    assert wl.study(int(wl.studies()["id"].iloc[0])).n_slices == 6 and listener.predictor.calls == 1


def test_an_upload_of_two_exams_gives_one_row_each(tmp_path):
    first, second = exam(generate_uid()), exam(generate_uid())
    files = [
        dicom.Upload(f"{ds.SOPInstanceUID}.dcm", to_bytes(ds)) for e in (first, second) for p in e.values() for ds in p
    ]
    report = ingest(Worklist(tmp_path), ByKernel(), files)
    assert len(report.added) == 2 and not report.failed
    wl = Worklist(tmp_path)
    assert sorted(wl.study(i).series_uid for i in report.added) == sorted(
        e["soft"][0].SeriesInstanceUID for e in (first, second)
    )


def test_the_other_series_are_kept_for_the_viewer_replaced_on_re_upload_and_deleted_with_the_exam(tmp_path):
    parts = exam(generate_uid())
    files = [dicom.Upload(f"{ds.SOPInstanceUID}.dcm", to_bytes(ds)) for p in parts.values() for ds in p]
    wl = Worklist(tmp_path)
    (study_id,) = ingest(wl, ByKernel(), files).added
    bone = parts["bone"][0].SeriesInstanceUID
    assert set(wl.other_series(study_id)) == {parts[k][0].SeriesInstanceUID for k in ("scout", "bone", "coronal")}
    assert wl.volume(study_id, bone).shape == (6, 32, 32)
    with pytest.raises(KeyError):  # the dose page is not a CT image: never kept
        wl.volume(study_id, parts["dose"][0].SeriesInstanceUID)
    first = sorted(wl.volumes.iterdir())
    assert ingest(wl, ByKernel(), files).added == [study_id]  # a re-upload: new files, the old ones gone
    again = sorted(wl.volumes.iterdir())
    assert len(again) == len(first) == 4 and not set(first) & set(again)
    wl.delete_study(study_id)
    assert list(wl.volumes.iterdir()) == []


def test_a_series_kept_for_the_viewer_that_becomes_the_scored_one_is_not_kept_twice(tmp_path):
    parts = exam(generate_uid())
    wl = Worklist(tmp_path)
    bone_first = [
        dicom.Upload(f"{ds.SOPInstanceUID}.dcm", to_bytes(ds)) for k in ("bone", "coronal") for ds in parts[k]
    ]
    (study_id,) = ingest(wl, ByKernel(), bone_first).added
    assert wl.study(study_id).series_uid == parts["bone"][0].SeriesInstanceUID
    soft = [dicom.Upload(f"{ds.SOPInstanceUID}.dcm", to_bytes(ds)) for ds in parts["soft"]]
    ingest(wl, ByKernel(), bone_first + soft)  # the soft-tissue series came late: it is scored now
    assert wl.study(study_id).series_uid == parts["soft"][0].SeriesInstanceUID
    assert sorted(wl.other_series(study_id).values()) == [6, 8]  # bone and coronal
    assert len(list(wl.volumes.iterdir())) == 3


def test_a_full_disk_keeps_the_exam_failed_and_retries_it_until_it_is_on_the_worklist(tmp_path, monkeypatch):
    """Before: the inbox folder was marked scored though its exam failed, and never reached the worklist."""
    wl = Worklist(tmp_path)
    real_write = ich.worklist.store._write_npz

    def disk_full(*args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ich.worklist.store, "_write_npz", disk_full)
    listener = Listener(wl, FakePredictor(), Inbox(tmp_path / "inbox", QUIET), retry_seconds=0.3)
    port = listener.start("127.0.0.1", 0, poll_seconds=0.05)
    try:
        assert set(send_all(port, series(4))) == {0}
        wait_for(lambda: (wl.intake()["state"] == INTAKE_FAILED).any())
        (failed,) = wl.intake().itertuples()
        assert "No space left on device" in failed.reason and failed.next_try and len(wl) == 0
        wait_for(lambda: int(wl.intake()["attempts"].iloc[0]) >= 2)  # tried again, still full
        monkeypatch.setattr(ich.worklist.store, "_write_npz", real_write)  # space freed
        wait_for(lambda: len(wl) == 1 and len(wl.intake()) == 0, seconds=30)
    finally:
        listener.stop()
    assert wl.study(int(wl.studies()["id"].iloc[0])).n_slices == 4
    assert not Inbox(tmp_path / "inbox").unscored()


def test_a_failed_exam_is_scored_at_restart(tmp_path):
    inbox = Inbox(tmp_path / "inbox", QUIET)
    for ds in series(3):
        inbox.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, to_bytes(ds))
    wl = Worklist(tmp_path)
    # A new Inbox, as after a restart: the files are found on disk, not also seen arriving (which would make
    # the exam due a second time once quiet, and a second attempt could succeed before the check below).
    first = Listener(wl, FakePredictor(fail_on=1), Inbox(tmp_path / "inbox", QUIET), retry_seconds=3600)
    first.start("127.0.0.1", 0, poll_seconds=0.05)
    try:
        wait_for(lambda: len(wl.intake()) == 1 and wl.intake()["state"].iloc[0] == INTAKE_FAILED)
    finally:
        first.stop()
    assert len(wl) == 0 and inbox.unscored()  # a model error: not marked done
    second = Listener(wl, FakePredictor(), Inbox(tmp_path / "inbox", QUIET))
    second.start("127.0.0.1", 0, poll_seconds=0.05)
    try:
        wait_for(lambda: len(wl) == 1 and len(wl.intake()) == 0)
    finally:
        second.stop()


def test_a_scout_alone_waits_for_more_instances_and_says_why(tmp_path):
    wl = Worklist(tmp_path)
    listener = Listener(wl, FakePredictor(), Inbox(tmp_path / "inbox", QUIET))
    port = listener.start("127.0.0.1", 0, poll_seconds=0.05)
    study = generate_uid()
    try:
        assert send_all(port, exam(study)["scout"]) == [0]
        wait_for(lambda: (wl.intake()["state"] == INTAKE_FAILED).any())
        assert "localizer (scout)" in wl.intake()["reason"].iloc[0] and wl.intake()["next_try"].isna().all()
        assert send_all(port, exam(study)["soft"]) == [0] * 6  # the rest of the exam comes
        wait_for(lambda: len(wl) == 1 and len(wl.intake()) == 0)
    finally:
        listener.stop()
    assert wl.study(int(wl.studies()["id"].iloc[0])).n_slices == 6 and listener.predictor.calls == 1


def test_a_rescore_that_fails_after_writing_its_volume_leaves_the_old_row_and_volume(tmp_path, monkeypatch):
    """Before: the volume was overwritten in place, so the old 4-slice row pointed at a 6-slice volume."""
    wl = Worklist(tmp_path)
    study_id, first = add(wl, 0.3, n=4)
    grown = series_of(6)
    for s in grown.slices:
        s.study_uid = first.study_uid
    grown.study_uid = first.study_uid

    def killed(values):  # fails while the slice rows are written, after the new volume is on disk
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ich.worklist.store, "_nullable", killed)
    probs = np.full((6, 6), 0.9, np.float32)
    with pytest.raises(OSError):
        wl.add_study(grown, FakePrediction(grown.sop_uids, probs, 0.9, None, True))
    monkeypatch.undo()
    row = wl.study(study_id)
    assert row.n_slices == 4 and wl.volume(study_id).shape[0] == 4 and len(wl.slices(study_id)) == 4
    assert sorted(p.name for p in wl.volumes.iterdir()) == [row.volume_file]  # the new file went with it


def test_a_delete_never_removes_the_volume_of_a_re_add_of_the_same_exam(tmp_path, monkeypatch):
    """A re-add between a delete's transaction and its unlink: before, both used one file name."""
    wl = Worklist(tmp_path)
    study_id, series = add(wl, 0.3)
    readded: list[int] = []
    unlink = Path.unlink

    def re_add_first(path: Path, missing_ok: bool = False) -> None:
        if path.parent == wl.volumes and not readded:
            probs = np.full((len(series), 6), 0.2, np.float32)
            readded.append(wl.add_study(series, FakePrediction(series.sop_uids, probs, 0.2, None, False)))
        unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", re_add_first)
    wl.delete_study(study_id)
    monkeypatch.undo()
    (again,) = readded
    assert wl.volume(again).shape[0] == len(series)  # before: FileNotFoundError


# Each process adds the same exams, in the same order, starting together.
ADD_SAME = """
import sys, time
from ich import dicom
from ich.worklist import Worklist, ingest
from tests.helpers import FakePredictor
start = float(sys.argv[2])
folders = sorted(p for p in __import__("pathlib").Path(sys.argv[1]).iterdir() if p.is_dir())
time.sleep(max(0.0, start - time.time()))
problems = []
for folder in folders:
    problems += [str(p) for p in ingest(Worklist(sys.argv[3]), FakePredictor(), [folder]).problems]
print("\\n".join(problems))
"""


def test_two_processes_adding_the_same_exams_at_once_give_one_row_each(tmp_path):
    """Before: SELECT then INSERT in a deferred transaction: 'UNIQUE constraint failed' in one process."""
    exams = tmp_path / "exams"
    for k in range(12):
        folder = exams / f"{k:02d}"
        folder.mkdir(parents=True)
        for u in uploads(3):
            (folder / u.name).write_bytes(u.data)
    Worklist(tmp_path / "data")  # created before, so both processes open an existing store
    start = str(time.time() + 4.0)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ADD_SAME, str(exams), start, str(tmp_path / "data")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == ["", ""], outputs  # no exam failed in either process
    wl = Worklist(tmp_path / "data")
    assert len(wl) == 12 and set(wl.studies()["n_slices"]) == {3}


def test_a_damaged_database_is_named_with_what_to_do(tmp_path):
    wl = Worklist(tmp_path)
    for score in (0.2, 0.9):
        add(wl, score)
    assert wl.check() == []
    path = tmp_path / "worklist.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:  # the WAL folded in: the damage reaches every page
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    path.write_bytes(data[:100] + b"\xff" * 200 + data[300:])  # the header and first page overwritten
    (tmp_path / "worklist.sqlite3-wal").unlink(missing_ok=True)
    with pytest.raises(StoreError, match=r"worklist\.sqlite3: the worklist database is damaged .* backup"):
        Worklist(tmp_path).studies()
    commands = [["worklist"], ["worklist", "--check"], ["listen", "--port", "0"]]  # every command that opens it
    for command in commands:
        run = [sys.executable, "-m", "ich", *command, "--data-dir", str(tmp_path)]
        done = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "worklist.sqlite3: the worklist database is damaged" in done.stderr
        assert "ICH_DATA_DIR" in done.stderr


def test_no_identifier_in_any_log_line_from_arrival_to_results_in_pacs(tmp_path, pacs, caplog, recwarn):
    """Every logger at INFO (what `ich listen` shows) and every warning, for an exam whose names highdicom warns
    about ("CQ500-CT-0" is not a person name) sent back to PACS as an SR and a key image."""
    destination, received = pacs
    wl = Worklist(tmp_path)
    names = {"PatientName": "CQ500-CT-0", "PatientID": "PID-67890", "ReferringPhysicianName": "Smith",
             "AccessionNumber": "ACC-4242", "InstitutionName": "St Elsewhere"}  # fmt: skip
    study, uid = generate_uid(), generate_uid()
    datasets = [
        make_ct(study_uid=study, series_uid=uid, instance=i + 1, ImagePositionPatient=[0, 0, 5.0 * i], **names)
        for i in range(4)
    ]
    sender = SendResults(wl, destination, calling_ae="ICH")
    listener = Listener(wl, FakePredictor({"any": 0.9}), Inbox(tmp_path / "inbox", QUIET), on_scored=[sender])
    port = listener.start("127.0.0.1", 0, poll_seconds=0.05)
    try:
        with caplog.at_level(logging.INFO):
            assert set(send_all(port, datasets)) == {0}
            wait_for(lambda: len(received) == 2)
    finally:
        listener.stop()
    assert str(received[0].PatientName) == "CQ500-CT-0"  # PACS gets the identifiers; the logs do not
    text = caplog.text + "\n".join(str(w.message) for w in recwarn)
    secrets = [*names.values(), study, uid, *(ds.SOPInstanceUID for ds in datasets)]
    assert "worklist id" in caplog.text and not [s for s in secrets if s in text]


def test_ich_predict_scores_each_exam_on_its_chosen_series_and_writes_an_exam_csv(tmp_path, tiny_checkpoint):
    from tests.test_predict import run_ich

    first, second, scout_only = exam(generate_uid()), exam(generate_uid()), exam(generate_uid())
    folder = tmp_path / "export"
    folder.mkdir()
    for ds in [ds for e in (first, second) for p in e.values() for ds in p] + scout_only["scout"]:
        (folder / f"{ds.SOPInstanceUID}.dcm").write_bytes(to_bytes(ds))
    out = tmp_path / "sub.csv"
    proc = run_ich("predict", str(folder), "--weights", str(tiny_checkpoint), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    soft = {ds.SOPInstanceUID for e in (first, second) for ds in e["soft"]}
    assert {i.rsplit("_", 1)[0] for i in pd.read_csv(out)["ID"]} == soft  # the axial soft-tissue series only
    exams = pd.read_csv(tmp_path / "sub_exams.csv")
    assert len(exams) == 3 and exams["exam"].tolist() == [1, 2, 3]
    counts = [line.split(",")[5] for line in (tmp_path / "sub_exams.csv").read_text().splitlines()[1:]]
    assert sorted(counts) == ["", "6", "6"]  # whole numbers, blank for the exam with none scored (not "6.0")
    scored = exams.dropna(subset=["score"])
    assert set(scored["series_uid"]) == {e["soft"][0].SeriesInstanceUID for e in (first, second)}
    assert (scored["slices"] == 6).all() and scored["not_scored"].str.contains("bone kernel").all()
    (unscored,) = exams[exams["score"].isna()].itertuples()
    assert unscored.study_uid == scout_only["scout"][0].StudyInstanceUID and "localizer" in unscored.not_scored
    assert "no series to score (Topogram: localizer (scout))" in proc.stderr

    every = run_ich(
        "predict", str(folder), "--weights", str(tiny_checkpoint), "--out", str(out), "--quiet", "--every-series"
    )
    assert every.returncode == 0, every.stderr
    assert (
        pd.read_csv(out)["ID"].str.rsplit("_", n=1).str[0].nunique() == 2 * (1 + 6 + 6 + 8 + 1) + 1
    )  # the dose pages too


def test_a_study_keeps_the_rule_that_scored_it(tmp_path):
    """Issue 23: captions and results used the model loaded now, not the one that scored the study."""
    parts = exam(generate_uid())
    scorer = ByKernel()
    scorer.top_k = 6
    (study_id,) = ingest(
        Worklist(tmp_path), scorer, [dicom.Upload("s.dcm", to_bytes(ds)) for ds in parts["soft"]]
    ).added
    record = Worklist(tmp_path).study(study_id)
    assert (record.top_k, record.model, dict(record.thresholds)) == (6, scorer.name, scorer.thresholds)
    listed = Worklist(tmp_path).studies()
    assert listed["top_k"].tolist() == [6] and listed["model"].tolist() == [scorer.name]


def structured_reports(study: str) -> list:
    """A dose SR and a comprehensive SR of ``study``, as a scanner sends them with the images."""
    return [
        make_non_image(XRayRadiationDoseSRStorage, "SR", study_uid=study, SeriesNumber=997,
                       SeriesDescription="Dose Report"),
        make_non_image(ComprehensiveSRStorage, "SR", study_uid=study, SeriesNumber=998),
    ]  # fmt: skip


def test_an_upload_lists_the_exams_structured_reports_with_its_series_not_as_problem_lines(tmp_path):
    """As the listener lists what it sets aside at the door (the same reasons), not "not a CT image: modality SR"
    problem lines; a report uploaded alone, with no image of its exam, stays one."""
    study = generate_uid()
    parts, (dose, report) = exam(study), structured_reports(study)
    files = [dicom.Upload(f"{ds.SOPInstanceUID}.dcm", to_bytes(ds)) for p in parts.values() for ds in p]
    files += [dicom.Upload("dose.dcm", to_bytes(dose)), dicom.Upload("report.dcm", to_bytes(report))]
    files += [dicom.Upload("dose.dcm", to_bytes(dose))]  # the same instance twice: one instance
    wl = Worklist(tmp_path)

    result = ingest(wl, ByKernel(), files)

    assert len(result.added) == 1 and not result.problems and not result.failed
    row = Worklist(tmp_path).study(result.added[0])
    assert row.series_uid == parts["soft"][0].SeriesInstanceUID
    listed = [(c.number, c.description, c.n_slices, c.scored, c.reason) for c in row.exam_series]
    assert listed[1:3] == [
        (997, "Dose Report", 1, False, "not a CT image (modality SR, X-Ray Radiation Dose SR Storage)"),
        (998, "", 1, False, "not a CT image (modality SR, Comprehensive SR Storage)"),
    ]
    assert len(listed) == 5 + 2 and {c.description for c in row.exam_series} >= {"Topogram", "Dose report"}

    alone = ingest(wl, ByKernel(), [dicom.Upload("dose.dcm", to_bytes(structured_reports(generate_uid())[0]))])
    assert not alone.added and [str(p) for p in alone.problems] == [
        "dose.dcm: not a CT image: modality SR (structured report; X-Ray Radiation Dose SR Storage)"
    ]


def test_ich_predict_names_an_exams_structured_reports_among_the_series_not_scored(tmp_path, tiny_checkpoint):
    from tests.test_predict import run_ich

    study = generate_uid()
    parts, (dose, report) = exam(study), structured_reports(study)
    folder = tmp_path / "export"
    folder.mkdir()
    for ds in [*parts["soft"], *parts["bone"]]:
        (folder / f"{ds.SOPInstanceUID}.dcm").write_bytes(to_bytes(ds))
    (folder / "dose.dcm").write_bytes(to_bytes(dose))
    (folder / "report.dcm").write_bytes(to_bytes(report))
    out = tmp_path / "sub.csv"

    proc = run_ich("predict", str(folder), "--weights", str(tiny_checkpoint), "--out", str(out), "--quiet")

    assert proc.returncode == 0, proc.stderr
    (row,) = pd.read_csv(tmp_path / "sub_exams.csv").itertuples()
    assert row.series_uid == parts["soft"][0].SeriesInstanceUID
    assert row.not_scored == (
        "Dose Report: not a CT image (modality SR, X-Ray Radiation Dose SR Storage); "
        "series 998: not a CT image (modality SR, Comprehensive SR Storage); Head 5mm bone: bone kernel (H70h)"
    )
    assert "dose.dcm" not in proc.stderr and "report.dcm" not in proc.stderr
