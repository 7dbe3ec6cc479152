"""ich.jobs: scoring as jobs on procrastinate's queue in the worklist's PostgreSQL database.

One listener in queue mode (in this process), ``python -m ich worker`` processes (a tiny checkpoint) and dashboard
sessions (AppTest, each in a process of its own): exams sent and uploaded at once are each scored exactly once, a
worker killed with SIGKILL mid-exam has its job finished by another, and a database restarted mid-run loses nothing
a sender was told was stored. The job body, its idempotency, its dead letter and uploads handed to the queue are
checked in-process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import sqlalchemy as sa

from ich import dicom
from ich.cli import main
from ich.listener import QUEUE_MODE, Inbox, Listener, NotScored, score_exam
from ich.worklist import INTAKE_FAILED, INTAKE_RECEIVING, Worklist
from tests.dicom_factory import to_bytes
from tests.helpers import ROOT, FakePredictor, upload_session, zip_bytes
from tests.test_listener import send, send_as_pacs, series, wait_for

procrastinate = pytest.importorskip("procrastinate", reason="procrastinate (requirements.txt) is not installed")
from ich.jobs import (  # noqa: E402  (after the skip: imports procrastinate)
    MAX_RETRIES,
    QUEUE,
    TASK,
    ExamJobs,
    Queue,
    queue_uploads,
    uploads_queued,
)

QUIET = 0.3
STALLED_AFTER = 3  # seconds; the product's default is 30
SCORED_LINE = ": worklist id "  # ich.listener.score_exam's line per scored exam

# `python -m ich worker`, where ICH_TEST_SLOW_MARK names a file: the first exam any of the workers scores creates
# it (holding the worker's pid) and then hangs, standing in for a long inference; every other exam scores as usual.
# Test-only: the product has no such hook.
WORKER = """
import os, sys, time
from ich.inference import Predictor
mark, original = os.environ.get("ICH_TEST_SLOW_MARK"), Predictor.predict_series
def predict_series(self, series, progress=None):
    try:
        fd = os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except (TypeError, FileExistsError):
        return original(self, series, progress)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(600)
Predictor.predict_series = predict_series
from ich.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Cluster:
    """A queue-mode listener on ``port`` and the worker processes started so far (their logs beside them)."""

    worklist: Worklist
    port: int
    postgres: object
    directory: Path
    checkpoint: Path
    workers: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def start_worker(self, slow_mark: Path | None = None) -> subprocess.Popen:
        log = self.directory / f"worker-{len(self.workers)}.log"
        env = {**os.environ, "ICH_TEST_SLOW_MARK": str(slow_mark)} if slow_mark else dict(os.environ)
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, "worker", "--data-dir", str(self.directory), "--weights",
             str(self.checkpoint), "--device", "cpu", "--stalled-after", str(STALLED_AFTER)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"),
        )  # fmt: skip
        self.workers.append(worker)
        self.logs.append(log)
        return worker

    def scored_lines(self) -> list[str]:
        return [line for log in self.logs for line in log.read_text().splitlines() if SCORED_LINE in line]

    def wait_until_ready(self) -> None:
        """Every worker started has registered with the queue (torch imported, model loaded)."""

        def registered() -> int:
            with self.worklist.engine.connect() as db:
                return db.execute(sa.text("SELECT COUNT(*) FROM procrastinate_workers")).scalar_one()

        wait_for(lambda: registered() >= len([w for w in self.workers if w.poll() is None]), 60)

    def queue_empty(self) -> bool:
        """No exam job waiting or running (succeeded ones are deleted)."""
        with self.worklist.engine.connect() as db:
            return not db.execute(
                sa.text("SELECT COUNT(*) FROM procrastinate_jobs WHERE task_name = :t AND status IN ('todo', 'doing')"),
                {"t": TASK},
            ).scalar_one()


