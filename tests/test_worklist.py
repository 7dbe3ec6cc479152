"""ich.worklist: the store, ingest and demo seeding. Tests that take ``database`` run on SQLite and on PostgreSQL
(a throw-away server, tests/postgres.py); those about SQLite's own file (an old schema migrated) on SQLite only."""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import sqlite3
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from ich import dicom
from ich.labels import CLASSES
from ich.worklist import (
    STATUS_CLEAR,
    STATUS_HEMORRHAGE,
    STATUS_NEW,
    StoreError,
    StudyRecord,
    Worklist,
    ingest,
    seed_demo,
)
from tests.dicom_factory import make_ct, to_bytes
from tests.helpers import THRESHOLDS, FakePredictor, add, series_of, uploads
from tests.test_exam_intake import (
    test_two_processes_adding_the_same_exams_at_once_give_one_row_each as two_processes_add_the_same_exams,
)


def rows(wl: Worklist, sql: str, **params) -> list[tuple]:
    """Rows straight from the store's tables, whichever engine holds them."""
    with wl.engine.connect() as db:
        return [tuple(row) for row in db.execute(sa.text(sql), params)]


def is_read_only(mapping) -> bool:
    try:
        mapping["any"] = 0.0
    except TypeError:
        return True
    return False


def test_worklist_sorted_by_likelihood_and_anonymous(tmp_path, database):
    wl = Worklist(tmp_path)
    for score in (0.2, 0.9, 0.55):
        add(wl, score)
    studies = wl.studies()
    assert studies["score"].tolist() == pytest.approx([0.9, 0.55, 0.2])
    assert studies["label"].str.fullmatch(r"Study \d+ · 4 slices").all()
    assert not {"study_uid", "series_uid"} & set(studies.columns)
    assert studies["flagged"].tolist() == [True, True, False]
    assert (studies["status"] == STATUS_NEW).all()
    assert len(wl.studies(STATUS_CLEAR)) == 0
    wl.save_review(int(studies["id"].iloc[0]), False)  # the top study is read: unread ones move up
    assert wl.studies()["score"].tolist() == pytest.approx([0.55, 0.2, 0.9])


def test_study_round_trip_and_restart(tmp_path, database):
    wl = Worklist(tmp_path)
    series = series_of(4)
    labels = pd.DataFrame(0, index=series.sop_uids[:3], columns=list(CLASSES))
    labels.loc[series.sop_uids[1], ["any", "subdural"]] = 1
    prediction = FakePredictor({"any": 0.8}).predict_series(series)
    study_id = wl.add_study(series, prediction, labels, thresholds=THRESHOLDS, model="fake")

    assert (tmp_path / "worklist.sqlite3").exists() == (database is None) == (wl.path is not None)
    again = Worklist(tmp_path)  # a server restart
    info = again.study(study_id)
    assert isinstance(info, StudyRecord) and info.id == study_id and info.label == f"Study {study_id} · 4 slices"
    assert (info.study_uid, info.series_uid, info.n_slices) == (series.study_uid, series.series_uid, 4)
    assert info.score == pytest.approx(0.8) and info.flagged is True and info.demo is False
    assert info.status == STATUS_NEW and info.read is None and info.notes == () and info.model == "fake"
    assert info.thresholds == THRESHOLDS and is_read_only(info.thresholds)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.status = STATUS_CLEAR  # type: ignore[misc]
    with pytest.raises(KeyError):
        again.study(study_id + 1)
    np.testing.assert_array_equal(again.volume(study_id), np.rint(series.volume()).astype(np.int16))
    slices = again.slices(study_id)
    assert slices["index"].tolist() == [0, 1, 2, 3]
    assert slices["sop_uid"].tolist() == series.sop_uids
    assert slices["truth"].tolist()[:3] == ["csv"] * 3 and pd.isna(slices["truth"].iloc[3])
    assert slices.loc[1, "y_subdural"] == 1 and slices.loc[0, "y_any"] == 0 and np.isnan(slices.loc[3, "y_any"])
    assert slices["p_any"].to_numpy() == pytest.approx(0.8)
    assert not list((tmp_path / "volumes").glob("*.tmp"))


