"""The worklist store: scored studies, their slices, volumes and radiologists' reads, kept on disk.

Everything lives in one data directory (:func:`ich.files.data_dir`: ``$ICH_DATA_DIR``, default ``.ich-data/`` in a
checkout): ``worklist.sqlite3``, ``volumes/<key>.npz`` (int16 HU, compressed, read without pickle) and
``headers/<key>.dcm`` (the scored series' first header without pixels, for the results sent back to PACS).
The exam's other CT series (bone kernel, thin, reformats, scout) are kept as volumes too, unscored, so the
viewer can switch to them (:meth:`Worklist.add_other_series`).

The tables may live on a PostgreSQL server instead (``$ICH_DATABASE_URL`` or ``Worklist(database_url=...)``,
``postgresql://user@host/database``), so that several machines share one worklist; the volumes and header
copies stay files in the data directory. Both engines are driven through SQLAlchemy Core with one schema
(:data:`_METADATA`) and the same SQL. Every write is one transaction that takes the database's one write lock
first (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an advisory lock, see :meth:`Worklist._write`), so one object
is safely shared by every Streamlit session (thread) of a server, and several processes (dashboards, the
listener) share one store: a look-up-then-insert cannot interleave. Readers never wait for a writer (SQLite's
WAL, PostgreSQL's snapshots).

The schema's version is kept in the ``meta`` table (``schema_version``; SQLite's ``user_version`` too). Opening
a store creates what is missing (tables, then columns added since version 1, then the one-row-per-exam index)
in one write transaction, which is idempotent and the same on both engines: a new PostgreSQL database gets the
current schema at once, an old SQLite store migrates in place as before. No Alembic: every change so far only
added tables and columns, which this does without a migration history that existing stores lack.

The worklist holds one row per **exam** (Study Instance UID): the series the model scored (chosen by
:func:`ich.exam.choose_series`) and, as ``exam_series``, every series the exam held with why it was not
scored. A re-score writes its volume and header under new file names and switches the row to them inside
the transaction; the old files are removed only after it commits, so a failed re-score leaves the row and
its files as they were, and a delete never removes a file a re-add has just written.

Exams received but not (yet) on the worklist are kept in the ``intake`` table: "receiving" while the
listener waits for the last instance, "failed" with the reason when scoring or storing failed (they are
retried; an admin may remove them). A damaged SQLite database, or a PostgreSQL server that cannot be
reached, raises :class:`StoreError` naming the database (never its password) and what to do.

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
import sqlalchemy as sa
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from sqlalchemy.engine import URL, Connection, RowMapping
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.pool import NullPool

from ich import dicom
from ich.exam import SeriesChoice, is_set_aside, with_set_aside
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
        "thickness": "DOUBLE PRECISION",  # SQLite: REAL, as the column was first added
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
SCHEMA_KEY = "schema_version"  # meta key: the schema version the store was last opened with
DATABASE_URL_ENV = "ICH_DATABASE_URL"  # a PostgreSQL database for the tables; unset: SQLite in the data directory
_P = [f"p_{c}" for c in CLASSES]
_Y = [f"y_{c}" for c in CLASSES]


def _column(
    name: str,
    kind: type[sa.types.TypeEngine],
    default: str | int | None = None,
    *,
    nullable: bool = True,
    primary_key: bool = False,
) -> sa.Column:
    """A column; ``default`` is the database's own (DEFAULT in the DDL), a text or an integer."""
    server_default = sa.text(str(default)) if isinstance(default, int) else default
    return sa.Column(name, kind, server_default=server_default, nullable=nullable, primary_key=primary_key)


def _study_id(primary_key: bool = False) -> sa.Column:
    return sa.Column(
        "study_id", sa.Integer, sa.ForeignKey("studies.id", ondelete="CASCADE"), nullable=False, primary_key=primary_key
    )