@pytest.fixture
def cluster(tmp_path, postgres_server, postgres_url, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("ICH_DATABASE_URL", postgres_url)  # the workers inherit it
    worklist = Worklist(tmp_path)
    queue = Queue(worklist)
    listener = Listener(worklist, None, Inbox(tmp_path / "inbox", QUIET), enqueue=queue.defer)
    listener.ae.maximum_associations = 20  # pynetdicom's default is 10: twenty senders at once here
    port = listener.start("127.0.0.1", 0, poll_seconds=0.05)
    found = Cluster(worklist, port, postgres_server, tmp_path, tiny_checkpoint)
    yield found
    listener.stop()
    queue.close()
    for worker in found.workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # finishes the exam it holds, then leaves
    for worker in found.workers:
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def send_all(port: int, exams: list[list]) -> tuple[list[list[int]], set[str]]:
    """Each exam over an association of its own, all at once, as PACS send (what got no answer is sent again:
    :func:`tests.test_listener.send_as_pacs`); the statuses, and the exams of which part was sent again (they
    may be scored twice: once without the part, again when it came)."""
    with ThreadPoolExecutor(len(exams)) as pool:
        results = list(pool.map(lambda exam: send_as_pacs(port, exam), exams))
    return [statuses for statuses, _ in results], {e[0].StudyInstanceUID for e, (_, r) in zip(exams, results) if r}


def rows(worklist: Worklist) -> list[tuple[str, str | None]]:
    """(study UID, updated) per worklist row: ``updated`` is set only when a row is scored again."""
    with worklist.engine.connect() as db:
        return [tuple(r) for r in db.execute(sa.text("SELECT study_uid, updated FROM studies"))]


def dashboards(cluster: Cluster, exams: list[list]) -> list[subprocess.Popen]:
    """A dashboard session per exam (the Upload page, its files chosen), each in a process of its own on the
    cluster's database and data directory, all "ready"."""
    env = dict(os.environ, ICH_DATA_DIR=str(cluster.directory), ICH_WEIGHTS=str(cluster.checkpoint), ICH_DEMO="0")
    sessions = []
    for i, datasets in enumerate(exams):
        folder = cluster.directory / f"upload-{i}"
        folder.mkdir()
        for k, ds in enumerate(datasets):
            (folder / f"{k}.dcm").write_bytes(to_bytes(ds))
        log = cluster.directory / f"session-{i}.log"
        sessions.append(upload_session(folder, "Queue for scoring", env, log))
    for i, session in enumerate(sessions):
        ready = session.stdout.readline().strip()
        assert ready == "ready", session.communicate()[0] + (cluster.directory / f"session-{i}.log").read_text()
    return sessions


@pytest.mark.slow
def test_twenty_exams_sent_and_two_uploaded_at_once_are_each_scored_exactly_once_by_two_workers(cluster):
    for _ in range(2):
        cluster.start_worker()
    uploaded = [series(3) for _ in range(2)]
    sessions = dashboards(cluster, uploaded)  # the listener's --queue puts their Upload pages in queue mode
    try:
        cluster.wait_until_ready()  # starting two torch processes on two cores is not what this measures
        exams = [series(3) for _ in range(20)]
        with ThreadPoolExecutor(1) as pool:
            sending = pool.submit(send_all, cluster.port, exams)
            for session in sessions:  # "Queue for scoring" while the senders connect
                session.stdin.write("go\n")
                session.stdin.flush()
            statuses, resent = sending.result()
            assert statuses == [[0, 0, 0]] * 20
        pages = [session.communicate(timeout=120)[0] for session in sessions]
    finally:
        for session in sessions:
            if session.poll() is None:
                session.kill()
    for page, session in zip(pages, sessions):
        assert session.returncode == 0 and "1 exam queued for scoring" in page and "could not" not in page, page
    wait_for(lambda: len(cluster.worklist) == 22, 90)
    wait_for(cluster.queue_empty, 30)
    found = rows(cluster.worklist)
    assert sorted(uid for uid, _ in found) == sorted(e[0].StudyInstanceUID for e in exams + uploaded)
    # None scored twice, but an exam that grew: part of it sent again after no answer came (see send_all).
    assert {uid for uid, updated in found if updated is not None} <= resent
    lines = cluster.scored_lines()
    assert len({line.split(SCORED_LINE)[0] for line in lines}) == 22 and 22 <= len(lines) <= 22 + len(resent)
    assert all(cluster.logs[k].read_text().count(SCORED_LINE) for k in range(2)), "one worker scored nothing"
    assert sorted(cluster.worklist.studies()["source"]) == ["dicom"] * 20 + ["upload"] * 2
    wait_for(lambda: len(cluster.worklist.intake()) == 0)
    text = "".join(log.read_text() for log in cluster.logs)
    assert not [i for i in (exams[0][0].StudyInstanceUID, exams[0][0].PatientID) if i in text]


@pytest.mark.slow
def test_a_worker_killed_mid_exam_has_its_job_finished_by_the_other(cluster, tmp_path):
    mark = tmp_path / "slow-exam-started"
    first, second = cluster.start_worker(mark), cluster.start_worker(mark)
    cluster.wait_until_ready()
    exam = series(3)
    assert send(cluster.port, exam) == [0, 0, 0]
    wait_for(mark.exists, 60)  # a worker holds the exam, hanging in its inference
    wait_for(lambda: mark.read_text() != "")
    holder = int(mark.read_text())
    victim, survivor = (first, second) if holder == first.pid else (second, first)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(10) == -signal.SIGKILL
    killed_at = time.monotonic()
    wait_for(lambda: len(cluster.worklist) == 1, 40)
    recovered = time.monotonic() - killed_at
    ((uid, updated),) = rows(cluster.worklist)
    assert uid == exam[0].StudyInstanceUID and updated is None  # scored once: the killed worker never wrote
    assert survivor.poll() is None
    log = cluster.logs[cluster.workers.index(survivor)]
    wait_for(lambda: SCORED_LINE in log.read_text(), 30)  # its line follows the row's commit (seen late under load)
    assert "stopped answering; queued again" in log.read_text()
    # stalled after 3 s of silence, found by the next recovery run (every 1 s), fetched within procrastinate's
    # 5 s polling: bounded well under the wait above
    assert recovered < 30, recovered


@pytest.mark.slow
def test_a_database_restarted_mid_run_loses_nothing_acknowledged(cluster):
    for _ in range(2):
        cluster.start_worker()
    cluster.wait_until_ready()
    before, after = [series(3) for _ in range(8)], [series(3) for _ in range(8)]
    with ThreadPoolExecutor(1) as pool:
        sending = pool.submit(send_all, cluster.port, before)
        time.sleep(0.2)  # some stored and queued, some arriving
        cluster.postgres.restart()
        statuses = sending.result()[0]
    statuses += send_all(cluster.port, after)[0]  # straight after the restart
    acknowledged = {e[0].StudyInstanceUID for e, s in zip(before + after, statuses) if s == [0, 0, 0]}
    assert len(acknowledged) == 16  # the listener answers from disk: the database is never waited for
    wait_for(lambda: {uid for uid, _ in rows(cluster.worklist)} >= acknowledged, 60)
    assert len(cluster.worklist) == 16
    assert all(w.poll() is None for w in cluster.workers)  # each lost the database and carried on


# ---------------------------------------------------------------------------- the job body, in-process


class Failing(FakePredictor):
    def predict_series(self, series, progress=None):
        raise OSError(28, "No space left on device")


def job(attempts: int, key: str) -> procrastinate.jobs.Job:
    return procrastinate.jobs.Job(
        id=1, queue=QUEUE, lock=key, queueing_lock=key, task_name=TASK, task_kwargs={"key": key}, attempts=attempts
    )


def received(tmp_path: Path, n: int = 3) -> Path:
    inbox = Inbox(tmp_path / "inbox")
    for ds in series(n):
        inbox.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, to_bytes(ds))
    (folder,) = inbox.unscored()
    return folder