def test_review_becomes_actual_and_persists(tmp_path, database):
    wl = Worklist(tmp_path)
    study_id, _series = add(wl, 0.7, n=5)
    wl.save_review(study_id, True, ["subdural"], [1, 3])  # key slices only: the others are not assessed
    info = Worklist(tmp_path).study(study_id)
    assert info.status == STATUS_HEMORRHAGE and info.read is not None and not info.read.others_clear
    assert info.read.subtypes == ("subdural",) and info.read.slice_marks == (1, 3)
    slices = wl.slices(study_id)
    assert slices["truth"].tolist() == [None, "review", None, "review", None]
    assert slices["y_any"].tolist()[1::2] == [1, 1] and slices["y_any"].iloc[::2].isna().all()

    wl.save_review(study_id, True, ["subdural"], [1, 3], others_clear=True)
    slices = wl.slices(study_id)
    assert (slices["truth"] == "review").all() and wl.study(study_id).read.others_clear
    assert slices["y_any"].tolist() == [0, 1, 0, 1, 0] and slices["y_subdural"].tolist() == [0, 1, 0, 1, 0]

    wl.save_review(study_id, False)
    assert wl.study(study_id).status == STATUS_CLEAR
    assert (wl.slices(study_id)["y_any"] == 0).all()
    assert rows(
        wl, "SELECT hemorrhage, subtypes, slice_marks FROM reviews WHERE study_id = :id ORDER BY id", id=study_id
    ) == [(1, '["subdural"]', "[1, 3]"), (1, '["subdural"]', "[1, 3]"), (0, "[]", "[]")]

    with pytest.raises(ValueError, match="slice marks"):
        wl.save_review(study_id, True, [], [5])
    with pytest.raises(ValueError, match="without hemorrhage"):
        wl.save_review(study_id, False, ["subdural"])
    with pytest.raises(ValueError, match="unknown subtypes"):
        wl.save_review(study_id, True, ["tumour"])


def test_reupload_keeps_id_labels_and_read(tmp_path, database):
    wl = Worklist(tmp_path)
    series = series_of(4)
    labels = pd.DataFrame(1, index=series.sop_uids, columns=list(CLASSES))
    study_id = wl.add_study(series, FakePredictor({"any": 0.3}).predict_series(series), labels, truth="phantom")
    wl.save_review(study_id, True)  # no marks: the labels stay the per-slice actual
    new_id = wl.add_study(series, FakePredictor({"any": 0.95}).predict_series(series))
    info, slices = wl.study(new_id), wl.slices(new_id)
    assert new_id == study_id and len(wl) == 1
    assert info.status == STATUS_HEMORRHAGE and info.score == pytest.approx(0.95)
    assert slices["truth"].eq("phantom").all() and (slices["y_subdural"] == 1).all()


def test_reupload_with_labels_for_other_slices_keeps_each_slices_labels(tmp_path, database):
    """A second label file that lists only some slices (or another series') relabels those and no others."""
    wl = Worklist(tmp_path)
    series = series_of(4)
    first = pd.DataFrame(0, index=series.sop_uids, columns=list(CLASSES))
    study_id = wl.add_study(series, FakePredictor({"any": 0.3}).predict_series(series), first)
    second = pd.DataFrame(1, index=[series.sop_uids[1], "1.2.3.not-this-series"], columns=list(CLASSES))
    wl.add_study(series, FakePredictor({"any": 0.3}).predict_series(series), second, truth="phantom")
    slices = wl.slices(study_id)
    assert slices["y_any"].tolist() == [0, 1, 0, 0]
    assert slices["truth"].tolist() == ["csv", "phantom", "csv", "csv"]
    unlabelled = series_of(2)
    other_id = wl.add_study(unlabelled, FakePredictor({"any": 0.3}).predict_series(unlabelled), second)
    assert wl.slices(other_id)["y_any"].isna().all() and wl.slices(other_id)["truth"].isna().all()


