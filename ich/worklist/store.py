"""The worklist store: scored studies, their slices, volumes and radiologists' reads, kept on disk.

Everything lives in one data directory (:func:`ich.files.data_dir`: ``$ICH_DATA_DIR``, default ``.ich-data/`` in a
checkout): ``worklist.sqlite3``, ``volumes/<key>.npz`` (int16 HU, compressed, read without pickle) and
``headers/<key>.dcm`` (the scored series' first header without pixels, for the results sent back to PACS).
The exam's other CT series (bone kernel, thin, reformats, scout) are kept as volumes too, unscored, so the
viewer can switch to them (:meth:`Worklist.add_other_series`).
A :class:`Worklist` opens a new SQLite connection per call; every write is one ``BEGIN IMMEDIATE``
transaction, so one object is safely shared by every Streamlit session (thread) of a server and several
processes (dashboards, the listener) share one data directory: a look-up-then-insert cannot interleave.

The worklist holds one row per **exam** (Study Instance UID): the series the model scored (chosen by
:func:`ich.exam.choose_series`) and, as ``exam_series``, every series the exam held with why it was not
scored. A re-score writes its volume and header under new file names and switches the row to them inside
the transaction; the old files are removed only after it commits, so a failed re-score leaves the row and
its files as they were, and a delete never removes a file a re-add has just written.

Exams received but not (yet) on the worklist are kept in the ``intake`` table: "receiving" while the
listener waits for the last instance, "failed" with the reason when scoring or storing failed (they are
retried; an admin may remove them). A damaged database raises :class:`StoreError` naming the file and
what to do.

No patient identifiers are stored in the database unless an admin turns them on
(:meth:`Worklist.set_identifiers`): a study is shown as "Study 3 · 36 slices"; its DICOM UIDs are kept
to recognise a re-upload and leave the store only when an export asks for them. The header copies hold
the patient's identifiers as received (as the listener's inbox does), are read only to build results
for PACS and are deleted with their study.

One study is read back as a :class:`StudyRecord`; the listings (:meth:`Worklist.studies`,
:meth:`Worklist.slices`, :meth:`Worklist.reviews`) are tables (pandas DataFrames).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Protocol

import numpy as np
import pandas as pd
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from ich import dicom
from ich.exam import SeriesChoice
from ich.files import atomic_write, data_dir, private_dir, warn_permissions
from ich.labels import CLASSES
from ich.review import Read, read_truth

__all__ = [
    "INTAKE_FAILED",
    "INTAKE_RECEIVING",
    "STATUS_NEW",
    "STATUS_HEMORRHAGE",
    "STATUS_CLEAR",
    "STATUSES",
    "TRUTH_SOURCES",
    "data_dir",
    "SOURCES",
    "StoreError",
    "StudyRecord",
    "Worklist",
]

log = logging.getLogger(__name__)

STATUS_NEW = "new"
STATUS_HEMORRHAGE = "reviewed: hemorrhage"
STATUS_CLEAR = "reviewed: no hemorrhage"
STATUSES = (STATUS_NEW, STATUS_HEMORRHAGE, STATUS_CLEAR)
TRUTH_SOURCES = ("csv", "phantom", "review")

# 2: reviews.others_clear; 3: what the worklist shows of the exam; 4: identifiers; 5: one row per exam, intake;
# 6: the exam's other series, kept for the viewer; 7: the study rule (top_k) that scored each study
_SCHEMA_VERSION = 7
SOURCES = ("upload", "dicom", "demo")  # how a study reached the worklist
# Columns added after version 1, with their definitions: an older store gets them on open.
_ADDED_COLUMNS = {
    "studies": {
        "source": "TEXT NOT NULL DEFAULT 'upload'",
        "study_datetime": "TEXT",
        "description": "TEXT NOT NULL DEFAULT ''",
        "thickness": "REAL",
        "patient_id": "TEXT",  # stored only while identifiers are on (see Worklist.identifiers_on)
        "accession": "TEXT",
        "exam_series": "TEXT NOT NULL DEFAULT '[]'",  # every series of the exam, scored or why not (JSON)
        "header_file": "TEXT",  # the header copy's name under headers/ (NULL: stored before version 5)
        "updated": "TEXT",  # when a re-score (a late instance, a re-upload) last changed the row
        "top_k": "INTEGER",  # the k of the study score that scored it (NULL: stored before version 7)
    },
    # Version 1 reads took their marks as the complete list: their unmarked slices were clear. New
    # reads always say which (the CREATE default, 0, is never relied on).
    "reviews": {"others_clear": "INTEGER NOT NULL DEFAULT 1"},
}
STALE_PARTIAL_S = 3600.0  # a half-written volume older than this belongs to a writer that died
IDENTIFIERS_KEY = "identifiers"  # meta key: "on" while an admin has identifiers shown
_P = [f"p_{c}" for c in CLASSES]
_Y = [f"y_{c}" for c in CLASSES]
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS studies (
    id INTEGER PRIMARY KEY,
    label TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    received TEXT NOT NULL,
    n_slices INTEGER NOT NULL,
    score REAL,
    top_subtype TEXT,
    flagged INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT '{STATUS_NEW}',
    demo INTEGER NOT NULL DEFAULT 0,
    model TEXT,
    thresholds TEXT NOT NULL,
    notes TEXT NOT NULL DEFAULT '[]',
    volume TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT 'upload',
    study_datetime TEXT,
    description TEXT NOT NULL DEFAULT '',
    thickness REAL,
    patient_id TEXT,
    accession TEXT,
    exam_series TEXT NOT NULL DEFAULT '[]',
    header_file TEXT,
    updated TEXT,
    top_k INTEGER,
    UNIQUE (study_uid, series_uid)
);
CREATE TABLE IF NOT EXISTS slices (
    study_id INTEGER NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    sop_uid TEXT NOT NULL,
    {", ".join(f"{c} REAL" for c in _P + _Y)},
    truth TEXT,
    PRIMARY KEY (study_id, idx)
);
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY,
    study_id INTEGER NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
    hemorrhage INTEGER NOT NULL,
    subtypes TEXT NOT NULL,
    slice_marks TEXT NOT NULL,
    created TEXT NOT NULL,
    others_clear INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS intake (
    key TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    state TEXT NOT NULL,
    study_uid TEXT,
    first_seen TEXT NOT NULL,
    last_seen TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try TEXT,
    reason TEXT
);
CREATE TABLE IF NOT EXISTS other_series (
    study_id INTEGER NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
    series_uid TEXT NOT NULL,
    volume TEXT NOT NULL,
    n_slices INTEGER NOT NULL,
    PRIMARY KEY (study_id, series_uid)
);
PRAGMA user_version = {_SCHEMA_VERSION}
"""
# One row per exam. Stores from before version 5 may hold several series rows of one exam: they keep them
# (the latest is updated), and the index is made once they are gone.
_EXAM_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS studies_exam ON studies (study_uid)"
INTAKE_RECEIVING = "receiving"
INTAKE_FAILED = "failed"
_CORRUPT = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB: the file is damaged, not busy or misused


