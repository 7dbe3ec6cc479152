"""Scoring as jobs on a queue: procrastinate, on the worklist's own PostgreSQL database.

``ich listen --queue`` only receives and stores: once an exam is quiet it defers one job, "score exam <inbox
key>" (:class:`Queue`). ``ich worker`` processes, any number, on any machine that reaches the database and
shares the data directory, run those jobs (:func:`work`) through :func:`ich.listener.score_exam`, the
listener's own per-exam scoring, so the embedded default (the listener's in-process pool) and the queue run
the same code. Why procrastinate, and what is guaranteed: docs/ARCHITECTURE.md, "The scoring queue".

- At least once: a job is acknowledged only after its exam is on the worklist and marked scored; a job run
  again (its worker died before acknowledging) finds the exam scored with the same files and does nothing.
- One exam at a time: the exam key is each job's lock (never two of its jobs running) and queueing lock (at
  most one waiting: deferring an exam already waiting adds nothing; its job reads the folder when it runs).
- Retries: a failure (a full disk, a model error) is retried :data:`MAX_RETRIES` times, waiting
  ``RETRY_BASE_SECONDS ** attempt`` (5 s, 25 s, 2 min, 10 min, 52 min); each failed attempt is written to the
  intake table ("failed", the reason, the next try). After the last the exam stays there with no next try,
  its reason starting "gave up after": the dead letter the dashboard lists, until more of the exam arrives,
  the listener restarts, or an admin removes it.
- A worker that dies (SIGKILL, a power cut) stops its heartbeat; a job it held is put back in the queue by
  another worker once the heartbeat is ``stalled_after`` seconds old (procrastinate's stalled-job API run as a
  periodic job, one at a time).

Uploads follow the listener (:func:`uploads_queued`): where it queues, a dashboard's Upload page stores the files
in the inbox as the listener stores instances and defers one job per exam (:func:`queue_uploads`).

procrastinate is imported here only, when a queue is used: the embedded default never needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ich import dicom
from ich.listener import QUEUE_MODE, Inbox, NotScored, score_exam
from ich.worklist import Worklist
from ich.worklist.intake import Scorer
from ich.worklist.store import advisory_key

if TYPE_CHECKING:
    import procrastinate
    from procrastinate.jobs import Job

__all__ = [
    "MAX_RETRIES",
    "QUEUE",
    "STALLED_AFTER_SECONDS",
    "TASK",
    "ExamJobs",
    "Queue",
    "QueuedUploads",
    "conninfo",
    "queue_uploads",
    "upload_to_queue",
    "uploads_queued",
    "work",
]

log = logging.getLogger(__name__)

QUEUE = "ich-scoring"
TASK = "ich.score_exam"
RECOVERY_TASK = "ich.retry_stalled_jobs"
MAX_RETRIES = 5  # then the exam is a dead letter: "failed" with no next try
RETRY_BASE_SECONDS = 5  # procrastinate's exponential wait: 5 ** (attempt + 1) s
STALLED_AFTER_SECONDS = 30.0  # procrastinate's default: a worker silent this long is taken for dead
RESTART_SECONDS = 5.0  # a worker stopped by a lost database starts again after this
_CONTEXT = "ich_exam_jobs"  # the worker's additional_context key for its ExamJobs
_SCHEMA_LOCK = advisory_key("ich.jobs schema")


def conninfo(worklist: Worklist) -> str:
    """The libpq URI of the worklist's PostgreSQL database: the queue's tables live beside the worklist's."""
    if worklist.path is not None:
        raise ValueError("the scoring queue needs the worklist on PostgreSQL: set ICH_DATABASE_URL")
    return worklist.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)


def ensure_schema(info: str) -> None:
    """Create procrastinate's tables on first use, one process at a time (a listener and workers start together)."""
    import psycopg
    from procrastinate.schema import SchemaManager

    with psycopg.connect(info) as db:  # one transaction, committed on leaving
        db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        found = db.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
        if found is None or found[0] is None:
            db.execute(SchemaManager.get_schema())


def _retry_strategy() -> procrastinate.RetryStrategy:
    import procrastinate

    return procrastinate.RetryStrategy(max_attempts=MAX_RETRIES, exponential_wait=RETRY_BASE_SECONDS)