def test_exports_leave_uids_out_by_default(tmp_path, database):
    wl = Worklist(tmp_path)
    study_id, series = add(wl, 0.6)
    wl.save_review(study_id, True, ["epidural"], [0, 2])  # stored 0-based
    plain = wl.export_csv()
    assert pd.read_csv(io.StringIO(plain))["read_slice_marks"].tolist() == ["[1, 3]"]  # exported as shown: 1-based
    assert series.study_uid not in plain and series.series_uid not in plain and "read_subtypes" in plain
    assert series.study_uid in wl.export_csv(uids=True)
    slices = pd.read_csv(io.StringIO(wl.slices_csv(study_id)))
    assert slices["slice"].tolist() == [1, 2, 3, 4] and "sop_uid" not in slices
    assert series.sop_uids[0] in wl.slices_csv(study_id, uids=True)


def test_concurrent_writers(tmp_path, database):
    wl = Worklist(tmp_path)
    ids = [add(wl, 0.5)[0] for _ in range(3)]

    def read_many(study_id: int) -> None:
        for _ in range(10):
            wl.save_review(study_id, True, ["subdural"])
            wl.studies()

    with ThreadPoolExecutor(len(ids)) as pool:
        for done in [pool.submit(read_many, i) for i in ids]:
            done.result()  # raises what the thread raised
    assert all(len(wl.reviews(i)) == 10 for i in ids)


def test_ingest_keeps_going_past_bad_files_and_exams(tmp_path, caplog, database):
    wl = Worklist(tmp_path)
    good, failing = uploads(3), uploads(4)
    bad = dicom.Upload("notes.dcm", b"not a dicom file at all")
    steps: list[float] = []
    with caplog.at_level(logging.ERROR, logger="ich.worklist"):
        report = ingest(wl, FakePredictor(fail_on=1), [*good, *failing, bad], progress=lambda f, text: steps.append(f))
    assert len(report.added) == 1 and len(wl) == 1
    reasons = {p.path: p.reason for p in report.problems}
    assert "not a DICOM file" in reasons["notes.dcm"]
    assert [r for where, r in reasons.items() if where.startswith("exam 1 of 2 (")] == [
        "could not be added: RuntimeError: simulated failure"
    ]
    assert report.failed == ["RuntimeError: simulated failure"]  # worth a retry, unlike an unreadable file
    assert steps == sorted(steps) and steps[-1] == 1.0 and 0 < steps[-2] < 1.0
    # The server log has the traceback, with the series' place in the upload but no identifier.
    (record,) = caplog.records
    assert record.exc_info is not None and record.getMessage().startswith("exam 1 of 2 (")
    loaded = dicom.load([*good, *failing]).series
    identifiers = ["DOE", "TEST-0001", *(uid for s in loaded for uid in (s.study_uid, s.series_uid, *s.sop_uids))]
    assert not [i for i in identifiers if i in caplog.text]


def test_ingest_of_a_folder_with_a_zipped_series_and_a_corrupt_file(tmp_path, database):
    """Folders and zips on disk go through the streaming reader: zip members read from their archive."""
    folder = tmp_path / "upload"
    folder.mkdir()
    series = uploads(3)
    with zipfile.ZipFile(folder / "series.zip", "w") as zf:
        for u in series:
            zf.writestr(f"ct/{u.name}", u.data)
    (folder / "corrupt.dcm").write_bytes(b"\0" * 50)
    wl = Worklist(tmp_path / "data")
    steps: list[tuple[float, str]] = []
    report = ingest(wl, FakePredictor(), [folder], progress=lambda f, text: steps.append((f, text)))
    (study_id,) = report.added
    assert wl.study(study_id).n_slices == 3 and len(wl.slices(study_id)) == 3
    assert [(p.path, "not a DICOM file" in p.reason) for p in report.problems] == [(str(folder / "corrupt.dcm"), True)]
    fractions = [f for f, _ in steps]
    assert fractions == sorted(fractions) and steps[-1] == (1.0, "Done")
    assert any(text == "Scoring exam 1 of 1 (3 slices)" for _, text in steps)


@pytest.mark.slow
def test_seed_demo_once_with_labels(tmp_path, database):
    wl = Worklist(tmp_path)
    report = seed_demo(wl, FakePredictor({"any": 0.7, "subdural": 0.6}), n=2, size=96)
    assert report is not None and len(report.added) == 2 and not report.problems
    studies = wl.studies()
    assert studies["demo"].all() and studies["label"].str.startswith("Demo").all()
    assert all(wl.slices(i)["truth"].eq("phantom").all() for i in studies["id"])
    assert seed_demo(wl, FakePredictor()) is None and len(wl) == 2  # never twice


