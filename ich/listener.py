"""DICOM listener: a Storage SCP (pynetdicom) that puts exams pushed by a scanner or PACS on the worklist.

    python -m ich listen --port 11112 --ae-title ICH --allow PACS,CT1

- Accepts every storage SOP class (a CT head exam also holds secondary captures, dose reports,
  structured reports...) and C-ECHO, so the sender sees success for a whole exam; stores only CT and
  Enhanced CT images and logs what it set aside (SOP class names and counts). What it set aside is still
  listed with the exam's series, with why it was not scored (:func:`ich.exam.set_aside`): each such series'
  number, description, modality, SOP class and instance count are kept in ``set_aside.json`` beside the exam's
  files (no identifier). Calling AE titles not on
  ``--allow`` (when given) and a called AE title other than its own are refused. Every transfer syntax
  is accepted but Deflated Explicit VR Little Endian: pynetdicom would inflate such a dataset whole, with no
  limit, on receipt (a few MB can become gigabytes); a sender falls back to another, and one offering
  nothing else is refused with a log line naming the SOP class and the syntax.
- Each CT instance is written as received (no decoding) under ``<data dir>/inbox/<exam key>/<series
  key>/``; the keys are hashes, so no UID or name appears in a path. A repeated SOP instance is ignored.
  An instance set aside for an exam already scored (a dose report sent after the images) is added to its
  series list; the exam is not scored again and no replacement result goes to PACS (its images are the same).
- Each C-STORE is answered once its bytes are on disk, never after waiting for the database (a dashboard
  or worker holding SQLite's write lock must not make a sender time out).
- While an exam arrives it shows as "receiving" (:meth:`ich.worklist.Worklist.intake`). It is scored once
  every association that delivered some of it has closed and no instance has arrived for ``quiet_seconds``
  since (a sender pausing mid-exam does not get it scored on part of its slices), through the same :func:`ich.worklist.ingest` as an
  upload: one worklist row per exam, on the series :func:`ich.exam.choose_series` picks (a corrupt
  instance is a problem line, the rest scores). An exam that grows later is scored again and its row updated.
- Exams are scored side by side by a pool of workers, as many as the cores hold one inference each
  (:func:`scoring_workers`), so one long exam does not hold the next back; of the exams waiting, the one
  whose first instance arrived first goes next. One exam is never scored by two workers at once.
- Queue mode (``ich listen --queue``, PostgreSQL): the listener only receives and stores; each exam due is
  handed to the queue (:mod:`ich.jobs`) and ``ich worker`` processes score it through the same
  :func:`score_exam`, with the queue's retries instead of the in-process ones. The listener records its mode in
  the database (:data:`QUEUE_MODE`): in queue mode the dashboards queue uploads too (:func:`ich.jobs.uploads_queued`).
- Nothing received is lost: an exam is marked done (``scored.json`` beside its files) only once it is on
  the worklist. One that fails (a full disk, a model error) stays in the inbox, shows as "failed" with the
  reason and is tried again after 30 s, 1 min, 2 min... (at most hourly); one with no series to score
  (a scout alone) waits for more instances. After a crash or restart every exam whose files differ from
  its record is scored again.
- Logs: one line per association and per scored exam, never a patient identifier.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import queue
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from ich import results
from ich.dicom import OtherObject, other_object
from ich.exam import SeriesChoice
from ich.exam import set_aside as set_aside_choice
from ich.files import atomic_write, private_dir
from ich.worklist import Worklist, ingest
from ich.worklist.intake import Scorer

__all__ = [
    "DEFAULT_AE_TITLE",
    "DEFAULT_PORT",
    "QUEUE_MODE",
    "SCORED_SOP_CLASSES",
    "Inbox",
    "Listener",
    "NotScored",
    "SendResults",
    "retry_delay",
    "score_exam",
    "scoring_workers",
]

log = logging.getLogger(__name__)

SCORED_SOP_CLASSES = (CTImageStorage, EnhancedCTImageStorage)  # stored and scored; other storage classes set aside
# Deflated is left out: pynetdicom inflates a deflated dataset whole, unbounded, as soon as it is read.
TRANSFER_SYNTAXES = [uid for uid in ALL_TRANSFER_SYNTAXES if not UID(uid).is_deflated]
SYNTAX_NOT_SUPPORTED = 0x04  # A-ASSOCIATE-AC presentation context result (PS3.8 9.3.3.2)
DEFAULT_PORT = 11112  # the registered DICOM port; 104 needs root
DEFAULT_AE_TITLE = "ICH"
DEFAULT_QUIET_SECONDS = 10.0
RETRY_SECONDS = 30.0  # the first retry of a failed exam; each further one waits twice as long
MAX_RETRY_SECONDS = 3600.0
ENQUEUE_RETRY_SECONDS = 5.0  # queue mode: an exam the queue refused (its database restarting) is offered again
MAX_SCORING_WORKERS = 4  # each holds one exam's decoded slices (a thin 238-slice series: ~250 MB as float32)
SCORED = "scored.json"
SET_ASIDE = "set_aside.json"  # the exam's series received but not stored, by a hash of their UIDs (no identifier)
# The worklist's meta key saying where this deployment scores: "on" while its listener hands exams to the queue
# (``ich listen --queue``), so every dashboard on the database queues uploads too; "off" once it scores itself.
QUEUE_MODE = "scoring_queue"
# C-STORE statuses (PS3.4 Annex B.2.3)
SUCCESS = 0x0000
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700


def scoring_workers(threads_per_exam: int, cores: int) -> int:
    """Exams scored at once: one per ``threads_per_exam`` cores (an inference's threads), at most
    :data:`MAX_SCORING_WORKERS`, at least one."""
    return max(1, min(MAX_SCORING_WORKERS, cores // max(1, threads_per_exam)))


def retry_delay(attempts: int, first: float = RETRY_SECONDS) -> float:
    """Seconds before a failed exam is tried again after its ``attempts``-th failure: ``first``, then twice as
    long each time (30 s, 1, 2, 4... min), at most :data:`MAX_RETRY_SECONDS` (the exponent capped too: an exam
    failing hourly for weeks must not overflow a float)."""
    return float(min(first * 2 ** min(max(0, attempts - 1), 64), MAX_RETRY_SECONDS))


def _cores() -> int:
    from ich.engine import cpu_threads  # here, not at the top: ich.engine imports torch

    return cpu_threads()


def _key(*uids: str) -> str:
    return hashlib.sha256("\0".join(uids).encode()).hexdigest()[:24]


class Inbox:
    """Received instances on disk, grouped by exam and series, and which exams are due for scoring."""

    def __init__(self, root: Path, quiet_seconds: float = DEFAULT_QUIET_SECONDS) -> None:
        self.root, self.quiet_seconds = Path(root), quiet_seconds
        private_dir(self.root)  # received instances carry patient identifiers
        self._lock = threading.Lock()
        self._aside_lock = threading.Lock()  # set_aside.json is read, changed and written by one thread at a time
        self._last: dict[Path, float] = {}  # exam folder -> monotonic time of its newest instance
        self._sending: Counter[Path] = Counter()  # exam folder -> open associations that delivered some of it

    def folder(self, study_uid: str) -> Path:
        """The exam's folder (its name, a hash, is the exam's key in :meth:`ich.worklist.Worklist.intake`)."""
        return self.root / _key(study_uid)

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> bool:
        """Write one instance; ``False`` (nothing written) when it is already here."""
        exam = self.folder(study_uid)
        path = exam / _key(study_uid, series_uid) / f"{_key(sop_uid)}.dcm"
        if path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
        with self._lock:
            self._last[exam] = time.monotonic()
        return True

    def set_aside(self, study_uid: str, objects: Sequence[OtherObject]) -> int:
        """Remember objects of one exam that were not stored (:func:`ich.dicom.other_object`) in the exam's
        :data:`SET_ASIDE`, under their series and SOP class, in one write: what :func:`ich.exam.set_aside` lists,
        and their instances by hash (no UID, no identifier). Returns how many were new: none when all were
        remembered already, or the exam has no folder (no image of it stored: a study that holds no CT leaves
        nothing here)."""
        exam = self.folder(study_uid)
        with self._aside_lock:
            if not exam.is_dir():
                return 0
            records, new = _set_aside(exam), 0
            for o in objects:
                what = {"number": o.number, "description": o.description, "modality": o.modality}
                record = records.setdefault(
                    _key(study_uid, o.series_uid, o.sop_class),
                    {**what, "sop_class": o.sop_class, "sop_class_name": o.sop_class_name, "instances": []},
                )
                if (instance := _key(o.sop_uid)) not in record["instances"]:
                    record["instances"].append(instance)
                    new += 1
            if new:
                atomic_write(exam / SET_ASIDE, lambda tmp: tmp.write_text(json.dumps(records, sort_keys=True)))
        return new

    @staticmethod
    def set_aside_series(folder: Path) -> list[SeriesChoice]:
        """The exam's series set aside (:meth:`set_aside`), as :func:`ich.exam.set_aside` lists them."""
        return [_aside_choice(r) for _, r in sorted(_set_aside(folder).items())]

    def hold(self, exam: Path) -> None:
        """An open association is delivering ``exam``: not due until it closes (a sender pausing mid-exam,
        longer than the quiet period, must not get the exam scored on part of its slices)."""
        with self._lock:
            self._sending[exam] += 1

    def release(self, exam: Path) -> None:
        """That association closed: the quiet period counts from now."""
        with self._lock:
            self._sending[exam] -= 1
            if self._sending[exam] <= 0:
                del self._sending[exam]
            self._last[exam] = time.monotonic()

    def discard(self, key: str) -> None:
        """Remove an exam's files (an admin gave up on a failed exam)."""
        shutil.rmtree(self.root / Path(key).name, ignore_errors=True)

    def due(self, now: float | None = None) -> list[Path]:
        """Exams quiet for ``quiet_seconds``: taken off the pending list and returned."""
        now = time.monotonic() if now is None else now
        with self._lock:
            ready = [f for f, t in self._last.items() if now - t >= self.quiet_seconds and not self._sending[f]]
            for folder in ready:
                del self._last[folder]
        return ready

    def unscored(self) -> list[Path]:
        """Exams whose files differ from what was last put on the worklist (a crash, a failure, never scored).
        A folder of an older inbox holds one series' files directly; it is read the same way."""
        return [f for f in sorted(p for p in self.root.iterdir() if p.is_dir()) if _contents(f) != _scored(f)]

    @staticmethod
    def mark_scored(folder: Path, files: Sequence[str]) -> None:
        atomic_write(folder / SCORED, lambda tmp: tmp.write_text(json.dumps(sorted(files))))


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.dcm"))