class StoreError(RuntimeError):
    """The worklist database cannot be used; the message names the file and what to do."""


def _damaged(path: Path, exc: sqlite3.DatabaseError) -> StoreError:
    return StoreError(
        f"{path}: the worklist database is damaged ({exc}). Stop every ich process using it, then restore the data "
        "directory from its backup (worklist.sqlite3 with its -wal file), or start with a new data directory "
        "(ICH_DATA_DIR); `python -m ich worklist --check` runs SQLite's integrity check."
    )


def _study_datetime(date: str, time: str) -> str | None:
    """DICOM StudyDate + StudyTime as ISO text (no time zone: DICOM gives none), or ``None``."""
    if not re.fullmatch(r"\d{8}", date.strip()):
        return None
    digits = re.sub(r"\D", "", time.split(".")[0])[:6].ljust(6, "0") if time.strip() else "000000"
    try:
        return dt.datetime.strptime(date.strip() + digits, "%Y%m%d%H%M%S").isoformat()
    except ValueError:  # an impossible date or time in the header
        return None


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _new_name(kind: str, study_uid: str, series_uid: str, suffix: str) -> str:
    """A new file name for a series' volume or header copy: a hash, so UIDs never appear in paths, and a
    random part, so a re-score never overwrites a file the row still names (it switches to the new one on commit)."""
    digest = hashlib.sha256(f"{kind}\0{study_uid}\0{series_uid}".encode()).hexdigest()[:20]
    return f"{digest}-{secrets.token_hex(4)}{suffix}"


def _header_key(study_uid: str, series_uid: str) -> str:
    """File name of a header copy stored before version 5 (one per series, overwritten in place)."""
    return hashlib.sha256(f"header\0{study_uid}\0{series_uid}".encode()).hexdigest()[:20] + ".dcm"


