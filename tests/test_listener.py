"""ich.listener: series pushed over DICOM (C-STORE on loopback) land on the worklist, and nothing received is lost."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time

import highdicom as hd
import numpy as np
import pytest
from pydicom.uid import ComprehensiveSRStorage, MRImageStorage, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from ich.listener import Inbox, Listener, SendResults
from ich.presentation import studies_table
from ich.worklist import Worklist
from tests.dicom_factory import make_ct, to_bytes
from tests.helpers import ROOT, FakePredictor, add

QUIET = 0.3  # seconds without a new instance before a series is scored


def series(n: int, study: str | None = None, uid: str | None = None, start: int = 0) -> list:
    study, uid = study or generate_uid(), uid or generate_uid()
    return [make_ct(z=5.0 * i, series_uid=uid, study_uid=study, instance=i + 1) for i in range(start, start + n)]


def send(port: int, datasets: list, calling: str = "SENDER", sop_class=CTImageStorage) -> list[int]:
    """C-STORE each dataset in one association; the status of each (or -1 when nothing came back: then the
    association was aborted and the rest are -1 too)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH")
    assert assoc.is_established, "association refused"
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds) if assoc.is_established else None
            statuses.append(int(status.Status) if status else -1)
    finally:
        assoc.release()
    return statuses


def send_as_pacs(port: int, datasets: list, calling: str = "SENDER", tries: int = 3) -> tuple[list[int], bool]:
    """:func:`send`, then what got no answer sent again on a new association, as a PACS does; the statuses and
    whether anything was sent again. Under load, with senders and listener in one test process, pynetdicom
    (3.0) now and then leaves a request unanswered ("Received unexpected C-STORE service message", then the
    sender's 30 s DIMSE timeout); nothing unanswered was acknowledged, so a resend loses nothing."""
    statuses = send(port, datasets, calling)
    resent = False
    for _ in range(tries - 1):
        missing = [i for i, status in enumerate(statuses) if status == -1]
        if not missing:
            break
        resent = True
        for i, status in zip(missing, send(port, [datasets[i] for i in missing], calling)):
            statuses[i] = status
    return statuses, resent


def wait_for(condition, seconds: float = 20.0) -> None:
    end = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.fixture
def running(tmp_path):
    wl = Worklist(tmp_path)
    scored: list[int] = []  # what a webhook (ich.notify.Webhook) would be called with
    listener = Listener(
        wl, FakePredictor({"any": 0.8}), Inbox(tmp_path / "inbox", QUIET), allow=["SENDER"], on_scored=[scored.append]
    )
    port = listener.start("127.0.0.1", 0, poll_seconds=0.05)
    yield wl, listener, port, scored
    listener.stop()


def test_a_pushed_series_is_scored_once_and_rescored_when_it_grows(running, caplog):
    wl, listener, port, scored = running
    first = series(3)
    with caplog.at_level(logging.INFO, logger="ich"):
        assert send(port, first) == [0, 0, 0]
        wait_for(lambda: len(wl) == 1)
        (study_id,) = wl.studies()["id"]
        assert wl.study(study_id).n_slices == 3 and wl.study(study_id).flagged and wl.study(study_id).updated is None
        assert studies_table(wl.studies())["Status"].tolist() == ["new"]
        assert send(port, first[:1]) == [0]  # a repeated instance is accepted and ignored
        more = series(2, first[0].StudyInstanceUID, first[0].SeriesInstanceUID, start=3)
        assert send(port, more) == [0, 0]
        wait_for(lambda: len(scored) == 2)  # the callbacks run after the store commits: wait for them
    assert len(wl) == 1 and listener.predictor.calls == 2 and scored == [study_id, study_id]
    assert wl.study(study_id).n_slices == 5 and wl.study(study_id).updated  # marked for the reader who saw 3
    assert studies_table(wl.studies())["Status"].tolist() == ["new · updated"]
    text = caplog.text
    assert "3 stored, 0 duplicates" in text and "0 stored, 1 duplicates" in text and "FLAGGED" in text
    identifiers = [first[0].StudyInstanceUID, first[0].SeriesInstanceUID, first[0].PatientID, str(first[0].PatientName)]
    assert not [i for i in identifiers if i and i in text]