def _app(connector: procrastinate.BaseConnector, stalled_after: float = STALLED_AFTER_SECONDS) -> procrastinate.App:
    """The procrastinate app with ich's two tasks: scoring an exam, and putting back the jobs of dead workers."""
    import procrastinate
    from procrastinate import exceptions
    from procrastinate.jobs import Status

    app = procrastinate.App(connector=connector)

    @app.task(name=TASK, queue=QUEUE, pass_context=True, retry=_retry_strategy())
    def score(context: procrastinate.JobContext, key: str) -> None:
        context.additional_context[_CONTEXT].run(key, context.job)

    # procrastinate's documented recovery (a periodic job calling get_stalled_jobs / retry_job), its lock making
    # it one run at a time across workers, its priority putting it before the exams waiting.
    @app.periodic(cron=f"* * * * * */{max(1, round(stalled_after / 3))}", periodic_id="stalled")
    @app.task(name=RECOVERY_TASK, queue=QUEUE, priority=1, lock=RECOVERY_TASK, queueing_lock=RECOVERY_TASK)
    async def retry_stalled_jobs(timestamp: int) -> None:
        stalled = await app.job_manager.get_stalled_jobs(
            queue=QUEUE, task_name=TASK, seconds_since_heartbeat=stalled_after
        )
        for job in stalled:
            log.warning("job %s (exam %s): its worker stopped answering; queued again", job.id, job.task_kwargs["key"])
            try:
                await app.job_manager.retry_job(job)
            except exceptions.UniqueViolation:  # the exam has a job waiting already: that one scores it
                await app.job_manager.finish_job(job, status=Status.FAILED, delete_job=True)

    return app


class Queue:
    """The listener's and the Upload page's end of the queue: defers "score exam <key>" jobs."""

    def __init__(self, worklist: Worklist) -> None:
        import procrastinate

        info = conninfo(worklist)
        ensure_schema(info)
        # procrastinate's pool checks each connection before use: after a database restart the next defer reconnects.
        self.app = _app(procrastinate.SyncPsycopgConnector(conninfo=info, min_size=1, max_size=2)).open()

    def defer(self, key: str) -> None:
        """Queue the exam ``key`` (its inbox folder's name); one already waiting is left as it is."""
        from procrastinate import exceptions

        with contextlib.suppress(exceptions.AlreadyEnqueued):  # its job reads the exam's files when it runs
            self.app.configure_task(TASK, lock=key, queueing_lock=key).defer(key=key)

    def close(self) -> None:
        self.app.close()


def uploads_queued(worklist: Worklist) -> bool:
    """Whether uploads go to the queue: the worklist is on PostgreSQL and its listener last started with
    ``--queue`` (:data:`ich.listener.QUEUE_MODE`). The database says it, not each dashboard's settings, so no
    dashboard can score uploads itself while the deployment's workers score the rest, or queue them where none run."""
    return worklist.path is None and worklist.get_meta(QUEUE_MODE) == "on"


@dataclass
class QueuedUploads:
    """What an upload handed to the queue did: its exams queued (inbox keys), files or exams that could not be used."""

    queued: list[str] = field(default_factory=list)
    problems: list[dicom.Problem] = field(default_factory=list)


def _uids(upload: dicom.Upload) -> tuple[str, str, str]:
    """(study, series, SOP instance UID) of an uploaded file, read by :mod:`ich.dicom` without its pixels, so it
    refuses what an inline upload refuses (not a CT image, a lying header, a Deflated bomb); :class:`DicomError`."""
    slices = dicom.read_file(upload, pixels=False)
    first = slices[0]
    if not first.study_uid:
        raise dicom.DicomError(upload.name, "no StudyInstanceUID, so no exam to queue it in")
    sop = first.sop_uid.removesuffix("[1]") if len(slices) > 1 else first.sop_uid  # the reader names frames
    return first.study_uid, first.series_uid, sop


def queue_uploads(
    worklist: Worklist, inbox: Inbox, uploads: Sequence[dicom.Upload], defer: Callable[[str], object]
) -> QueuedUploads:
    """Store uploaded files (a zip's members too, under :mod:`ich.dicom`'s size and bomb limits) in ``inbox`` as the
    listener stores received instances, then show each exam as "receiving" and ``defer`` its key, once all its files
    are there. A file that cannot be read is a problem line; an exam with a file that could not be stored (a full
    disk) is not queued (a problem line: it would be scored on part of its slices)."""
    report = QueuedUploads()
    exams: dict[str, str] = {}  # study UID -> inbox key, in upload order
    broken: set[str] = set()
    others: dict[str, list[dicom.Problem]] = {}  # study UID -> files not CT images (a dose SR): listed with the exam
    for item in dicom.iter_sources(uploads):
        if isinstance(item, dicom.Problem):
            report.problems.append(item)
            continue
        assert isinstance(item, dicom.Upload)  # uploads and their zips' members: never paths
        try:
            uids = _uids(item)
        except dicom.DicomError as exc:
            problem = dicom.Problem(exc.path, exc.reason, exc.other)
            if exc.other:
                others.setdefault(exc.other.study_uid, []).append(problem)
            else:
                report.problems.append(problem)
            continue
        exams.setdefault(uids[0], inbox.folder(uids[0]).name)
        try:
            inbox.store(*uids, item.data)
        except OSError as exc:
            report.problems.append(dicom.Problem(item.name, f"could not be stored: {exc.strerror or exc}"))
            broken.add(uids[0])
    for study_uid, problems in others.items():  # after the images: an SR alone has no exam to be listed with
        listed = study_uid in exams
        if listed:
            try:
                inbox.set_aside(study_uid, [p.other for p in problems if p.other])
            except OSError:  # a full disk: only the series list would miss them, so they stay problem lines
                listed = False
        if not listed:
            report.problems += problems
    for n, (uid, key) in enumerate(exams.items(), 1):
        place = f"exam {n} of {len(exams)}"  # never an identifier
        if uid in broken:
            report.problems.append(dicom.Problem(place, "not queued: one of its files was not stored; upload it again"))
            continue
        try:
            worklist.note_receiving(key, "upload", uid)
            defer(key)
        except Exception as exc:  # noqa: BLE001 - the database unreachable: its files wait in the inbox
            log.warning("uploaded exam %s could not be queued (%s)", key, type(exc).__name__)
            report.problems.append(dicom.Problem(place, f"not queued ({type(exc).__name__}): upload it again"))
            continue
        report.queued.append(key)
    return report