# The schema, one definition for both engines: an integer primary key is SQLite's rowid, PostgreSQL's SERIAL;
# Double is SQLite's REAL (8 bytes), PostgreSQL's DOUBLE PRECISION (its REAL has 4). Times stay ISO 8601 text,
# as SQLite always kept them, so both engines give the same values back.
_METADATA = sa.MetaData()
_STUDIES = sa.Table(
    "studies",
    _METADATA,
    sa.Column("id", sa.Integer, primary_key=True),
    _column("label", sa.Text, nullable=False),
    _column("study_uid", sa.Text, nullable=False),
    _column("series_uid", sa.Text, nullable=False),
    _column("received", sa.Text, nullable=False),
    _column("n_slices", sa.Integer, nullable=False),
    _column("score", sa.Double),
    _column("top_subtype", sa.Text),
    _column("flagged", sa.Integer, nullable=False),
    _column("status", sa.Text, STATUS_NEW, nullable=False),
    _column("demo", sa.Integer, 0, nullable=False),
    _column("model", sa.Text),
    _column("thresholds", sa.Text, nullable=False),
    _column("notes", sa.Text, "[]", nullable=False),
    _column("volume", sa.Text, nullable=False),
    _column("source", sa.Text, "upload", nullable=False),
    _column("study_datetime", sa.Text),
    _column("description", sa.Text, "", nullable=False),
    _column("thickness", sa.Double),
    _column("patient_id", sa.Text),
    _column("accession", sa.Text),
    _column("exam_series", sa.Text, "[]", nullable=False),
    _column("header_file", sa.Text),
    _column("updated", sa.Text),
    _column("top_k", sa.Integer),
    sa.UniqueConstraint("study_uid", "series_uid"),
)
_SLICES = sa.Table(
    "slices",
    _METADATA,
    _study_id(primary_key=True),
    _column("idx", sa.Integer, primary_key=True),
    _column("sop_uid", sa.Text, nullable=False),
    *(_column(c, sa.Double) for c in _P + _Y),
    _column("truth", sa.Text),
)
sa.Table(
    "reviews",
    _METADATA,
    sa.Column("id", sa.Integer, primary_key=True),
    _study_id(),
    _column("hemorrhage", sa.Integer, nullable=False),
    _column("subtypes", sa.Text, nullable=False),
    _column("slice_marks", sa.Text, nullable=False),
    _column("created", sa.Text, nullable=False),
    _column("others_clear", sa.Integer, 0, nullable=False),
)
sa.Table("meta", _METADATA, _column("key", sa.Text, primary_key=True), _column("value", sa.Text, nullable=False))
sa.Table(
    "intake",
    _METADATA,
    _column("key", sa.Text, primary_key=True),
    _column("source", sa.Text, nullable=False),
    _column("state", sa.Text, nullable=False),
    _column("study_uid", sa.Text),
    _column("first_seen", sa.Text, nullable=False),
    _column("last_seen", sa.Text, nullable=False),
    _column("attempts", sa.Integer, 0, nullable=False),
    _column("next_try", sa.Text),
    _column("reason", sa.Text),
)
sa.Table(
    "other_series",
    _METADATA,
    _study_id(primary_key=True),
    _column("series_uid", sa.Text, primary_key=True),
    _column("volume", sa.Text, nullable=False),
    _column("n_slices", sa.Integer, nullable=False),
)
# One row per exam. Stores from before version 5 may hold several series rows of one exam: they keep them
# (the latest is updated), and the index is made once they are gone.
_EXAM_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS studies_exam ON studies (study_uid)"
INTAKE_RECEIVING = "receiving"
INTAKE_FAILED = "failed"
_CORRUPT = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB: the file is damaged, not busy or misused


