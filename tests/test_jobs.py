"""ich.jobs: scoring as jobs on procrastinate's queue in the worklist's PostgreSQL database.

One listener in queue mode (in this process) and ``python -m ich worker`` processes (a tiny checkpoint): exams sent
at once are each scored exactly once, a worker killed with SIGKILL mid-exam has its job finished by another, and a
database restarted mid-run loses nothing a sender was told was stored. The job body, its idempotency and its dead
letter are checked in-process.
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

from ich.cli import main
from ich.listener import Inbox, Listener, NotScored, score_exam
from ich.worklist import INTAKE_FAILED, Worklist
from tests.dicom_factory import to_bytes
from tests.helpers import ROOT, FakePredictor
from tests.test_listener import send, series, wait_for

procrastinate = pytest.importorskip("procrastinate", reason="procrastinate (requirements.txt) is not installed")
from ich.jobs import MAX_RETRIES, QUEUE, TASK, ExamJobs, Queue  # noqa: E402  (after the skip: imports procrastinate)

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


def send_all(port: int, exams: list[list]) -> list[list[int]]:
    """Each exam over an association of its own, all at once."""
    with ThreadPoolExecutor(len(exams)) as pool:
        return list(pool.map(lambda exam: send(port, exam), exams))


def rows(worklist: Worklist) -> list[tuple[str, str | None]]:
    """(study UID, updated) per worklist row: ``updated`` is set only when a row is scored again."""
    with worklist.engine.connect() as db:
        return [tuple(r) for r in db.execute(sa.text("SELECT study_uid, updated FROM studies"))]


@pytest.mark.slow
def test_twenty_exams_sent_at_once_are_each_scored_exactly_once_by_two_workers(cluster):
    for _ in range(2):
        cluster.start_worker()
    cluster.wait_until_ready()  # starting two torch processes on two cores is not what this measures
    exams = [series(3) for _ in range(20)]
    assert send_all(cluster.port, exams) == [[0, 0, 0]] * 20
    wait_for(lambda: len(cluster.worklist) == 20, 90)
    wait_for(cluster.queue_empty, 30)
    found = rows(cluster.worklist)
    assert sorted(uid for uid, _ in found) == sorted(e[0].StudyInstanceUID for e in exams)
    assert [updated for _, updated in found] == [None] * 20  # none scored twice
    lines = cluster.scored_lines()
    assert len(lines) == 20 and len({line.split(SCORED_LINE)[0] for line in lines}) == 20
    assert all(cluster.logs[k].read_text().count(SCORED_LINE) for k in range(2)), "one worker scored nothing"
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
    survivor_log = cluster.logs[cluster.workers.index(survivor)].read_text()
    assert "stopped answering; queued again" in survivor_log and SCORED_LINE in survivor_log
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
        statuses = sending.result()
    statuses += send_all(cluster.port, after)  # straight after the restart
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


def test_queue_mode_needs_postgresql(tmp_path, capsys):
    assert main(["listen", "--queue", "--data-dir", str(tmp_path), "--port", "0"]) == 2
    assert main(["worker", "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("PostgreSQL (set ICH_DATABASE_URL)") == 2