def _read_json(path: Path) -> Any:
    """A small JSON file this module wrote, or ``None`` when missing or unreadable (a crash mid-write leaves the
    old one: :func:`ich.files.atomic_write`)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _set_aside(folder: Path) -> dict[str, dict[str, Any]]:
    found = _read_json(folder / SET_ASIDE)
    return found if isinstance(found, dict) else {}


def _aside_choice(record: dict[str, Any]) -> SeriesChoice:
    number = record.get("number")
    return set_aside_choice(
        number if isinstance(number, int) else None,
        str(record.get("description") or ""),
        str(record.get("modality") or ""),
        str(record.get("sop_class") or ""),
        str(record.get("sop_class_name") or ""),
        len(record.get("instances") or ()),
    )


def _study_uid(folder: Path) -> str | None:
    """The Study Instance UID of an exam folder's images (its name is a hash), from the first file's header."""
    for path in sorted(folder.rglob("*.dcm")):
        try:
            return str(dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)
        except Exception:  # noqa: BLE001 - unreadable: the next file may say
            continue
    return None


def _contents(folder: Path) -> list[str]:
    """What the exam's folder holds, as ``scored.json`` records it: its files, and each series set aside with its
    instance count (an exam scored before any was set aside reads as before)."""
    aside = [f"{SET_ASIDE}:{key}:{len(r.get('instances', ()))}" for key, r in _set_aside(folder).items()]
    return sorted(_files(folder) + aside)


def _scored(folder: Path) -> list[str] | None:
    found = _read_json(folder / SCORED)
    return found if isinstance(found, list) else None


class NotScored(Exception):
    """An exam :func:`score_exam` could not put on the worklist: ``reason`` (no identifier), and whether trying
    again may help (a full disk, a model error) or it waits for more instances (nothing to score)."""

    def __init__(self, reason: str, retry: bool) -> None:
        super().__init__(reason)
        self.reason, self.retry = reason, retry


def score_exam(
    worklist: Worklist, predictor: Scorer, folder: Path, on_scored: Sequence[Callable[[int], object]] = ()
) -> list[int]:
    """Score one inbox exam folder onto the worklist (or update its row): its worklist ids. The one per-exam
    scoring, run by the listener's pool and by ``ich worker``'s jobs (:mod:`ich.jobs`).

    Idempotent: a folder already scored with exactly these files (a job delivered twice) or removed by an
    admin gives ``[]`` and changes nothing. ``on_scored`` (results to PACS, a webhook) runs before the exam is
    marked done (``scored.json``) and its "receiving" / "failed" line cleared, so a crash in between sends the
    results again with the next score (a replacement in PACS), never not at all. Raises :class:`NotScored`.
    """
    if not folder.is_dir():  # an admin discarded it
        return []
    files, scored = _contents(folder), _scored(folder)
    if files == scored:
        worklist.intake_done(folder.name)  # a "receiving" line left by instances that were all duplicates
        return []
    if scored is not None and _files(folder) == [f for f in scored if not f.startswith(SET_ASIDE)]:
        # Only objects set aside came since it was scored (a dose report sent minutes after the images): listed with
        # its series, not scored again, and no replacement result sent to PACS for the same images.
        study_uid = _study_uid(folder)
        if study_uid and worklist.list_set_aside(study_uid, Inbox.set_aside_series(folder)):
            log.info("exam %s: set-aside series listed, images unchanged: not scored again", folder.name)
            Inbox.mark_scored(folder, files)
            worklist.intake_done(folder.name)
            return []
    started = time.perf_counter()
    try:
        pending = worklist.intake()  # how the exam came, as noted when it started arriving: a queued upload says so
        source = next(iter(pending.loc[pending["key"] == folder.name, "source"]), "dicom")
        report = ingest(worklist, predictor, [folder], source=str(source), set_aside=Inbox.set_aside_series(folder))
    except Exception as exc:  # ingest keeps one exam's failure to a problem line; this is the store itself
        log.exception("exam %s could not be scored", folder.name)
        raise NotScored(f"{type(exc).__name__}: {exc}", retry=True) from None
    for problem in report.problems:
        log.warning("exam %s: %s", folder.name, problem.reason)
    if not report.added:
        reasons = report.failed or [p.reason for p in report.problems] or ["no readable CT image"]
        raise NotScored("; ".join(reasons), retry=bool(report.failed))
    for study_id in report.added:
        entry = worklist.study(study_id)
        log.info(
            "exam %s: worklist id %d, %d slices, likelihood %.3f%s, %.1f s",
            folder.name, study_id, entry.n_slices, entry.score or 0.0, ", FLAGGED" if entry.flagged else "",
            time.perf_counter() - started,
        )  # fmt: skip
    for study_id in report.added:
        for callback in on_scored:
            try:
                callback(study_id)
            except Exception:  # a failed webhook or PACS send must not lose the scored exam
                log.exception("after scoring worklist id %d: %s failed", study_id, type(callback).__name__)
    Inbox.mark_scored(folder, files)
    worklist.intake_done(folder.name)
    return report.added


@dataclass
class _Association:
    calling: str
    address: str
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    set_aside: Counter[str] = field(default_factory=Counter)  # SOP class name -> instances not stored
    # Instances not stored: study UID -> what each is (ich.dicom.other_object), remembered in one
    # write per exam when the association closes (by then the exam's images have come, in whatever order).
    aside: dict[str, list[OtherObject]] = field(default_factory=dict)
    exams: set[Path] = field(default_factory=set)  # exam folders it delivered to (held in the inbox until it closes)
    started: float = field(default_factory=time.monotonic)


class Listener:
    """The Storage SCP and the threads that score quiet exams onto ``worklist``, retrying failed ones; or, given
    ``enqueue``, that hand them to a queue (:mod:`ich.jobs`) for ``ich worker`` processes to score."""

    def __init__(
        self,
        worklist: Worklist,
        predictor: Scorer | None,
        inbox: Inbox,
        ae_title: str = DEFAULT_AE_TITLE,
        allow: Sequence[str] = (),
        on_scored: Sequence[Callable[[int], object]] = (),
        retry_seconds: float = RETRY_SECONDS,
        workers: int | None = None,
        enqueue: Callable[[str], object] | None = None,
    ) -> None:
        """``workers``: exams scored at once; default :func:`scoring_workers` of the predictor's ``threads``
        (a scorer that does not say is taken to use every core: one worker). ``enqueue(exam key)``: instead of
        scoring here (no predictor needed), each exam due is passed to it; one that raises (the database
        restarting) is passed again after :data:`ENQUEUE_RETRY_SECONDS`."""
        if predictor is None and enqueue is None:
            raise ValueError("a listener needs a predictor to score with, or a queue to hand exams to")
        self.worklist, self.predictor, self.inbox = worklist, predictor, inbox
        self.on_scored, self.retry_seconds, self.enqueue = on_scored, retry_seconds, enqueue
        if enqueue is not None:  # receives only: no scoring pool, and no torch import (_cores) for one
            self.workers = 0
        else:
            cores = _cores()
            self.workers = workers or scoring_workers(getattr(predictor, "threads", cores), cores)
        self.ae = AE(ae_title=ae_title)
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(str(context.abstract_syntax), TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self.ae.require_calling_aet = list(allow)
        self.ae.require_called_aet = True
        self._associations: dict[int, _Association] = {}
        # Exams shown as "receiving" by this process -> monotonic time of their first instance since scored.
        self._receiving: dict[Path, float] = {}
        # (exam, study UID) to show as "receiving": written by a thread of its own, because a C-STORE
        # handler must answer the sender at once, never wait for the database (another writer may hold it).
        self._notes: queue.SimpleQueue[tuple[Path, str] | None] = queue.SimpleQueue()
        self._notes_lock = threading.Lock()  # a note is written, or skipped, wholly before or after score() starts
        self._retry: dict[Path, float] = {}  # failed exam -> monotonic time of its next attempt
        self._attempts: dict[Path, int] = {}  # failed exam -> attempts failed in this process
        # The work queue, guarded by _queue_changed: exam due -> its arrival (the oldest goes first), and those
        # a worker holds (an exam due again meanwhile waits for it).
        self._waiting: dict[Path, float] = {}
        self._scoring: set[Path] = set()
        self._queue_changed = threading.Condition()
        self._stop = threading.Event()
        self._server: ThreadedAssociationServer | None = None
        self._threads: list[threading.Thread] = []

    # ---------------------------------------------------------------- association events

    def _on_established(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        self._associations[id(event.assoc)] = _Association(requestor.ae_title, f"{requestor.address}")
        # Every storage class is accepted: what is refused (a query, a print service...) is worth naming.
        rejected = [(c.abstract_syntax.name, c) for c in event.assoc.rejected_contexts if c.abstract_syntax]
        refused = sorted({name for name, c in rejected if c.result != SYNTAX_NOT_SUPPORTED})
        if refused:
            log.info(
                "AE %r offered %d SOP class(es) refused here: %s", requestor.ae_title, len(refused), ", ".join(refused)
            )
        syntaxes = sorted(
            f"{name} only in {', '.join(UID(t).name for t in c.transfer_syntax)}"
            for name, c in rejected
            if c.result == SYNTAX_NOT_SUPPORTED
        )
        if syntaxes:
            log.warning(
                "AE %r offered %s: no transfer syntax accepted here (Deflated is refused: inflated whole, unbounded)",
                requestor.ae_title, "; ".join(syntaxes),
            )  # fmt: skip

    def _on_rejected(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        called = str(requestor.primitive.called_ae_title) if requestor.primitive else ""
        if self.ae.require_calling_aet and requestor.ae_title.strip() not in self.ae.require_calling_aet:
            why = "calling AE title not allowed"
        elif called.strip() != self.ae.ae_title.strip():
            why = f"called AE title {called!r}, not this listener's {self.ae.ae_title!r}"
        else:
            why = "too many associations at once"
        log.warning("association from AE %r (%s) refused: %s", requestor.ae_title, requestor.address, why)

    def _on_closed(self, event: evt.Event) -> None:
        a = self._associations.pop(id(event.assoc), None)
        if a is not None:
            for study_uid, instances in a.aside.items():  # before the exams are released: scored, they list them
                self._remember(a, study_uid, instances)
            for exam in a.exams:
                self.inbox.release(exam)
            aside = ", ".join(f"{n} {name}" for name, n in sorted(a.set_aside.items()))
            log.info(
                "association from AE %r (%s): %d stored, %d duplicates ignored, %d failed%s in %.1f s",
                a.calling, a.address, a.stored, a.duplicates, a.failed,
                f", set aside (not CT images): {aside}" if aside else "", time.monotonic() - a.started,
            )  # fmt: skip

    def _on_store(self, event: evt.Event) -> int:
        counts = self._associations.get(id(event.assoc))
        try:
            ds = event.dataset
            uids = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        except Exception:  # a dataset pydicom cannot parse is the sender's problem: refuse it
            log.warning("an instance without readable study/series/instance UIDs was refused", exc_info=True)
            if counts:
                counts.failed += 1
            return CANNOT_UNDERSTAND
        sop_class = UID(str(event.request.AffectedSOPClassUID))
        if sop_class not in SCORED_SOP_CLASSES:  # part of the exam, not for the model: accepted, not kept
            other = other_object(ds, sop_class)
            if counts:
                counts.set_aside[sop_class.name] += 1
                counts.aside.setdefault(uids[0], []).append(other)
            else:
                self._remember(None, uids[0], [other])
            return SUCCESS
        try:
            new = self.inbox.store(*uids, event.encoded_dataset(include_meta=True))
        except OSError as exc:  # a full or unwritable disk: the sender keeps the instance and may retry
            log.error("could not store an instance: %s", exc.strerror or exc)
            if counts:
                counts.failed += 1
            return OUT_OF_RESOURCES
        if counts:
            counts.stored += new
            counts.duplicates += not new
        self._arrived(counts, uids[0])
        return SUCCESS

    def _arrived(self, counts: _Association | None, study_uid: str) -> None:
        """Some of an exam arrived: held until the association closes, shown as "receiving"."""
        exam = self.inbox.folder(study_uid)
        if counts and exam not in counts.exams:
            counts.exams.add(exam)
            self.inbox.hold(exam)
        if exam not in self._receiving:  # once per exam: the database is not written per instance
            self._receiving[exam] = time.monotonic()
            self._notes.put((exam, study_uid))

    def _remember(self, counts: _Association | None, study_uid: str, objects: Sequence[OtherObject]) -> None:
        """Keep instances set aside in their exam's series list; one new to an exam stored already (a dose report
        sent after the images) makes the exam due, which lists it (:func:`score_exam`: without scoring again)."""
        try:
            new = self.inbox.set_aside(study_uid, objects)
        except OSError as exc:  # only the series list misses them: the exam's images are stored
            log.error("could not note %d instance(s) set aside: %s", len(objects), exc.strerror or exc)
            return
        if new:
            self._arrived(counts, study_uid)

    def _note_loop(self) -> None:
        """Show exams as "receiving" on the worklist, off the association threads."""
        while (note := self._notes.get()) is not None:
            exam, study_uid = note
            with self._notes_lock:
                if exam not in self._receiving:  # scored meanwhile: its line would never be cleared
                    continue
                try:
                    self.worklist.note_receiving(exam.name, "dicom", study_uid)
                except Exception:  # the instance is on disk; only the "receiving" line is missing
                    log.exception("could not show an exam as receiving")

    # ---------------------------------------------------------------- scoring

    def score(self, folder: Path) -> bool:
        """Put one exam folder on the worklist (or update its row) through :func:`score_exam`; whether it was
        scored now. A failure is kept with its reason and retried with backoff, or, for an exam with nothing
        to score, when more instances come."""
        with self._notes_lock:
            self._receiving.pop(folder, None)
        with self._queue_changed:
            self._retry.pop(folder, None)
        assert self.predictor is not None  # no scoring threads run without one
        try:
            added = score_exam(self.worklist, self.predictor, folder, self.on_scored)
        except NotScored as exc:
            self._failed(folder, exc.reason, exc.retry)
            return False
        self._attempts.pop(folder, None)
        return bool(added)

    def _failed(self, folder: Path, reason: str, retry: bool) -> None:
        """Keep a failed exam visible with its reason, and when ``retry``, schedule its next attempt."""
        attempts = self._attempts[folder] = self._attempts.get(folder, 0) + 1
        delay = retry_delay(attempts, self.retry_seconds) if retry else None
        if delay is not None:
            with self._queue_changed:
                self._retry[folder] = time.monotonic() + delay
        try:
            next_try = None if delay is None else dt.datetime.now().astimezone() + dt.timedelta(seconds=delay)
            self.worklist.intake_failed(folder.name, reason, next_try)
        except Exception:  # the store itself failing (its disk full): the retry still comes
            log.exception("could not record a failed exam")
        then = "waiting for more instances" if delay is None else f"attempt {attempts} failed, next in {delay:.0f} s"
        log.warning("exam %s: not on the worklist (%s); %s", folder.name, reason, then)

    def _queue_loop(self, poll_seconds: float) -> None:
        """Queue exams as they come due: quiet ones, failed ones whose retry time has come."""
        self._queue(self.inbox.unscored())  # received before a crash or restart, or failed then
        while not self._stop.wait(poll_seconds):
            now = time.monotonic()
            with self._queue_changed:  # due retries are taken off the retry list, as inbox.due takes quiet exams
                retries = [f for f, at in self._retry.items() if at <= now]
                for folder in retries:
                    del self._retry[folder]
            self._queue(self.inbox.due(now) + retries)

    def _queue(self, folders: Sequence[Path]) -> None:
        """Add exams to the queue (queue mode: hand them to ``enqueue``); one not seen arriving here (a retry, one
        found at start) counts from now."""
        if self.enqueue is not None:
            self._hand_over(folders)
            return
        now = time.monotonic()
        with self._queue_changed:
            for folder in folders:
                self._waiting.setdefault(folder, self._receiving.get(folder, now))
            self._queue_changed.notify_all()

    def _hand_over(self, folders: Sequence[Path]) -> None:
        """Queue mode: pass exams to ``enqueue``, oldest arrival first; one refused is tried again shortly."""
        enqueue, now = self.enqueue, time.monotonic()
        assert enqueue is not None  # queue mode
        for folder in sorted(folders, key=lambda f: self._receiving.get(f, now)):
            with self._notes_lock:  # instances arriving from now on show the exam as receiving again
                self._receiving.pop(folder, None)
            try:
                enqueue(folder.name)
            except Exception as exc:  # noqa: BLE001 - the queue's database unreachable: the exam is on disk, try again
                log.warning(
                    "exam %s could not be queued (%s); trying again in %.0f s",
                    folder.name, type(exc).__name__, ENQUEUE_RETRY_SECONDS,
                )  # fmt: skip
                with self._queue_changed:
                    self._retry[folder] = time.monotonic() + ENQUEUE_RETRY_SECONDS

    def _next(self) -> Path | None:
        """Claim the oldest waiting exam that no worker holds, waiting for one; ``None`` once stopped."""
        with self._queue_changed:
            while not self._stop.is_set():
                free = [f for f in self._waiting if f not in self._scoring]
                if free:
                    folder = min(free, key=self._waiting.__getitem__)
                    del self._waiting[folder]
                    self._scoring.add(folder)
                    return folder
                self._queue_changed.wait()
        return None

    def _work(self) -> None:
        while (folder := self._next()) is not None:
            try:
                self.score(folder)
            except Exception:  # one exam must not stop the listener; it stays unscored and is retried at restart
                log.exception("exam %s could not be scored", folder.name)
            finally:
                with self._queue_changed:
                    self._scoring.discard(folder)
                    self._queue_changed.notify_all()

    # ---------------------------------------------------------------- lifecycle

    def start(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, poll_seconds: float = 0.5) -> int:
        """Start listening (port 0: any free port) and scoring in the background; returns the port."""
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        self._declare_mode()
        server = self._server = self.ae.start_server((host, port), block=False, evt_handlers=handlers)
        assert server is not None  # block=False always returns the server
        bound = int(server.server_address[1])
        self._threads = [
            threading.Thread(target=self._queue_loop, args=(poll_seconds,), name="ich-queue", daemon=True),
            threading.Thread(target=self._note_loop, name="ich-receiving", daemon=True),
        ]
        self._threads += [
            threading.Thread(target=self._work, name=f"ich-scorer-{i}", daemon=True) for i in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()
        how = "queueing exams for ich worker" if self.enqueue else f"scoring up to {self.workers} exam(s) at once"
        log.info("listening as AE %r on %s:%d, %s", self.ae.ae_title, host, bound, how)
        return bound

    def _declare_mode(self) -> None:
        """Record where this deployment scores (:data:`QUEUE_MODE`), read by the dashboards' Upload page: the
        listener is the one process whose mode defines it. Written only when it changes (an embedded listener on a
        store that never had a queue writes nothing)."""
        wanted, found = ("on" if self.enqueue is not None else "off"), self.worklist.get_meta(QUEUE_MODE)
        if found != wanted and (found is not None or self.enqueue is not None):
            self.worklist.set_meta(QUEUE_MODE, wanted)

    def stop(self) -> None:
        """Stop listening; each worker finishes the exam it holds (those waiting are found again at start)."""
        self._stop.set()
        self._notes.put(None)
        with self._queue_changed:
            self._queue_changed.notify_all()
        if self._server is not None:
            self._server.shutdown()
        for thread in self._threads:
            thread.join()


class SendResults:
    """``on_scored`` callback: the SR and key image of a scored exam (:func:`ich.results.study_objects`),
    C-STORE'd to ``destination`` (AE@host:port) as ``calling_ae`` (the listener's AE title: PACS knows one node).

    Once PACS has accepted both (status 0x0000 each) the send is recorded (:func:`ich.results.record_sent`), so
    the exam's next results replace them; after a refused or failed send nothing is recorded and the next
    send replaces the last accepted results again. ``heatmap(hu)`` gives the key image's overlay (e.g.
    Grad-CAM of "any"); without it the slice is plain.
    """

    def __init__(
        self,
        worklist: Worklist,
        destination: str,
        heatmap: Callable[[np.ndarray], np.ndarray] | None = None,
        aggregation: str = "",
        calling_ae: str = DEFAULT_AE_TITLE,
    ) -> None:
        results.parse_destination(destination)  # refuse a malformed destination at start, not at the first study
        self.worklist, self.destination, self.calling_ae = worklist, destination, calling_ae
        self.heatmap, self.aggregation = heatmap, aggregation

    def objects(self, study_id: int) -> list[Dataset]:
        """``[SR, secondary capture]`` for one worklist entry, replacing what PACS last accepted for its exam."""
        return results.study_objects(self.worklist, study_id, self.heatmap, self.aggregation)

    def __call__(self, study_id: int) -> list[int]:
        report, key = self.objects(study_id)
        statuses = results.send([report, key], self.destination, self.calling_ae)
        if all(status == SUCCESS for status in statuses):
            results.record_sent(self.worklist, report, key)
        else:
            log.warning(
                "worklist id %d: PACS refused a result object (statuses %s); nothing recorded", study_id, statuses
            )
        return statuses