def _write_header(path: Path, header: Dataset) -> None:
    """The first slice's header (no pixels) as a DICOM file: what results for PACS copy the patient and
    study from. Written in Explicit VR Little Endian whatever the image's transfer syntax was."""
    meta = FileMetaDataset()
    # Anonymised files (RSNA's) may lack the SOP Class UID; the reader accepted them as CT images.
    meta.MediaStorageSOPClassUID = header.get("SOPClassUID") or CTImageStorage
    meta.MediaStorageSOPInstanceUID = header.get("SOPInstanceUID", "")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    copy = Dataset(dict(header.items()))
    copy.file_meta = meta
    atomic_write(path, lambda tmp: copy.save_as(tmp, enforce_file_format=True))


def _remove_stale_partials(folder: Path, older_than_s: float = STALE_PARTIAL_S) -> None:
    """Remove temporary files a killed writer left (``atomic_write``'s ``.<name>.*.tmp``).

    Only old ones: another process sharing the store (the listener, a second server) may be writing
    one right now, and its rename must still find it.
    """
    cutoff = dt.datetime.now().timestamp() - older_than_s
    for tmp in folder.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()


def _nullable(values: np.ndarray) -> list[float | None]:
    """SQLite NULL for NaN (a class the model does not predict, a slice without a label)."""
    return [None if np.isnan(v) else float(v) for v in values]


def _write_npz(path: Path, volume: np.ndarray, affine: np.ndarray | None = None) -> None:
    """int16 HU as a standard ``.npz`` (key ``hu``, and ``affine``: voxel to patient LPS mm, when the
    headers gave one); deflate level 1 is 4x faster than numpy's default for 5 % more bytes, which keeps
    an upload within its time budget. Written then renamed."""
    arrays = {"hu": np.clip(np.rint(volume), -32768, 32767).astype(np.int16)}
    if affine is not None:
        arrays["affine"] = np.asarray(affine, np.float64)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for name, array in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)

    atomic_write(path, write)


@dataclass(frozen=True)
class StudyRecord:
    """One study as stored, with its latest read: what the viewer shows above the images."""

    id: int
    label: str  # "Study 3 · 36 slices": what a reader sees instead of identifiers
    study_uid: str
    series_uid: str
    received: str  # ISO 8601 with UTC offset, to the second; changes when the series is uploaded again
    n_slices: int
    score: float | None  # the study likelihood; None when the model gave none
    top_subtype: str | None
    flagged: bool
    status: str  # one of STATUSES
    demo: bool
    source: str  # how it came: one of SOURCES
    model: str | None  # the scoring checkpoint's name
    thresholds: Mapping[str, float]  # per class, as the scoring checkpoint had them (read-only)
    notes: tuple[str, ...]  # the series' reading notes (gaps, duplicate positions...)
    volume_file: str  # the volume's file name under ``volumes/`` (a hash, no UIDs)
    read: Read | None  # the latest radiologist's read
    # Every series of the exam: the scored one first, the others with why not.
    exam_series: tuple[SeriesChoice, ...] = ()
    updated: str | None = None  # when a re-score last changed the row (None: scored once)
    header_file: str = ""  # the header copy's file name under ``headers/`` (it may not exist: none was kept)
    top_k: int | None = None  # the k of the study score that scored it, with ``model`` and ``thresholds``

    @classmethod
    def from_rows(cls, study: sqlite3.Row, last_review: sqlite3.Row | None) -> StudyRecord:
        """Decode a ``studies`` row and the study's latest ``reviews`` row (JSON columns, 0/1 flags)."""
        return cls(
            id=int(study["id"]),
            label=study["label"],
            study_uid=study["study_uid"],
            series_uid=study["series_uid"],
            received=study["received"],
            n_slices=int(study["n_slices"]),
            score=None if study["score"] is None else float(study["score"]),
            top_subtype=study["top_subtype"],
            flagged=bool(study["flagged"]),
            status=study["status"],
            demo=bool(study["demo"]),
            source=study["source"],
            model=study["model"],
            thresholds=MappingProxyType({k: float(v) for k, v in json.loads(study["thresholds"]).items()}),
            notes=tuple(json.loads(study["notes"])),
            volume_file=study["volume"],
            exam_series=tuple(SeriesChoice(**c) for c in json.loads(study["exam_series"])),
            updated=study["updated"],
            header_file=study["header_file"] or _header_key(study["study_uid"], study["series_uid"]),
            top_k=study["top_k"],
            read=None
            if last_review is None
            else Read(
                bool(last_review["hemorrhage"]),
                tuple(json.loads(last_review["subtypes"])),
                marks := tuple(json.loads(last_review["slice_marks"])),
                last_review["created"],
                others_clear=bool(last_review["others_clear"]) and bool(marks),
            ),
        )


class _Prediction(Protocol):  # ich.inference.StudyPrediction, without importing torch here
    sop_uids: list[str]
    probs: np.ndarray
    score: float
    top_subtype: str | None
    flagged: bool