def advisory_key(name: str) -> int:
    """A PostgreSQL advisory lock key (a signed 64-bit integer) named by ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


# pg_advisory_xact_lock's key: PostgreSQL's counterpart of SQLite's one write lock (see Worklist._write).
_PG_WRITE_LOCK = advisory_key("ich.worklist write")


class StoreError(RuntimeError):
    """The worklist database cannot be used; the message names the database (never a password) and what to do."""


def _damaged(path: Path, exc: object) -> StoreError:
    return StoreError(
        f"{path}: the worklist database is damaged ({exc}). Stop every ich process using it, then restore the data "
        "directory from its backup (worklist.sqlite3 with its -wal file), or start with a new data directory "
        "(ICH_DATA_DIR); `python -m ich worklist --check` runs SQLite's integrity check."
    )


def _postgres_url(given: str | None) -> URL | None:
    """The PostgreSQL database ``given`` (else ``$ICH_DATABASE_URL``) names, for psycopg 3; ``None``: SQLite."""
    text = (given if given is not None else os.environ.get(DATABASE_URL_ENV, "")).strip()
    if not text:
        return None
    try:
        url = sa.make_url(text)
    except ArgumentError:  # its message quotes the text, password included
        raise StoreError(
            f"the worklist database URL ({DATABASE_URL_ENV}) cannot be read: postgresql://user@host/database"
        ) from None
    if url.drivername not in ("postgresql", "postgres", "postgresql+psycopg"):
        raise StoreError(
            f"the worklist database must be PostgreSQL (postgresql://...), not {url.drivername}; "
            f"without {DATABASE_URL_ENV} it is SQLite in the data directory"
        )
    return url.set(drivername="postgresql+psycopg")


def _run(db: Connection, sql: str, **params: object) -> sa.CursorResult:
    """``sql`` with ``:name`` parameters: the same text on both engines."""
    return db.execute(sa.text(sql), params)


def _sqlite_connect(db: sqlite3.Connection, _record: object) -> None:
    """Each new SQLite connection: no implicit BEGIN (reads run statement by statement; :meth:`Worklist._write`
    begins its own), and foreign keys on, so a delete cascades to the study's slices and reads."""
    db.isolation_level = None
    db.execute("PRAGMA foreign_keys = ON")


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


def _series_json(choices: Sequence[SeriesChoice]) -> str:
    """An exam's series as the ``exam_series`` column keeps them (:func:`_series_from_json` reads them back)."""
    return json.dumps([dataclasses.asdict(c) for c in choices])


def _series_from_json(text: str) -> tuple[SeriesChoice, ...]:
    return tuple(SeriesChoice(**c) for c in json.loads(text))