def upload_to_queue(worklist: Worklist, directory: Path, uploads: Sequence[dicom.Upload]) -> QueuedUploads:
    """The Upload page's end of the queue: :func:`queue_uploads` into ``directory``'s inbox, the one the listener
    and the workers share, through a :class:`Queue` opened for this upload only."""
    queue = Queue(worklist)
    try:
        return queue_uploads(worklist, Inbox(Path(directory) / "inbox"), uploads, queue.defer)
    finally:
        queue.close()


class ExamJobs:
    """What a worker's jobs score with: the store, the model, the inbox, and what runs after each exam."""

    def __init__(
        self,
        worklist: Worklist,
        predictor: Scorer,
        inbox: Path,
        on_scored: Sequence[Callable[[int], object]] = (),
    ) -> None:
        self.worklist, self.predictor, self.inbox, self.on_scored = worklist, predictor, Path(inbox), on_scored

    def run(self, key: str, job: Job) -> None:
        """One job: :func:`score_exam` of the inbox folder ``key``. A failure is written to the intake table, with
        its next try (procrastinate's retry decision) or none once the retries are spent, and raised for the
        queue to retry; an exam with nothing to score waits for more instances, as in the listener."""
        folder = self.inbox / Path(key).name
        try:
            score_exam(self.worklist, self.predictor, folder, self.on_scored)
        except Exception as exc:
            reason, retry = (
                (exc.reason, exc.retry) if isinstance(exc, NotScored) else (f"{type(exc).__name__}: {exc}", True)
            )
            decision = _retry_strategy().get_retry_decision(exception=exc, job=job) if retry else None
            if retry and decision is None:
                reason = f"gave up after {job.attempts + 1} attempts: {reason}"
            try:
                self.worklist.intake_failed(folder.name, reason, decision.retry_at if decision else None)
            except Exception:  # the store itself failing (the database restarting): the queue still retries
                log.exception("could not record a failed exam")
            then = "waiting for more instances" if not retry else "next try queued" if decision else "no more tries"
            log.warning("exam %s: not on the worklist (%s); %s", folder.name, reason, then)
            if retry:
                raise


def work(jobs: ExamJobs, concurrency: int = 1, stalled_after: float = STALLED_AFTER_SECONDS) -> None:
    """Run jobs of the scoring queue until SIGTERM or SIGINT (the exams being scored are finished first):
    ``concurrency`` at once, each in a thread of its own; a heartbeat every ``stalled_after / 3`` s. procrastinate's
    worker stops when the database goes away (its heartbeat fails); it is started again, as a new worker, until
    a signal stops this one (a job it held is recovered as a dead worker's)."""
    asyncio.run(_serve(jobs, concurrency, stalled_after))


async def _serve(jobs: ExamJobs, concurrency: int, stalled_after: float) -> None:
    import procrastinate

    info = conninfo(jobs.worklist)
    ensure_schema(info)
    app = _app(procrastinate.PsycopgConnector(conninfo=info, min_size=1, max_size=concurrency + 3), stalled_after)
    stopping = asyncio.Event()
    running: list[asyncio.Task[Any]] = []

    def stop() -> None:
        stopping.set()
        for task in running:  # procrastinate's worker, cancelled, waits for the jobs it runs
            task.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    async with app.open_async():
        while not stopping.is_set():
            task = asyncio.create_task(
                app.run_worker_async(
                    queues=[QUEUE],
                    concurrency=concurrency,
                    name="ich-worker",
                    additional_context={_CONTEXT: jobs},
                    install_signal_handlers=False,  # stop() above: a signal must not look like a lost database
                    update_heartbeat_interval=stalled_after / 3,
                    stalled_worker_timeout=stalled_after,
                    delete_jobs="successful",  # the worklist is the record; failed jobs stay for inspection
                )
            )
            running[:] = [task]
            try:
                await task
            except asyncio.CancelledError:
                if not stopping.is_set():
                    raise
            except Exception as exc:  # noqa: BLE001 - whatever stopped it, the loop decides
                log.error("the worker stopped (%s: %s)", type(exc).__name__, exc)
            if not stopping.is_set():
                log.warning("the worker stopped (the database unreachable?); starting again in %.0f s", RESTART_SECONDS)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), RESTART_SECONDS)