def test_delete_study_removes_rows_reads_and_volume(tmp_path, database):
    wl = Worklist(tmp_path)
    keep, _ = add(wl, 0.2)
    gone, _ = add(wl, 0.9)
    wl.save_review(gone, True, ["subdural"])
    volume = wl.volumes / wl.study(gone).volume_file
    wl.delete_study(gone)
    assert list(wl.studies()["id"]) == [keep] and not volume.exists()
    with pytest.raises(KeyError):
        wl.study(gone)
    assert rows(wl, "SELECT COUNT(*) FROM slices WHERE study_id = :id", id=gone) == [(0,)]
    assert rows(wl, "SELECT COUNT(*) FROM reviews WHERE study_id = :id", id=gone) == [(0,)]
    assert wl.volume(keep).shape[0] == 4


def test_a_version_1_store_keeps_the_meaning_of_its_reads(tmp_path):
    """Before key slices, a read's marks were the complete list: an old store's reads keep meaning that."""
    wl = Worklist(tmp_path)
    study_id, _ = add(wl, 0.7, n=3)
    with sqlite3.connect(wl.path) as db:  # the version 1 schema: no others_clear column
        db.execute("ALTER TABLE reviews DROP COLUMN others_clear")
        db.execute(
            "INSERT INTO reviews (study_id, hemorrhage, subtypes, slice_marks, created) VALUES (?, 1, '[]', '[1]', '')",
            (study_id,),
        )
    reopened = Worklist(tmp_path)
    assert reopened.study(study_id).read.others_clear
    assert reopened.slices(study_id)["y_any"].tolist() == [0, 1, 0]


def test_the_worklist_shows_the_exam_not_the_patient(tmp_path, database):
    wl = Worklist(tmp_path)
    study, uid = generate_uid(), generate_uid()
    header = {"StudyDate": "20261127", "StudyTime": "153012.123", "StudyDescription": "CT HEAD WO",
              "SeriesDescription": "AXIAL 5mm", "SliceThickness": 5.0}  # fmt: skip
    files = [
        dicom.Upload(
            f"{i}.dcm", to_bytes(make_ct(z=5.0 * i, series_uid=uid, study_uid=study, instance=i + 1, **header))
        )
        for i in range(3)
    ]
    ingest(wl, FakePredictor(), files, source="dicom")
    row = wl.studies().iloc[0]
    assert (
        row["study_datetime"] == pd.Timestamp("2026-11-27 15:30:12") and row["description"] == "CT HEAD WO · AXIAL 5mm"
    )
    assert row["thickness"] == 5.0 and row["source"] == "dicom"
    (problem,) = ingest(wl, FakePredictor(), uploads(3), source="fax").problems
    assert "source must be one of" in problem.reason


def test_identifiers_are_kept_only_while_an_admin_has_them_on(tmp_path, database):
    wl = Worklist(tmp_path)
    off, _ = add(wl, 0.5)  # make_ct writes PatientID TEST-0001 and an accession number
    assert not wl.identifiers_on
    assert rows(wl, "SELECT patient_id, accession FROM studies") == [(None, None)]
    wl.set_identifiers(True)
    on, _ = add(wl, 0.6)
    kept = wl.identifiers().set_index("id")
    assert kept.loc[on, "patient_id"] == "TEST-0001" and kept.loc[off].isna().all()
    assert "patient_id" not in wl.studies().columns  # the default listing never carries them
    wl.set_identifiers(False)
    assert wl.identifiers()[["patient_id", "accession"]].isna().all().all()  # off erases them


def test_opening_the_store_removes_files_a_killed_writer_left_but_not_live_ones(tmp_path):
    Worklist(tmp_path)
    stale = tmp_path / "volumes" / ".abc.npz.x1.tmp"
    live = tmp_path / "headers" / ".def.dcm.x2.tmp"  # another process may be writing it now
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    Worklist(tmp_path)
    assert not stale.exists() and live.exists()