def test_an_exam_scored_twice_gives_one_row_and_one_result(tmp_path):
    """A job delivered again after it finished (its worker died before acknowledging) changes nothing."""
    folder, wl, sent = received(tmp_path), Worklist(tmp_path), []
    jobs = ExamJobs(wl, FakePredictor(), tmp_path / "inbox", on_scored=[sent.append])
    jobs.run(folder.name, job(0, folder.name))
    jobs.run(folder.name, job(1, folder.name))
    assert len(wl) == 1 and len(sent) == 1 and jobs.predictor.calls == 1
    assert score_exam(wl, jobs.predictor, tmp_path / "inbox" / "discarded-by-an-admin") == []


def test_a_failing_exam_is_retried_then_left_as_a_dead_letter(tmp_path):
    folder, wl = received(tmp_path), Worklist(tmp_path)
    jobs = ExamJobs(wl, Failing(), tmp_path / "inbox")
    with pytest.raises(NotScored):  # raised for procrastinate to retry
        jobs.run(folder.name, job(0, folder.name))
    (row,) = wl.intake().itertuples()
    assert row.state == INTAKE_FAILED and row.next_try and "No space left" in row.reason
    with pytest.raises(NotScored):  # the last attempt: no next try, shown on the dashboard as failed
        jobs.run(folder.name, job(MAX_RETRIES, folder.name))
    (row,) = wl.intake().itertuples()
    assert row.attempts == 2 and row.next_try is None
    assert row.reason.startswith(f"gave up after {MAX_RETRIES + 1} attempts: ")
    assert len(wl) == 0 and folder.is_dir()  # nothing received is lost