def _write_npz(path: Path, series: dicom.Series) -> None:
    """The series' int16 HU as a standard ``.npz`` (key ``hu``; ``affine``: voxel to patient LPS mm, and
    ``locations``: each slice's position along the normal, by which the viewer groups a thin series into the
    slabs the model scored, when the headers gave them); deflate level 1 is 4x faster than numpy's default for 5 % more bytes, which keeps
    an upload within its time budget. Written then renamed."""
    arrays = {"hu": np.clip(np.rint(series.volume()), -32768, 32767).astype(np.int16)}
    for name, array in (("affine", series.affine()), ("locations", series.locations())):
        if array is not None:
            arrays[name] = np.asarray(array, np.float64)

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
    def from_rows(cls, study: RowMapping, last_review: RowMapping | None) -> StudyRecord:
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
            exam_series=_series_from_json(study["exam_series"]),
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
    """The persistent worklist in ``directory`` (created if missing), its tables in SQLite there or in the
    PostgreSQL database ``database_url`` (default ``$ICH_DATABASE_URL``) names."""

    def __init__(self, directory: str | os.PathLike | None = None, database_url: str | None = None) -> None:
        self.directory = private_dir(Path(directory) if directory is not None else data_dir())  # patient data
        warn_permissions(self.directory)  # the dashboard and the listener open it at start
        self.volumes = self.directory / "volumes"
        self.volumes.mkdir(parents=True, exist_ok=True)
        self.headers = self.directory / "headers"  # one pixel-free header copy per series (see header())
        self.headers.mkdir(exist_ok=True)
        for folder in (self.volumes, self.headers):
            _remove_stale_partials(folder)
        url = _postgres_url(database_url)
        self.path: Path | None  # the SQLite file; None on PostgreSQL
        self.location: str  # the database as messages name it: the file, or the URL without its password
        self.engine: sa.Engine  # SQLAlchemy's handle on the tables (tests and tools may read them through it)
        if url is None:
            self.path = self.directory / "worklist.sqlite3"
            self.location = str(self.path)
            # A connection per call, as sqlite3 was used before: nothing holds the file open between calls.
            self.engine = sa.create_engine(
                URL.create("sqlite", database=str(self.path)), poolclass=NullPool, connect_args={"timeout": 30}
            )
            sa.event.listen(self.engine, "connect", _sqlite_connect)
        else:
            self.path = None
            self.location = url.render_as_string(hide_password=True)
            # READ COMMITTED whatever the server's default: each statement of a write sees what the writers
            # before it committed (see _write); a pooled connection is tested before use (a server restart).
            # A server that does not answer is an error after 10 s, not a page that hangs until the OS gives up.
            self.engine = sa.create_engine(
                url, isolation_level="READ COMMITTED", pool_pre_ping=True, connect_args={"connect_timeout": 10}
            )
        self._lock = threading.Lock()
        with self._write() as db:
            _METADATA.create_all(db)  # the tables a new (or older) store lacks
            for table, added in _ADDED_COLUMNS.items():
                present = {column["name"] for column in sa.inspect(db).get_columns(table)}
                for column, definition in added.items():
                    if column not in present:
                        db.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column} {definition}"))
            if db.execute(sa.text("SELECT 1 FROM studies GROUP BY study_uid HAVING COUNT(*) > 1")).first() is None:
                db.execute(sa.text(_EXAM_INDEX))
            self._put_meta(db, SCHEMA_KEY, str(_SCHEMA_VERSION))
            if self.path is not None:
                db.exec_driver_sql(f"PRAGMA user_version = {_SCHEMA_VERSION}")  # as before, for sqlite3 tools
        if self.path is not None:
            with self._read() as db:  # readers never wait for a writer (persistent, so set once)
                db.exec_driver_sql("PRAGMA journal_mode = WAL")

    # ------------------------------------------------------------------ connections

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        """A connection; SQLite runs its statements one by one, PostgreSQL in a transaction rolled back at the end."""
        try:
            connection = self.engine.connect()
        except OperationalError as exc:
            self._raise_if_damaged(exc)
            if self.path is None:  # psycopg's reason names host, port and user, never the password
                raise StoreError(
                    f"{self.location}: cannot connect to the worklist database ({str(exc.orig).strip()}). Start the "
                    f"PostgreSQL server or correct {DATABASE_URL_ENV}."
                ) from None
            raise
        try:
            with connection as db:
                yield db
        except DBAPIError as exc:
            self._raise_if_damaged(exc)
            raise

    def _raise_if_damaged(self, exc: DBAPIError) -> None:
        if self.path is not None and getattr(exc.orig, "sqlite_errorcode", None) in _CORRUPT:
            raise _damaged(self.path, exc.orig) from None

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """One transaction: committed on success, rolled back on any error. It takes the database's write lock
        first, so what the transaction reads cannot change under it, whichever process writes.

        SQLite: ``BEGIN IMMEDIATE``. PostgreSQL: ``pg_advisory_xact_lock`` on one key, held to the commit, so
        writers take turns as on SQLite. Row locks (``SELECT ... FOR UPDATE``) cannot lock a row not there yet,
        which is what two processes adding the same exam race for; SERIALIZABLE would have to retry whole
        writes, volume files included. Writes take milliseconds and readers never wait, so one lock is enough.
        """
        with self._lock, self._read() as db, db.begin():
            if self.path is not None:
                db.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                db.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_WRITE_LOCK})
            yield db

    @staticmethod
    def _put_meta(db: Connection, key: str, value: str) -> None:
        db.execute(
            sa.text(
                "INSERT INTO meta (key, value) VALUES (:key, :value) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            ),
            {"key": key, "value": value},
        )

    def check(self) -> list[str]:
        """What is wrong with the database: ``[]`` when it is sound. SQLite: its integrity check. PostgreSQL keeps
        its own pages sound (checking them needs the amcheck extension and a superuser): every table and column
        of the schema is there."""
        with self._read() as db:
            if self.path is not None:
                found = [row[0] for row in db.exec_driver_sql("PRAGMA integrity_check")]
                return [] if found == ["ok"] else found
            inspector, missing = sa.inspect(db), []
            for table in _METADATA.sorted_tables:
                if not inspector.has_table(table.name):
                    missing.append(f"table {table.name} is missing")
                    continue
                present = {c["name"] for c in inspector.get_columns(table.name)}
                missing += [f"column {table.name}.{c.name} is missing" for c in table.columns if c.name not in present]
            return missing

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
            _write_npz(self.volumes / key, series)
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
            _write_npz(path, series)
            with self._write() as db:
                found = _run(db, "SELECT id FROM studies WHERE study_uid = :uid", uid=study_uid).scalar_one_or_none()
                old = None
                if found:
                    kept = dict(study_id=found, series_uid=series.series_uid)
                    where = "WHERE study_id = :study_id AND series_uid = :series_uid"
                    old = _run(db, f"SELECT volume FROM other_series {where}", **kept).scalar_one_or_none()
                    _run(
                        db,
                        "INSERT INTO other_series (study_id, series_uid, volume, n_slices)"
                        " VALUES (:study_id, :series_uid, :volume, :n_slices)"
                        " ON CONFLICT (study_id, series_uid) DO UPDATE SET volume = excluded.volume, n_slices = excluded.n_slices",
                        **kept, volume=key, n_slices=len(series),
                    )  # fmt: skip
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if not found:
            path.unlink(missing_ok=True)
            return False
        if old:  # after the commit: nothing names it any more
            (self.volumes / old).unlink(missing_ok=True)
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
            exam_series=_series_json(exam_series),
            top_k=top_k,
            header_file=header,
        )
        with self._write() as db:
            # The latest row of the exam (a store from before version 5 may hold one per series).
            found = (
                _run(db, "SELECT * FROM studies WHERE study_uid = :uid ORDER BY id DESC LIMIT 1", uid=series.study_uid)
                .mappings()
                .first()
            )
            # Labels a previous upload of this series brought stay where the new ones say nothing
            # (no label file, or one that does not list these slices).
            old = {
                r["sop_uid"]: r
                for r in (
                    _run(db, f"SELECT sop_uid, {', '.join(_Y)}, truth FROM slices WHERE study_id = :id", id=found["id"])
                    .mappings()
                    .all()
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
                db.execute(_STUDIES.update().where(_STUDIES.c.id == study_id).values(fields))
                _run(db, "DELETE FROM slices WHERE study_id = :id", id=study_id)
                replaced = [
                    self.volumes / found["volume"],
                    self.headers / StudyRecord.from_rows(found, None).header_file,
                ]
                # A series kept for the viewer that is now the scored one: its volume is the row's own now.
                where = "FROM other_series WHERE study_id = :id AND series_uid = :uid"
                replaced += [
                    self.volumes / volume
                    for volume in _run(db, f"SELECT volume {where}", id=study_id, uid=series.series_uid).scalars()
                ]
                _run(db, f"DELETE {where}", id=study_id, uid=series.series_uid)
            else:
                inserted = db.execute(_STUDIES.insert().values(label="", **fields))
                # SQLite's rowid, PostgreSQL's SERIAL: SQLAlchemy fetches the new id as each engine gives it back.
                study_id = inserted.inserted_primary_key.id  # type: ignore[union-attr]  # an INSERT always has one
            name = "Demo" if demo else "Study"
            label = f"{name} {study_id} · {len(series)} slices"
            _run(db, "UPDATE studies SET label = :label WHERE id = :id", label=label, id=study_id)
            db.execute(
                _SLICES.insert(),
                [
                    dict(study_id=study_id, idx=i, sop_uid=sop, truth=sources[i],
                         **dict(zip(_P, _nullable(probs[i]))), **dict(zip(_Y, _nullable(y[i]))))
                    for i, sop in enumerate(series.sop_uids)
                ],
            )  # fmt: skip
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
            _run(
                db,
                "INSERT INTO reviews (study_id, hemorrhage, subtypes, slice_marks, others_clear, created)"
                " VALUES (:id, :hemorrhage, :subtypes, :marks, :others_clear, :created)",
                id=study_id, hemorrhage=int(read.hemorrhage), subtypes=json.dumps(read.subtypes),
                marks=json.dumps(read.slice_marks), others_clear=int(read.others_clear), created=read.created,
            )  # fmt: skip
            status = STATUS_HEMORRHAGE if read.hemorrhage else STATUS_CLEAR
            _run(db, "UPDATE studies SET status = :status WHERE id = :id", status=status, id=study_id)
        return read

    def list_set_aside(self, study_uid: str, set_aside: Sequence[SeriesChoice]) -> bool:
        """Replace the series an exam's row lists as set aside at the door (:func:`ich.exam.set_aside`: no UID
        kept) by ``set_aside``, leaving its score alone; ``False`` when the exam is not on the worklist."""
        with self._write() as db:
            row = _run(db, "SELECT id, exam_series FROM studies WHERE study_uid = :uid", uid=study_uid).first()
            if row is None:
                return False
            kept = [c for c in _series_from_json(row.exam_series) if not is_set_aside(c)]
            listed = _series_json(with_set_aside(kept, set_aside))
            _run(db, "UPDATE studies SET exam_series = :listed WHERE id = :id", listed=listed, id=row.id)
            return True

    def delete_study(self, study_id: int) -> None:
        """Remove a study with its slices, reads, volume and header files (the rows first: a crash leaves no
        visible half). The files are the ones the row named when it was deleted: a re-add of the exam at the
        same moment writes new names, which stay."""
        with self._write() as db:
            row = _run(db, "SELECT * FROM studies WHERE id = :id", id=study_id).mappings().first()
            if row is None:
                raise KeyError(f"no study {study_id} on the worklist")
            others = list(_run(db, "SELECT volume FROM other_series WHERE study_id = :id", id=study_id).scalars())
            _run(db, "DELETE FROM studies WHERE id = :id", id=study_id)  # slices, reads, other series cascade
        record = StudyRecord.from_rows(row, None)
        for name in (record.volume_file, *others):
            (self.volumes / name).unlink(missing_ok=True)
        (self.headers / record.header_file).unlink(missing_ok=True)

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as db:
            self._put_meta(db, key, value)

    def claim_meta(self, key: str, value: str, *, only_if_empty: bool = False) -> bool:
        """Set ``key`` to ``value`` only if it is unset (and, with ``only_if_empty``, no study is stored), in
        one write transaction: of several servers or sessions asking at once, exactly one gets ``True``."""
        with self._write() as db:
            if _run(db, "SELECT 1 FROM meta WHERE key = :key", key=key).first() is not None:
                return False
            if only_if_empty and _run(db, "SELECT 1 FROM studies LIMIT 1").first() is not None:
                return False
            self._put_meta(db, key, value)
            return True

    @property
    def identifiers_on(self) -> bool:
        """Whether patient ID and accession are kept and shown (to signed-in users): off unless an admin turns it on."""
        return self.get_meta(IDENTIFIERS_KEY) == "on"

    def set_identifiers(self, on: bool) -> None:
        """Turn identifiers on or off; off also erases every stored one."""
        with self._write() as db:
            self._put_meta(db, IDENTIFIERS_KEY, "on" if on else "off")
            if not on:
                _run(db, "UPDATE studies SET patient_id = NULL, accession = NULL")

    def identifiers(self) -> pd.DataFrame:
        """``id``, ``patient_id``, ``accession`` of every study (empty values while identifiers are off)."""
        with self._read() as db:
            return pd.read_sql_query(sa.text("SELECT id, patient_id, accession FROM studies"), db)

    def get_meta(self, key: str) -> str | None:
        with self._read() as db:
            return _run(db, "SELECT value FROM meta WHERE key = :key", key=key).scalar_one_or_none()

    # ------------------------------------------------------------------ intake: exams received, not on the worklist yet

    def note_receiving(self, key: str, source: str, study_uid: str | None = None) -> None:
        """An exam (``key``: the receiver's name for it, no identifier) is arriving: shown as "receiving"
        until :meth:`intake_done` or :meth:`intake_failed`."""
        now = _now()
        with self._write() as db:
            _run(
                db,
                "INSERT INTO intake (key, source, state, study_uid, first_seen, last_seen)"
                " VALUES (:key, :source, :state, :uid, :now, :now)"
                " ON CONFLICT (key) DO UPDATE SET state = excluded.state, last_seen = excluded.last_seen",
                key=key, source=source, state=INTAKE_RECEIVING, uid=study_uid, now=now,
            )  # fmt: skip

    def intake_failed(self, key: str, reason: str, next_try: dt.datetime | None, source: str = "dicom") -> int:
        """Scoring or storing the exam failed: kept as "failed" with ``reason`` (no identifier) and when it is
        tried again (``None``: not until more instances come); returns how many attempts failed so far."""
        now = _now()
        retry = None if next_try is None else next_try.astimezone().isoformat(timespec="seconds")
        with self._write() as db:
            _run(
                db,
                "INSERT INTO intake (key, source, state, first_seen, last_seen, attempts, next_try, reason)"
                " VALUES (:key, :source, :state, :now, :now, 1, :next_try, :reason) ON CONFLICT (key) DO UPDATE SET"
                " state = excluded.state, attempts = intake.attempts + 1, next_try = excluded.next_try,"
                " reason = excluded.reason",
                key=key, source=source, state=INTAKE_FAILED, now=now, next_try=retry, reason=reason,
            )  # fmt: skip
            return int(_run(db, "SELECT attempts FROM intake WHERE key = :key", key=key).scalar_one())

    def intake_done(self, key: str) -> None:
        """The exam is on the worklist (or an admin removed it): no longer pending."""
        with self._write() as db:
            _run(db, "DELETE FROM intake WHERE key = :key", key=key)

    def intake(self) -> pd.DataFrame:
        """Exams received and not on the worklist yet, or being updated: ``key``, ``source``, ``state``
        (receiving / failed), ``study_id`` (the worklist row a late instance will update, else NaN),
        ``first_seen``, ``last_seen``, ``attempts``, ``next_try``, ``reason``; failed ones first."""
        with self._read() as db:
            return pd.read_sql_query(
                sa.text(
                    "SELECT i.key, i.source, i.state, s.id AS study_id, i.first_seen, i.last_seen, i.attempts,"
                    " i.next_try, i.reason FROM intake i LEFT JOIN studies s ON s.study_uid = i.study_uid"
                    " ORDER BY i.state != :failed, i.first_seen"
                ),
                db,
                params={"failed": INTAKE_FAILED},
            )

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        with self._read() as db:
            return int(_run(db, "SELECT COUNT(*) FROM studies").scalar_one())

    def studies(self, status: str | None = None) -> pd.DataFrame:
        """One row per study: unread first, then the most likely hemorrhage first (unscored studies last)."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        query = (
            "SELECT id, label, received, study_datetime, description, n_slices, thickness, source, score,"
            " top_subtype, flagged, status, demo, model, thresholds, top_k, updated FROM studies"
            + (" WHERE status = :status" if status else "")
            + " ORDER BY status != :new, score IS NULL, score DESC, id"
        )
        with self._read() as db:
            frame = pd.read_sql_query(sa.text(query), db, params={"status": status, "new": STATUS_NEW})
        local = dt.datetime.now().astimezone().tzinfo
        for when in ("received", "updated"):  # stored with the writer's UTC offset, shown in this server's local time
            frame[when] = pd.to_datetime(frame[when], utc=True).dt.tz_convert(local).dt.tz_localize(None)
        frame["study_datetime"] = pd.to_datetime(frame["study_datetime"])  # the scanner's local time, as DICOM has it
        frame[["flagged", "demo"]] = frame[["flagged", "demo"]].astype(bool)
        return frame

    def study(self, study_id: int) -> StudyRecord:
        """One study with its latest read; ``KeyError`` when the worklist has no such study."""
        with self._read() as db:
            row = _run(db, "SELECT * FROM studies WHERE id = :id", id=study_id).mappings().first()
            if row is None:
                raise KeyError(f"no study {study_id} on the worklist")
            last = (
                _run(db, "SELECT * FROM reviews WHERE study_id = :id ORDER BY id DESC LIMIT 1", id=study_id)
                .mappings()
                .first()
            )
        return StudyRecord.from_rows(row, last)

    def slices(self, study_id: int) -> pd.DataFrame:
        """One row per slice: ``index``, ``sop_uid``, ``p_<class>``, ``y_<class>`` (the actual) and ``truth``.

        The actual comes from the latest read where that read decides the slice (see
        :func:`ich.review.read_truth`), else from the CSV or phantom labels, else it is NaN.
        """
        with self._read() as db:
            frame = pd.read_sql_query(
                sa.text(
                    f'SELECT idx AS "index", sop_uid, {", ".join(_P + _Y)}, truth FROM slices WHERE study_id = :id'
                    " ORDER BY idx"
                ),
                db,
                params={"id": study_id},
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
            rows = _run(
                db,
                "SELECT o.series_uid, o.n_slices FROM other_series o JOIN studies s ON s.id = o.study_id"
                " WHERE o.study_id = :id AND o.series_uid != s.series_uid",
                id=study_id,
            ).all()
        return {uid: int(n) for uid, n in rows}

    def _volume_path(self, study_id: int, series_uid: str | None) -> Path:
        record = self.study(study_id)
        if series_uid is None or series_uid == record.series_uid:
            return self.volumes / record.volume_file
        with self._read() as db:
            volume = _run(
                db,
                "SELECT volume FROM other_series WHERE study_id = :id AND series_uid = :uid",
                id=study_id,
                uid=series_uid,
            ).scalar_one_or_none()
        if volume is None:
            raise KeyError(f"study {study_id} keeps no such series")
        return self.volumes / volume

    def volume(self, study_id: int, series_uid: str | None = None) -> np.ndarray:
        """int16 ``(N, H, W)`` HU of the scored series, or of another series of the exam (:meth:`other_series`)."""
        with np.load(self._volume_path(study_id, series_uid), allow_pickle=False) as npz:
            return npz["hu"]

    def affine(self, study_id: int, series_uid: str | None = None) -> np.ndarray | None:
        """4x4 voxel (column, row, slice) to patient LPS mm; ``None`` for a volume stored without one."""
        return self._volume_array(study_id, series_uid, "affine")

    def locations(self, study_id: int, series_uid: str | None = None) -> np.ndarray | None:
        """Each slice's position along the normal (mm); ``None`` for a volume stored without them."""
        return self._volume_array(study_id, series_uid, "locations")

    def _volume_array(self, study_id: int, series_uid: str | None, name: str) -> np.ndarray | None:
        with np.load(self._volume_path(study_id, series_uid), allow_pickle=False) as npz:
            return npz[name] if name in npz.files else None

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
                sa.text(
                    "SELECT id, hemorrhage, subtypes, slice_marks, others_clear, created FROM reviews"
                    " WHERE study_id = :id ORDER BY id"
                ),
                db,
                params={"id": study_id},
            )

    # ------------------------------------------------------------------ exports

    def export_csv(self, uids: bool = False) -> str:
        """The worklist with each study's latest read, as CSV text (DICOM UIDs only if ``uids``)."""
        with self._read() as db:
            frame = pd.read_sql_query(
                sa.text(
                    "SELECT s.id, s.label, s.study_uid, s.series_uid, s.received, s.n_slices, s.score, s.top_subtype,"
                    " s.flagged, s.status, s.demo, s.model, r.hemorrhage AS read_hemorrhage, r.subtypes AS read_subtypes,"
                    " r.slice_marks AS read_slice_marks, r.others_clear AS read_others_clear, r.created AS read_time"
                    " FROM studies s LEFT JOIN reviews r"
                    " ON r.id = (SELECT MAX(id) FROM reviews WHERE study_id = s.id)"
                    " ORDER BY s.score IS NULL, s.score DESC, s.id"
                ),
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