def test_echo_and_refusals(running, caplog):
    wl, _, port, _ = running
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH")
    assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
    assoc.release()
    with caplog.at_level(logging.INFO, logger="ich"):
        stranger = AE(ae_title="STRANGER")
        stranger.add_requested_context(CTImageStorage)
        assert stranger.associate("127.0.0.1", port, ae_title="ICH").is_rejected
        assert ae.associate("127.0.0.1", port, ae_title="OTHER").is_rejected  # the called AE title is checked
        wait_for(lambda: "called AE title 'OTHER" in caplog.text)
        # An MR image is part of no head CT we score: accepted (the sender sees success), set aside, not kept.
        mr = make_ct(study_uid=generate_uid(), series_uid=generate_uid(), instance=1)
        mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
        assert send(port, [mr], sop_class=MRImageStorage) == [0]
        wait_for(lambda: "set aside (not CT images): 1 MR Image Storage" in caplog.text)
    assert "'STRANGER'" in caplog.text and "not allowed" in caplog.text
    assert not list((wl.directory / "inbox").rglob("*.dcm")) and len(wl.intake()) == 0


def test_a_sender_is_answered_while_another_process_holds_the_database(running):
    """The C-STORE handler never waits for SQLite: a dashboard (another connection) holding the write lock
    must not make a PACS time out (it did once under load: 30 s, the sender's DIMSE timeout)."""
    import sqlite3

    wl, _, port, _ = running
    blocker = sqlite3.connect(wl.directory / "worklist.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # SQLite's write lock, as a long transaction elsewhere would hold it
    try:
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(CTImageStorage)
        ae.dimse_timeout = 5  # well under the store's 30 s lock wait
        assoc = ae.associate("127.0.0.1", port, ae_title="ICH")
        started = time.monotonic()
        statuses = [int(s.Status) if s else -1 for s in (assoc.send_c_store(ds) for ds in series(3))]
        answered = time.monotonic() - started
        assoc.release()
        assert statuses == [0, 0, 0] and answered < 5, (statuses, answered)
        assert len(list((wl.directory / "inbox").rglob("*.dcm"))) == 3  # on disk, whatever the database does
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_for(lambda: len(wl) == 1)  # once the lock is free the exam is shown, scored, and its line cleared
    wait_for(lambda: len(wl.intake()) == 0)


def test_a_corrupt_instance_does_not_stop_its_series(running):
    wl, _, port, _ = running
    datasets = series(4)
    datasets[1].PixelData = datasets[1].PixelData[:100]  # shorter than Rows x Columns says
    assert send(port, datasets) == [0, 0, 0, 0]  # stored as received; reading it is ingest's job
    wait_for(lambda: len(wl) == 1)
    assert wl.study(int(wl.studies()["id"].iloc[0])).n_slices == 3


def test_series_received_before_a_crash_are_scored_at_restart(tmp_path):
    inbox = Inbox(tmp_path / "inbox", QUIET)
    for ds in series(4):
        inbox.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, to_bytes(ds))
    assert len(inbox.unscored()) == 1  # the listener died before the quiet period ended
    wl = Worklist(tmp_path)
    listener = Listener(wl, FakePredictor(), Inbox(tmp_path / "inbox", QUIET))
    listener.start("127.0.0.1", 0, poll_seconds=0.05)
    try:
        wait_for(lambda: len(wl) == 1)
        wait_for(lambda: not inbox.unscored())
    finally:
        listener.stop()
    assert wl.study(int(wl.studies()["id"].iloc[0])).n_slices == 4
    assert not [p for p in (tmp_path / "inbox").rglob("*") if p.name.endswith(".tmp")]


def test_inbox_names_hide_identifiers(tmp_path):
    inbox = Inbox(tmp_path, QUIET)
    ds = series(1)[0]
    assert inbox.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, b"x")
    assert not inbox.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, b"x")
    names = [p.name for p in tmp_path.rglob("*")]
    assert not [n for n in names if ds.SOPInstanceUID in n or ds.SeriesInstanceUID in n]
    assert inbox.due(now=time.monotonic()) == [] and len(inbox.due(now=time.monotonic() + QUIET)) == 1