# ---------------------------------------------------------------------------- uploads handed to the queue


def test_uploads_are_stored_as_the_listener_stores_and_queued_once_per_exam(tmp_path):
    plain, zipped = series(3), series(4)
    uploads = [dicom.Upload(f"{i}.dcm", to_bytes(ds)) for i, ds in enumerate(plain)]
    uploads.append(dicom.Upload("exam.zip", zip_bytes({f"CT/{i}.dcm": to_bytes(ds) for i, ds in enumerate(zipped)})))
    uploads.append(dicom.Upload("broken.dcm", b"\0" * 50))
    uploads.append(dicom.Upload("bomb.zip", zip_bytes({"x.dcm": bytes(1 << 20)})))  # inflates 1000x: refused
    wl, inbox, deferred = Worklist(tmp_path), Inbox(tmp_path / "inbox"), []
    report = queue_uploads(wl, inbox, uploads, deferred.append)
    keys = [inbox.folder(e[0].StudyInstanceUID).name for e in (plain, zipped)]
    assert report.queued == deferred == keys  # one job per exam, once all its files are stored
    assert [p.path for p in report.problems] == ["broken.dcm", "bomb.zip"]
    assert "zip bomb suspected" in report.problems[1].reason
    received = Inbox(tmp_path / "received")  # the same instances as a listener stores them
    for ds in plain + zipped:
        received.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, to_bytes(ds))
    layout = sorted(p.relative_to(inbox.root).as_posix() for p in inbox.root.rglob("*.dcm"))
    assert layout == sorted(p.relative_to(received.root).as_posix() for p in received.root.rglob("*.dcm"))
    assert not [uid for uid in (plain[0].StudyInstanceUID, plain[0].SOPInstanceUID) if uid in "".join(layout)]
    pending = wl.intake()  # shown as arriving until a worker scores them
    assert sorted(pending["key"]) == sorted(keys) and set(pending["state"]) == {INTAKE_RECEIVING}
    jobs = ExamJobs(wl, FakePredictor(), tmp_path / "inbox")
    for key in deferred:
        jobs.run(key, job(0, key))
    assert sorted(wl.studies()["n_slices"]) == [3, 4] and set(wl.studies()["source"]) == {"upload"}
    assert len(wl.intake()) == 0