class Worklist:
    """The persistent worklist in ``directory`` (created if missing)."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = private_dir(Path(directory) if directory is not None else data_dir())  # patient data
        warn_permissions(self.directory)  # the dashboard and the listener open it at start
        self.volumes = self.directory / "volumes"
        self.volumes.mkdir(parents=True, exist_ok=True)
        self.headers = self.directory / "headers"  # one pixel-free header copy per series (see header())
        self.headers.mkdir(exist_ok=True)
        for folder in (self.volumes, self.headers):
            _remove_stale_partials(folder)
        self.path = self.directory / "worklist.sqlite3"
        self._lock = threading.Lock()
        with self._write() as db:
            for statement in _SCHEMA.split(";"):  # executescript would commit the open transaction first
                db.execute(statement)
            for table, added in _ADDED_COLUMNS.items():
                present = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
                for column, definition in added.items():
                    if column not in present:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            if db.execute("SELECT 1 FROM studies GROUP BY study_uid HAVING COUNT(*) > 1").fetchone() is None:
                db.execute(_EXAM_INDEX)
        with self._read() as db:  # readers never wait for a writer (persistent, so set once)
            db.execute("PRAGMA journal_mode = WAL")

    # ------------------------------------------------------------------ connections

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)  # transactions are explicit (_write)
        db.row_factory = sqlite3.Row
        try:
            yield db
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", None) in _CORRUPT:
                raise _damaged(self.path, exc) from None
            raise
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction: committed on success, rolled back on any error. ``BEGIN IMMEDIATE`` takes SQLite's
        write lock first, so what the transaction reads cannot change under it, whichever process writes."""
        with self._lock, self._read() as db:
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def check(self) -> list[str]:
        """SQLite's integrity check of the database: ``[]`` when it is sound, else what it found."""
        with self._read() as db:
            found = [row[0] for row in db.execute("PRAGMA integrity_check")]
        return [] if found == ["ok"] else found

    # ------------------------------------------------------------------ writing

    def add_study(
        self,
        series: dicom.Series,
        prediction: _Prediction,
        labels: pd.DataFrame | None = None,
        *,
        truth: str = "csv",
        thresholds: dict[str, float] | None = None,
        model: str | None = None,
        demo: bool = False,
        source: str = "upload",
        exam_series: Sequence[SeriesChoice] = (),
        top_k: int | None = None,
    ) -> int:
        """Store an exam's scored series (volume, slice probabilities, optional labels); returns the study id.

        ``source`` says how it came (:data:`SOURCES`; a demo study is always "demo"); ``exam_series`` every
        series of the exam with why it was or was not scored (:func:`ich.exam.choose_series`); ``model``,
        ``thresholds`` and ``top_k`` the rule that scored it, kept so captions and results use the study's own.

        ``labels`` are wide labels indexed by SOPInstanceUID (:mod:`ich.labels`). Scoring the same exam
        again (the same Study Instance UID: a late instance, a re-upload, a better series) replaces its
        scores and volume but keeps its id, status and reads, and each slice's labels unless new ones for
        that slice come; slices never labelled stay unlabelled.
        """
        if truth not in ("csv", "phantom"):  # "review" truth comes from save_review only
            raise ValueError(f"truth must be 'csv' or 'phantom', got {truth!r}")
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        probs = np.asarray(prediction.probs, dtype=np.float64)
        if probs.shape != (len(series), len(CLASSES)):
            raise ValueError(f"prediction has shape {probs.shape} for {len(series)} slices")
        key = _new_name("volume", series.study_uid, series.series_uid, ".npz")
        header = _new_name("header", series.study_uid, series.series_uid, ".dcm")
        written = [self.volumes / key]
        try:
            _write_npz(self.volumes / key, series.volume(), series.affine())
            kept = self._keep_header(series, self.headers / header)
            if kept:
                written.append(self.headers / header)
            study_id, replaced = self._upsert(
                series, prediction, labels, key, header if kept else None,
                truth=truth, thresholds=thresholds, model=model, demo=demo, source=source, exam_series=exam_series, top_k=top_k,
            )  # fmt: skip
        except BaseException:
            for path in written:  # the row still names its old files: these new ones belong to nothing
                path.unlink(missing_ok=True)
            raise
        for path in replaced:  # after the commit: nothing names them any more
            path.unlink(missing_ok=True)
        return study_id

    def add_other_series(self, study_uid: str, series: dicom.Series) -> bool:
        """Keep a series of an exam already on the worklist that the model did not score, for the viewer.

        Written under a new name and switched inside the transaction, as :meth:`add_study` does; ``False``
        (and nothing kept) when the exam is no longer on the worklist (deleted meanwhile).
        """
        key = _new_name("volume", study_uid, series.series_uid, ".npz")
        path = self.volumes / key
        try:
            _write_npz(path, series.volume(), series.affine())
            with self._write() as db:
                found = db.execute("SELECT id FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
                old = None
                if found:
                    old = db.execute(
                        "SELECT volume FROM other_series WHERE study_id = ? AND series_uid = ?",
                        (found["id"], series.series_uid),
                    ).fetchone()
                    db.execute(
                        "INSERT OR REPLACE INTO other_series (study_id, series_uid, volume, n_slices) VALUES (?, ?, ?, ?)",
                        (found["id"], series.series_uid, key, len(series)),
                    )
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if not found:
            path.unlink(missing_ok=True)
            return False
        if old:  # after the commit: nothing names it any more
            (self.volumes / old["volume"]).unlink(missing_ok=True)
        return True

    def _upsert(
        self,
        series: dicom.Series,
        prediction: _Prediction,
        labels: pd.DataFrame | None,
        key: str,
        header: str | None,
        *,
        truth: str,
        thresholds: dict[str, float] | None,
        model: str | None,
        demo: bool,
        source: str,
        exam_series: Sequence[SeriesChoice],
        top_k: int | None,
    ) -> tuple[int, list[Path]]:
        """The exam's row and slice rows in one transaction; its id and the files the row named before."""
        probs = np.asarray(prediction.probs, dtype=np.float64)
        score = None if not np.isfinite(prediction.score) else float(prediction.score)
        now = _now()
        fields = dict(
            study_uid=series.study_uid,
            series_uid=series.series_uid,
            received=now,
            n_slices=len(series),
            score=score,
            top_subtype=prediction.top_subtype,
            flagged=int(prediction.flagged),
            demo=int(demo),
            model=model,
            thresholds=json.dumps(thresholds or {}),
            notes=json.dumps(list(series.notes)),
            volume=key,
            source="demo" if demo else source,
            study_datetime=_study_datetime(series.slices[0].study_date, series.slices[0].study_time),
            description=" · ".join(
                d for d in (series.slices[0].study_description, series.slices[0].series_description) if d
            ),
            thickness=series.slices[0].thickness if series.slices[0].thickness is not None else series.spacing,
            # Identifiers reach the store only while an admin has them on; never otherwise.
            patient_id=series.slices[0].patient_id or None if self.identifiers_on else None,
            accession=series.slices[0].identifiers.get("accession_number") or None if self.identifiers_on else None,
            exam_series=json.dumps([dataclasses.asdict(c) for c in exam_series]),
            top_k=top_k,
            header_file=header,
        )
        with self._write() as db:
            # The latest row of the exam (a store from before version 5 may hold one per series).
            found = db.execute(
                "SELECT * FROM studies WHERE study_uid = ? ORDER BY id DESC LIMIT 1", (series.study_uid,)
            ).fetchone()
            # Labels a previous upload of this series brought stay where the new ones say nothing
            # (no label file, or one that does not list these slices).
            old = {
                r["sop_uid"]: r
                for r in (
                    db.execute(f"SELECT sop_uid, {', '.join(_Y)}, truth FROM slices WHERE study_id = ?", (found["id"],))
                    if found
                    else []
                )
            }
            y = np.array(
                [
                    [np.nan if sop not in old or old[sop][c] is None else old[sop][c] for c in _Y]
                    for sop in series.sop_uids
                ]
            ).reshape(len(series), len(_Y))
            sources = [old[sop]["truth"] if sop in old else None for sop in series.sop_uids]
            if labels is not None:
                new = labels.reindex(series.sop_uids)[list(CLASSES)].to_numpy(np.float64)
                given = ~np.isnan(new).all(axis=1)
                y[given] = new[given]
                sources = [truth if g else src for g, src in zip(given, sources)]
            replaced: list[Path] = []
            if found:
                study_id = found["id"]
                fields["updated"] = now
                db.execute(
                    f"UPDATE studies SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                    (*fields.values(), study_id),
                )
                db.execute("DELETE FROM slices WHERE study_id = ?", (study_id,))
                replaced = [
                    self.volumes / found["volume"],
                    self.headers / StudyRecord.from_rows(found, None).header_file,
                ]
                # A series kept for the viewer that is now the scored one: its volume is the row's own now.
                where = "FROM other_series WHERE study_id = ? AND series_uid = ?"
                replaced += [
                    self.volumes / r["volume"]
                    for r in db.execute(f"SELECT volume {where}", (study_id, series.series_uid))
                ]
                db.execute(f"DELETE {where}", (study_id, series.series_uid))
            else:
                study_id = db.execute(
                    f"INSERT INTO studies (label, {', '.join(fields)}) VALUES ('', {', '.join('?' * len(fields))})",
                    tuple(fields.values()),
                ).lastrowid
            name = "Demo" if demo else "Study"
            db.execute(
                "UPDATE studies SET label = ? WHERE id = ?", (f"{name} {study_id} · {len(series)} slices", study_id)
            )
            db.executemany(
                f"INSERT INTO slices (study_id, idx, sop_uid, {', '.join(_P + _Y)}, truth) "
                f"VALUES ({study_id}, {', '.join('?' * (len(_P) + len(_Y) + 3))})",
                [(i, sop, *_nullable(probs[i]), *_nullable(y[i]), sources[i]) for i, sop in enumerate(series.sop_uids)],
            )
        return int(study_id), [p for p in replaced if p.name not in (key, header)]

    @staticmethod
    def _keep_header(series: dicom.Series, path: Path) -> bool:
        """Keep the series' first header at ``path`` for :meth:`header`; whether one was kept. A header pydicom
        cannot write back costs only the results download (logged by type alone: its message may quote a
        patient's name); a full disk fails the series like its volume does."""
        if series.slices[0].header is None:  # read without pixels (a caller's own Series): nothing to keep
            return False
        try:
            _write_header(path, series.slices[0].header)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on values it cannot encode
            path.unlink(missing_ok=True)
            log.warning("the header of a series could not be kept (%s): no results download for it", type(exc).__name__)
            return False
        return True

    def save_review(
        self,
        study_id: int,
        hemorrhage: bool,
        subtypes: Iterable[str] = (),
        slice_marks: Iterable[int] = (),
        others_clear: bool = False,
    ) -> Read:
        """Record a radiologist's read (0-based key-slice marks); it becomes the study's "actual"."""
        marks = tuple(sorted({int(i) for i in slice_marks}))
        read = Read(bool(hemorrhage), tuple(subtypes), marks, _now(), others_clear=others_clear)
        n = self.study(study_id).n_slices
        if any(not 0 <= i < n for i in read.slice_marks):
            raise ValueError(f"slice marks must lie in 0..{n - 1}")
        with self._write() as db:
            db.execute(
                "INSERT INTO reviews (study_id, hemorrhage, subtypes, slice_marks, others_clear, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (study_id, int(read.hemorrhage), json.dumps(read.subtypes), json.dumps(read.slice_marks),
                 int(read.others_clear), read.created),
            )  # fmt: skip
            status = STATUS_HEMORRHAGE if read.hemorrhage else STATUS_CLEAR
            db.execute("UPDATE studies SET status = ? WHERE id = ?", (status, study_id))
        return read

    def delete_study(self, study_id: int) -> None:
        """Remove a study with its slices, reads, volume and header files (the rows first: a crash leaves no
        visible half). The files are the ones the row named when it was deleted: a re-add of the exam at the
        same moment writes new names, which stay."""
        with self._write() as db:
            row = db.execute("SELECT * FROM studies WHERE id = ?", (study_id,)).fetchone()
            if row is None:
                raise KeyError(f"no study {study_id} on the worklist")
            others = [
                r["volume"] for r in db.execute("SELECT volume FROM other_series WHERE study_id = ?", (study_id,))
            ]
            db.execute("DELETE FROM studies WHERE id = ?", (study_id,))  # slices, reads, other series cascade
        record = StudyRecord.from_rows(row, None)
        for name in (record.volume_file, *others):
            (self.volumes / name).unlink(missing_ok=True)
        (self.headers / record.header_file).unlink(missing_ok=True)

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    @property
    def identifiers_on(self) -> bool:
        """Whether patient ID and accession are kept and shown (to signed-in users): off unless an admin turns it on."""
        return self.get_meta(IDENTIFIERS_KEY) == "on"

    def set_identifiers(self, on: bool) -> None:
        """Turn identifiers on or off; off also erases every stored one."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (IDENTIFIERS_KEY, "on" if on else "off")
            )
            if not on:
                db.execute("UPDATE studies SET patient_id = NULL, accession = NULL")

    def identifiers(self) -> pd.DataFrame:
        """``id``, ``patient_id``, ``accession`` of every study (empty values while identifiers are off)."""
        with self._read() as db:
            return pd.read_sql_query("SELECT id, patient_id, accession FROM studies", db)

    def get_meta(self, key: str) -> str | None:
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row["value"]

    # ------------------------------------------------------------------ intake: exams received, not on the worklist yet

    def note_receiving(self, key: str, source: str, study_uid: str | None = None) -> None:
        """An exam (``key``: the receiver's name for it, no identifier) is arriving: shown as "receiving"
        until :meth:`intake_done` or :meth:`intake_failed`."""
        now = _now()
        with self._write() as db:
            db.execute(
                "INSERT INTO intake (key, source, state, study_uid, first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET state = excluded.state, last_seen = excluded.last_seen",
                (key, source, INTAKE_RECEIVING, study_uid, now, now),
            )

    def intake_failed(self, key: str, reason: str, next_try: dt.datetime | None, source: str = "dicom") -> int:
        """Scoring or storing the exam failed: kept as "failed" with ``reason`` (no identifier) and when it is
        tried again (``None``: not until more instances come); returns how many attempts failed so far."""
        now = _now()
        retry = None if next_try is None else next_try.astimezone().isoformat(timespec="seconds")
        with self._write() as db:
            db.execute(
                "INSERT INTO intake (key, source, state, first_seen, last_seen, attempts, next_try, reason)"
                " VALUES (?, ?, ?, ?, ?, 1, ?, ?) ON CONFLICT (key) DO UPDATE SET state = excluded.state,"
                " attempts = attempts + 1, next_try = excluded.next_try, reason = excluded.reason",
                (key, source, INTAKE_FAILED, now, now, retry, reason),
            )
            return int(db.execute("SELECT attempts FROM intake WHERE key = ?", (key,)).fetchone()[0])

    def intake_done(self, key: str) -> None:
        """The exam is on the worklist (or an admin removed it): no longer pending."""
        with self._write() as db:
            db.execute("DELETE FROM intake WHERE key = ?", (key,))

    def intake(self) -> pd.DataFrame:
        """Exams received and not on the worklist yet, or being updated: ``key``, ``source``, ``state``
        (receiving / failed), ``study_id`` (the worklist row a late instance will update, else NaN),
        ``first_seen``, ``last_seen``, ``attempts``, ``next_try``, ``reason``; failed ones first."""
        with self._read() as db:
            return pd.read_sql_query(
                "SELECT i.key, i.source, i.state, s.id AS study_id, i.first_seen, i.last_seen, i.attempts, i.next_try,"
                " i.reason FROM intake i LEFT JOIN studies s ON s.study_uid = i.study_uid"
                f" ORDER BY i.state != '{INTAKE_FAILED}', i.first_seen",
                db,
            )

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        with self._read() as db:
            return int(db.execute("SELECT COUNT(*) FROM studies").fetchone()[0])

    def studies(self, status: str | None = None) -> pd.DataFrame:
        """One row per study: unread first, then the most likely hemorrhage first (unscored studies last)."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        query = (
            "SELECT id, label, received, study_datetime, description, n_slices, thickness, source, score,"
            " top_subtype, flagged, status, demo, model, thresholds, top_k FROM studies"
            + (" WHERE status = ?" if status else "")
            + f" ORDER BY status != '{STATUS_NEW}', score IS NULL, score DESC, id"
        )
        with self._read() as db:
            frame = pd.read_sql_query(query, db, params=(status,) if status else None)
        local = dt.datetime.now().astimezone().tzinfo
        frame["received"] = pd.to_datetime(frame["received"], utc=True).dt.tz_convert(local).dt.tz_localize(None)
        frame["study_datetime"] = pd.to_datetime(frame["study_datetime"])  # the scanner's local time, as DICOM has it
        frame[["flagged", "demo"]] = frame[["flagged", "demo"]].astype(bool)
        return frame

    def study(self, study_id: int) -> StudyRecord:
        """One study with its latest read; ``KeyError`` when the worklist has no such study."""
        with self._read() as db:
            row = db.execute("SELECT * FROM studies WHERE id = ?", (study_id,)).fetchone()
            if row is None:
                raise KeyError(f"no study {study_id} on the worklist")
            last = db.execute(
                "SELECT * FROM reviews WHERE study_id = ? ORDER BY id DESC LIMIT 1", (study_id,)
            ).fetchone()
        return StudyRecord.from_rows(row, last)

    def slices(self, study_id: int) -> pd.DataFrame:
        """One row per slice: ``index``, ``sop_uid``, ``p_<class>``, ``y_<class>`` (the actual) and ``truth``.

        The actual comes from the latest read where that read decides the slice (see
        :func:`ich.review.read_truth`), else from the CSV or phantom labels, else it is NaN.
        """
        with self._read() as db:
            frame = pd.read_sql_query(
                f"SELECT idx AS 'index', sop_uid, {', '.join(_P + _Y)}, truth FROM slices WHERE study_id = ? ORDER BY idx",
                db,
                params=(study_id,),
            )
        frame[_P + _Y] = frame[_P + _Y].astype(np.float32)
        read = self.study(study_id).read
        if read is not None:
            reviewed = read_truth(read, len(frame))
            decided = ~np.isnan(reviewed).all(axis=1)
            frame.loc[decided, _Y] = reviewed[decided]
            frame.loc[decided, "truth"] = "review"
        return frame

    def other_series(self, study_id: int) -> dict[str, int]:
        """The exam's series kept for the viewer besides the scored one: series UID -> slices."""
        with self._read() as db:
            rows = db.execute(
                "SELECT o.series_uid, o.n_slices FROM other_series o JOIN studies s ON s.id = o.study_id"
                " WHERE o.study_id = ? AND o.series_uid != s.series_uid",
                (study_id,),
            ).fetchall()
        return {r["series_uid"]: int(r["n_slices"]) for r in rows}

    def _volume_path(self, study_id: int, series_uid: str | None) -> Path:
        record = self.study(study_id)
        if series_uid is None or series_uid == record.series_uid:
            return self.volumes / record.volume_file
        with self._read() as db:
            row = db.execute(
                "SELECT volume FROM other_series WHERE study_id = ? AND series_uid = ?", (study_id, series_uid)
            ).fetchone()
        if row is None:
            raise KeyError(f"study {study_id} keeps no such series")
        return self.volumes / row["volume"]

    def volume(self, study_id: int, series_uid: str | None = None) -> np.ndarray:
        """int16 ``(N, H, W)`` HU of the scored series, or of another series of the exam (:meth:`other_series`)."""
        with np.load(self._volume_path(study_id, series_uid), allow_pickle=False) as npz:
            return npz["hu"]

    def affine(self, study_id: int, series_uid: str | None = None) -> np.ndarray | None:
        """4x4 voxel (column, row, slice) to patient LPS mm; ``None`` for a volume stored without one."""
        with np.load(self._volume_path(study_id, series_uid), allow_pickle=False) as npz:
            return npz["affine"] if "affine" in npz.files else None

    def header(self, study_id: int) -> Dataset | None:
        """The study's first slice header as received (no pixel data; patient identifiers included, which is
        why it is only ever read for results sent to PACS), or ``None`` for a study stored before headers
        were kept. The SOPInstanceUIDs of all slices are in :meth:`slices`."""
        try:
            return dcmread(self.headers / self.study(study_id).header_file)
        except FileNotFoundError:
            return None

    def reviews(self, study_id: int) -> pd.DataFrame:
        with self._read() as db:
            return pd.read_sql_query(
                "SELECT id, hemorrhage, subtypes, slice_marks, others_clear, created FROM reviews WHERE study_id = ?"
                " ORDER BY id",
                db,
                params=(study_id,),
            )

    # ------------------------------------------------------------------ exports

    def export_csv(self, uids: bool = False) -> str:
        """The worklist with each study's latest read, as CSV text (DICOM UIDs only if ``uids``)."""
        with self._read() as db:
            frame = pd.read_sql_query(
                "SELECT s.id, s.label, s.study_uid, s.series_uid, s.received, s.n_slices, s.score, s.top_subtype,"
                " s.flagged, s.status, s.demo, s.model, r.hemorrhage AS read_hemorrhage, r.subtypes AS read_subtypes,"
                " r.slice_marks AS read_slice_marks, r.others_clear AS read_others_clear, r.created AS read_time"
                " FROM studies s LEFT JOIN reviews r"
                " ON r.id = (SELECT MAX(id) FROM reviews WHERE study_id = s.id)"
                " ORDER BY s.score IS NULL, s.score DESC, s.id",
                db,
            )
        if not uids:
            frame = frame.drop(columns=["study_uid", "series_uid"])
        # Slices are numbered from 1 wherever a person reads them (the viewer, this export).
        frame["read_slice_marks"] = [
            None if pd.isna(marks) else json.dumps([i + 1 for i in json.loads(marks)])
            for marks in frame["read_slice_marks"]
        ]
        return frame.to_csv(index=False)

    def slices_csv(self, study_id: int, uids: bool = False) -> str:
        """A study's per-slice probabilities and actuals as CSV text (1-based ``slice`` numbers)."""
        frame = self.slices(study_id)
        frame.insert(0, "slice", frame.pop("index") + 1)
        if not uids:
            frame = frame.drop(columns=["sop_uid"])
        return frame.to_csv(index=False, float_format="%.4f")