def test_worklist_command_prints_without_identifiers(tmp_path):
    wl = Worklist(tmp_path)
    _, rescored = add(wl, 0.9)
    add(wl, 0.2)
    wl.add_study(rescored, FakePredictor({"any": 0.8}).predict_series(rescored))  # a re-score: marked updated

    def listed() -> list[dict]:
        command = [sys.executable, "-m", "ich", "worklist", "--json", "--data-dir", str(tmp_path)]
        return json.loads(subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout)

    high, low = listed()
    assert high["likelihood"] == pytest.approx(0.8) and high["flagged"] and high["slices"] == 4
    assert high["source"] == "upload"  # how it came, as the store recorded it
    assert set(high) == {"id", "source", "received", "slices", "likelihood", "flagged", "status", "updated"}
    assert high["updated"] >= high["received"] and low["updated"] is None
    assert np.isfinite(high["likelihood"])
    text = subprocess.run(
        [sys.executable, "-m", "ich", "worklist", "--data-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert "updated" in text.splitlines()[0] and high["updated"][:16] in text and "NaT" not in text


def test_results_go_back_to_pacs_in_the_scanned_study(tmp_path, pacs):
    destination, received = pacs
    wl, inbox = Worklist(tmp_path), Inbox(tmp_path / "inbox", QUIET)

    def left_half(hu: np.ndarray) -> np.ndarray:
        cam = np.zeros(hu.shape, np.float32)
        cam[:, : hu.shape[1] // 2] = 1.0
        return cam

    sender = SendResults(wl, destination, heatmap=left_half, aggregation="top-2")
    listener = Listener(wl, FakePredictor({"any": 0.9, "subdural": 0.7}), inbox, on_scored=[sender])
    port = listener.start("127.0.0.1", 0, poll_seconds=0.05)
    try:
        sent = series(3)
        assert send(port, sent) == [0, 0, 0]
        wait_for(lambda: len(received) == 2)
    finally:
        listener.stop()
    key, report = sorted(received, key=lambda ds: ds.Modality)  # OT (the key image) before SR
    study, sops = sent[0].StudyInstanceUID, {ds.SOPInstanceUID for ds in sent}
    assert report.StudyInstanceUID == study == key.StudyInstanceUID
    assert report.SeriesInstanceUID not in {sent[0].SeriesInstanceUID, key.SeriesInstanceUID}
    assert report.PatientID == sent[0].PatientID  # PACS files it with the patient's scan
    items = hd.sr.utils.find_content_items(report, recursive=True)  # the TID 1500 tree, flattened
    named = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in items}
    assert "NOT FOR DIAGNOSTIC USE" in named["Disclaimer"].TextValue
    assert named["Triage flag"].ConceptCodeSequence[0].CodeMeaning == "Flagged"
    assert "series likelihood: top-2" in [item.TextValue for item in items if item.ValueType == "TEXT"]
    likelihood = named["Hemorrhage likelihood of the series"].MeasuredValueSequence[0].NumericValue
    assert float(likelihood) == pytest.approx(0.9)
    keys = [i for i in items if i.ValueType == "IMAGE"]
    assert keys and {k.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for k in keys} <= sops
    assert key.BurnedInAnnotation == "YES" and key.pixel_array.shape[-1] == 3
    rgb = key.pixel_array.astype(int)
    assert (rgb[:, :16, 0] != rgb[:, :16, 2]).any()  # the heatmap's colours on the left
    right = rgb[24:, 16:]  # below the burned-in text, no heatmap: the brain-window grey of 30 HU tissue
    assert (right[..., 0] == right[..., 2]).all() and right.max() == round(30 / 80 * 255)
    assert hd.sr.srread(_encoded(report)).SOPClassUID == ComprehensiveSRStorage  # highdicom reads it back


def _encoded(ds) -> io.BytesIO:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def test_a_listener_that_only_receives_does_not_load_torch():
    """``ich listen --queue`` receives and stores while workers score: it should not pay torch's import (seconds,
    hundreds of MB) for a model it never runs."""
    code = "import sys, ich.listener, ich.jobs; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