def test_a_queued_upload_lists_its_structured_reports_with_the_exam_as_an_inline_upload_does(tmp_path):
    from pydicom.uid import generate_uid
    from pynetdicom.sop_class import XRayRadiationDoseSRStorage  # type: ignore[attr-defined]

    from tests.dicom_factory import make_non_image

    images = series(3)
    dose = make_non_image(XRayRadiationDoseSRStorage, "SR", study_uid=images[0].StudyInstanceUID, SeriesNumber=997,
                          SeriesDescription="Dose Report")  # fmt: skip
    alone = make_non_image(XRayRadiationDoseSRStorage, "SR", study_uid=generate_uid())  # no images of its exam
    uploads = [dicom.Upload(f"{i}.dcm", to_bytes(ds)) for i, ds in enumerate(images)]
    uploads += [dicom.Upload("dose.dcm", to_bytes(dose)), dicom.Upload("alone.dcm", to_bytes(alone))]
    wl, inbox, deferred = Worklist(tmp_path), Inbox(tmp_path / "inbox"), []
    report = queue_uploads(wl, inbox, uploads, deferred.append)
    assert [p.path for p in report.problems] == ["alone.dcm"] and len(deferred) == 1
    ExamJobs(wl, FakePredictor(), tmp_path / "inbox").run(deferred[0], job(0, deferred[0]))
    (study_id,) = wl.studies()["id"]
    listed = [(c.number, c.scored, c.reason) for c in wl.study(int(study_id)).exam_series]
    assert listed[1:] == [(997, False, "not a CT image (modality SR, X-Ray Radiation Dose SR Storage)")]


def test_an_upload_the_queue_refuses_is_a_problem_line_not_an_error(tmp_path):
    def down(key: str) -> None:
        raise OSError("connection refused")

    wl = Worklist(tmp_path)
    report = queue_uploads(wl, Inbox(tmp_path / "inbox"), [dicom.Upload("0.dcm", to_bytes(series(1)[0]))], down)
    assert report.queued == [] and [(p.path, p.reason) for p in report.problems] == [
        ("exam 1 of 1", "not queued (OSError): upload it again")
    ]


def test_the_listener_says_where_uploads_go(tmp_path):
    """``listen --queue`` puts the dashboards' uploads in the queue; an embedded listener takes them back. The
    queue needs PostgreSQL: on SQLite uploads are always scored by the dashboard."""
    wl = Worklist(tmp_path)
    for enqueue, mode in ((None, None), ([].append, "on"), (None, "off")):
        listener = Listener(wl, FakePredictor(), Inbox(tmp_path / "inbox"), enqueue=enqueue)
        listener.start("127.0.0.1", 0)
        listener.stop()
        assert wl.get_meta(QUEUE_MODE) == mode
    wl.set_meta(QUEUE_MODE, "on")
    assert not uploads_queued(wl)


def test_a_queue_listener_hands_over_at_restart_what_was_not_scored_and_retries_a_refused_hand_over(
    tmp_path, monkeypatch
):
    """At start a queue-mode listener queues every exam whose files differ from what was scored (received before
    a crash), not the scored ones; one the queue refuses (its database restarting) is offered again shortly."""
    import ich.listener

    monkeypatch.setattr(ich.listener, "ENQUEUE_RETRY_SECONDS", 0.2)
    inbox = Inbox(tmp_path / "inbox")
    for ds in series(2) + series(3):
        inbox.store(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, to_bytes(ds))
    done, waiting = inbox.unscored()
    Inbox.mark_scored(done, sorted(p.relative_to(done).as_posix() for p in done.rglob("*.dcm")))
    offered: list[str] = []

    def enqueue(key: str) -> None:
        offered.append(key)
        if len(offered) == 1:
            raise OSError("connection refused")

    listener = Listener(Worklist(tmp_path), None, Inbox(tmp_path / "inbox"), enqueue=enqueue)
    listener.start("127.0.0.1", 0, poll_seconds=0.05)
    try:
        wait_for(lambda: len(offered) >= 2, seconds=10)
        time.sleep(0.5)  # more retries than the one needed would show here
    finally:
        listener.stop()
    assert offered == [waiting.name, waiting.name]  # refused once, then taken; the scored exam never offered


def test_queue_mode_needs_postgresql(tmp_path, capsys):
    assert main(["listen", "--queue", "--data-dir", str(tmp_path), "--port", "0"]) == 2
    assert main(["worker", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("PostgreSQL (set ICH_DATABASE_URL)") == 2