def test_two_servers_on_one_postgresql_database_see_each_others_writes(tmp_path, postgres_url):
    """Two dashboard servers (two stores, each with its own connections) on one database; the volumes in one
    data directory, as a shared folder gives them."""
    first, second = (Worklist(tmp_path / "data", database_url=postgres_url) for _ in range(2))
    assert first.path is None and not (tmp_path / "data" / "worklist.sqlite3").exists()
    study_id, _ = add(first, 0.7, n=3)
    assert second.studies()["id"].tolist() == [study_id] and second.volume(study_id).shape[0] == 3
    second.save_review(study_id, True, ["subdural"], [1])
    read = first.study(study_id).read
    assert read is not None and read.subtypes == ("subdural",) and read.slice_marks == (1,)
    assert first.studies()["status"].tolist() == [STATUS_HEMORRHAGE]
    first.set_identifiers(True)
    assert second.identifiers_on and second.get_meta("schema_version") == "7" and second.check() == []
    second.delete_study(study_id)
    assert len(first) == 0 and not list(first.volumes.iterdir())


def test_two_servers_writing_the_same_exams_at_once_lose_no_update(tmp_path, postgres_url):
    """Each write takes the database's write lock before it reads: two servers re-scoring the same exams at once,
    each with labels for another slice, give one row per exam holding both labels. Without the lock one server's
    look-up-then-insert fails on the one-row-per-exam index, or its slice rows replace the other's labels."""
    servers = [Worklist(tmp_path / "data", database_url=postgres_url) for _ in range(2)]
    exams = [series_of(3) for _ in range(8)]
    start = threading.Barrier(len(servers))

    def write(k: int) -> None:
        start.wait()
        for series in exams:
            labels = pd.DataFrame(1.0, index=[series.sop_uids[k]], columns=list(CLASSES))
            servers[k].add_study(series, FakePredictor().predict_series(series), labels)
            servers[k].intake_failed("same exam", "simulated", None)

    with ThreadPoolExecutor(len(servers)) as pool:
        for done in [pool.submit(write, k) for k in range(len(servers))]:
            done.result()  # raises what the thread raised
    studies = servers[0].studies()
    assert len(studies) == len(exams)
    for study_id in studies["id"]:
        truth = servers[1].slices(int(study_id))["truth"]
        assert truth.tolist()[:2] == ["csv", "csv"] and pd.isna(truth.iloc[2])
    assert servers[1].intake()["attempts"].tolist() == [2 * len(exams)]


def test_two_processes_adding_the_same_exams_on_postgresql(tmp_path, postgres_url, monkeypatch):
    """The race tests/test_exam_intake.py runs on SQLite, with both processes on one PostgreSQL database."""
    monkeypatch.setenv("ICH_DATABASE_URL", postgres_url)
    two_processes_add_the_same_exams(tmp_path)


def test_a_database_url_names_postgresql_and_never_shows_its_password(tmp_path):
    with pytest.raises(StoreError, match="must be PostgreSQL") as wrong:
        Worklist(tmp_path, database_url="mysql://ich:s3cret@db/ich")
    with pytest.raises(StoreError, match="cannot connect to the worklist database") as down:
        Worklist(tmp_path, database_url=f"postgresql://ich:s3cret@/ich?host={tmp_path}")  # no server there
    assert "s3cret" not in str(wrong.value) + str(down.value) and "***" in str(down.value)


def test_of_many_servers_claiming_the_demo_at_once_exactly_one_seeds(tmp_path, database):
    """``claim_meta`` decides in one transaction: 8 servers (their own Worklist objects, as separate processes
    have) opening a fresh store at the same instant, one of them seeds the demo."""
    from concurrent.futures import ThreadPoolExecutor

    Worklist(tmp_path)  # the tables exist before the race, as after any earlier start
    barrier = threading.Barrier(8)

    def claim(_: int) -> bool:
        store = Worklist(tmp_path)
        barrier.wait()
        return store.claim_meta("demo_seeded", "running", only_if_empty=True)

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(claim, range(8))) == [False] * 7 + [True]
    wl = Worklist(tmp_path)
    assert not wl.claim_meta("demo_seeded", "again")  # set: never claimed twice
    add(wl, 0.5)
    assert not wl.claim_meta("other", "x", only_if_empty=True) and wl.claim_meta("other", "x")
