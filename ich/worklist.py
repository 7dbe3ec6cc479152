"""The worklist: scored studies, their slices, volumes and radiologists' reads, kept on disk.

Everything lives in one data directory (``$ICH_DATA_DIR``, default ``.ich-data/`` in the repository
root): ``worklist.sqlite3`` and ``volumes/<key>.npz`` (int16 HU, compressed, read without pickle).
A :class:`Worklist` opens a new SQLite connection per call and serialises writes with a lock, so
one object is safely shared by every Streamlit session (thread) of a server.

No patient identifiers are stored: a study is shown as "Study 3 · 36 slices"; its DICOM UIDs are
kept to recognise a re-upload and leave the store only when an export asks for them.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import sqlite3
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from ich import dicom
from ich.labels import CLASSES
from ich.review import Read, read_truth

__all__ = [
    "STATUS_NEW",
    "STATUS_HEMORRHAGE",
    "STATUS_CLEAR",
    "STATUSES",
    "TRUTH_SOURCES",
    "DEMO_CASES",
    "data_dir",
    "Worklist",
    "IngestReport",
    "ingest",
    "seed_demo",
]

STATUS_NEW = "new"
STATUS_HEMORRHAGE = "reviewed: hemorrhage"
STATUS_CLEAR = "reviewed: no hemorrhage"
STATUSES = (STATUS_NEW, STATUS_HEMORRHAGE, STATUS_CLEAR)
TRUTH_SOURCES = ("csv", "phantom", "review")
# What the first-start demo shows: each subtype once (two together, as they often occur) and a clear head.
DEMO_CASES: tuple[tuple[str, ...], ...] = (
    ("subdural",),
    ("intraparenchymal", "intraventricular"),
    ("epidural",),
    ("subarachnoid",),
    (),
)
_SEED_LOCK = threading.Lock()

_ROOT = Path(__file__).resolve().parents[1]
_SCHEMA_VERSION = 1
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
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
PRAGMA user_version = {_SCHEMA_VERSION};
"""


def data_dir() -> Path:
    """``$ICH_DATA_DIR``, else ``.ich-data/`` beside the package (git-ignored)."""
    return Path(os.environ.get("ICH_DATA_DIR") or _ROOT / ".ich-data")


def _now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _volume_key(study_uid: str, series_uid: str) -> str:
    """File name for a series' volume: a hash, so UIDs never appear in paths."""
    return hashlib.sha256(f"{study_uid}\0{series_uid}".encode()).hexdigest()[:20] + ".npz"


def _nullable(values: np.ndarray) -> list[float | None]:
    """SQLite NULL for NaN (a class the model does not predict, a slice without a label)."""
    return [None if np.isnan(v) else float(v) for v in values]


def _write_npz(path: Path, volume: np.ndarray) -> None:
    """int16 HU as a standard ``.npz`` (key ``hu``); deflate level 1 is 4x faster than numpy's default
    for 5 % more bytes, which keeps an upload within its time budget. Written then renamed."""
    hu = np.clip(np.rint(volume), -32768, 32767).astype(np.int16)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            with zf.open("hu.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, hu, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class _Prediction(Protocol):  # ich.inference.StudyPrediction, without importing torch here
    sop_uids: list[str]
    probs: np.ndarray
    score: float
    top_subtype: str | None
    flagged: bool


class Worklist:
    """The persistent worklist in ``directory`` (created if missing)."""

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory) if directory is not None else data_dir()
        self.volumes = self.directory / "volumes"
        self.volumes.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / "worklist.sqlite3"
        self._lock = threading.Lock()
        with self._write() as db:
            db.executescript(_SCHEMA)
        with self._read() as db:  # readers never wait for a writer (persistent, so set once)
            db.execute("PRAGMA journal_mode = WAL")

    # ------------------------------------------------------------------ connections

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock: committed on success, rolled back on any error."""
        with self._lock, self._read() as db:
            db.execute("PRAGMA foreign_keys = ON")
            with db:
                yield db

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
    ) -> int:
        """Store a scored series (volume, slice probabilities, optional labels); returns the study id.

        ``labels`` are wide labels indexed by SOPInstanceUID (:mod:`ich.labels`); slices it does not
        list stay unlabelled. Uploading the same series again replaces its scores and volume but keeps
        its id, status and reads, and its labels unless new ones come.
        """
        if truth not in ("csv", "phantom"):  # "review" truth comes from save_review only
            raise ValueError(f"truth must be 'csv' or 'phantom', got {truth!r}")
        probs = np.asarray(prediction.probs, dtype=np.float64)
        if probs.shape != (len(series), len(CLASSES)):
            raise ValueError(f"prediction has shape {probs.shape} for {len(series)} slices")
        key = _volume_key(series.study_uid, series.series_uid)
        _write_npz(self.volumes / key, series.volume())
        score = None if not np.isfinite(prediction.score) else float(prediction.score)
        fields = dict(
            study_uid=series.study_uid, series_uid=series.series_uid, received=_now(), n_slices=len(series),
            score=score, top_subtype=prediction.top_subtype, flagged=int(prediction.flagged), demo=int(demo),
            model=model, thresholds=json.dumps(thresholds or {}), notes=json.dumps(list(series.notes)), volume=key,
        )
        with self._write() as db:
            found = db.execute(
                "SELECT id FROM studies WHERE study_uid = ? AND series_uid = ?", (series.study_uid, series.series_uid)
            ).fetchone()
            if labels is not None:
                y = labels.reindex(series.sop_uids)[list(CLASSES)].to_numpy(np.float64)
                sources = [None if np.isnan(row).all() else truth for row in y]
            else:  # keep the labels a previous upload of this series brought
                old = {} if not found else {
                    r["sop_uid"]: r for r in db.execute(f"SELECT sop_uid, {', '.join(_Y)}, truth FROM slices WHERE study_id = ?", (found["id"],))
                }
                y = np.array([[np.nan if sop not in old or old[sop][c] is None else old[sop][c] for c in _Y] for sop in series.sop_uids])
                sources = [old[sop]["truth"] if sop in old else None for sop in series.sop_uids]
            if found:
                study_id = found["id"]
                db.execute(f"UPDATE studies SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?", (*fields.values(), study_id))
                db.execute("DELETE FROM slices WHERE study_id = ?", (study_id,))
            else:
                study_id = db.execute(
                    f"INSERT INTO studies (label, {', '.join(fields)}) VALUES ('', {', '.join('?' * len(fields))})",
                    tuple(fields.values()),
                ).lastrowid
            name = "Demo" if demo else "Study"
            db.execute("UPDATE studies SET label = ? WHERE id = ?", (f"{name} {study_id} · {len(series)} slices", study_id))
            db.executemany(
                f"INSERT INTO slices (study_id, idx, sop_uid, {', '.join(_P + _Y)}, truth) "
                f"VALUES ({study_id}, {', '.join('?' * (len(_P) + len(_Y) + 3))})",
                [(i, sop, *_nullable(probs[i]), *_nullable(y[i]), sources[i]) for i, sop in enumerate(series.sop_uids)],
            )
        return int(study_id)

    def save_review(self, study_id: int, hemorrhage: bool, subtypes: Iterable[str] = (), slice_marks: Iterable[int] = ()) -> Read:
        """Record a radiologist's read (0-based slice marks); it becomes the study's "actual"."""
        read = Read(bool(hemorrhage), tuple(subtypes), tuple(sorted({int(i) for i in slice_marks})), _now())
        n = self.study(study_id)["n_slices"]
        if any(not 0 <= i < n for i in read.slice_marks):
            raise ValueError(f"slice marks must lie in 0..{n - 1}")
        with self._write() as db:
            db.execute(
                "INSERT INTO reviews (study_id, hemorrhage, subtypes, slice_marks, created) VALUES (?, ?, ?, ?, ?)",
                (study_id, int(read.hemorrhage), json.dumps(read.subtypes), json.dumps(read.slice_marks), read.created),
            )
            status = STATUS_HEMORRHAGE if read.hemorrhage else STATUS_CLEAR
            db.execute("UPDATE studies SET status = ? WHERE id = ?", (status, study_id))
        return read

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row["value"]

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        with self._read() as db:
            return int(db.execute("SELECT COUNT(*) FROM studies").fetchone()[0])

    def studies(self, status: str | None = None) -> pd.DataFrame:
        """One row per study, most likely hemorrhage first (unscored studies last)."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        query = (
            "SELECT id, label, received, n_slices, score, top_subtype, flagged, status, demo FROM studies"
            + (" WHERE status = ?" if status else "")
            + " ORDER BY score IS NULL, score DESC, id"
        )
        with self._read() as db:
            frame = pd.read_sql_query(query, db, params=(status,) if status else None)
        local = dt.datetime.now().astimezone().tzinfo
        frame["received"] = pd.to_datetime(frame["received"], utc=True).dt.tz_convert(local).dt.tz_localize(None)
        frame[["flagged", "demo"]] = frame[["flagged", "demo"]].astype(bool)
        return frame

    def study(self, study_id: int) -> dict[str, Any]:
        """A study's row as a dict (``thresholds`` and ``notes`` decoded, ``read``: latest :class:`Read` or None)."""
        with self._read() as db:
            row = db.execute("SELECT * FROM studies WHERE id = ?", (study_id,)).fetchone()
            if row is None:
                raise KeyError(f"no study {study_id} on the worklist")
            last = db.execute(
                "SELECT * FROM reviews WHERE study_id = ? ORDER BY id DESC LIMIT 1", (study_id,)
            ).fetchone()
        info = dict(row)
        info["thresholds"] = json.loads(info["thresholds"])
        info["notes"] = json.loads(info["notes"])
        info["flagged"] = bool(info["flagged"])
        info["read"] = None if last is None else Read(
            bool(last["hemorrhage"]), tuple(json.loads(last["subtypes"])), tuple(json.loads(last["slice_marks"])), last["created"]
        )
        return info

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
        read = self.study(study_id)["read"]
        if read is not None:
            reviewed = read_truth(read, len(frame))
            decided = ~np.isnan(reviewed).all(axis=1)
            frame.loc[decided, _Y] = reviewed[decided]
            frame.loc[decided, "truth"] = "review"
        return frame

    def volume(self, study_id: int) -> np.ndarray:
        """int16 ``(N, H, W)`` HU."""
        with np.load(self.volumes / self.study(study_id)["volume"], allow_pickle=False) as npz:
            return npz["hu"]

    def reviews(self, study_id: int) -> pd.DataFrame:
        with self._read() as db:
            return pd.read_sql_query(
                "SELECT id, hemorrhage, subtypes, slice_marks, created FROM reviews WHERE study_id = ? ORDER BY id",
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
                " r.slice_marks AS read_slice_marks, r.created AS read_time FROM studies s LEFT JOIN reviews r"
                " ON r.id = (SELECT MAX(id) FROM reviews WHERE study_id = s.id)"
                " ORDER BY s.score IS NULL, s.score DESC, s.id",
                db,
            )
        if not uids:
            frame = frame.drop(columns=["study_uid", "series_uid"])
        return frame.to_csv(index=False)

    def slices_csv(self, study_id: int, uids: bool = False) -> str:
        """A study's per-slice probabilities and actuals as CSV text (1-based ``slice`` numbers)."""
        frame = self.slices(study_id)
        frame.insert(0, "slice", frame.pop("index") + 1)
        if not uids:
            frame = frame.drop(columns=["sop_uid"])
        return frame.to_csv(index=False, float_format="%.4f")


# ---------------------------------------------------------------------- ingesting uploads


class _Predictor(Protocol):  # ich.inference.Predictor
    thresholds: dict[str, float]

    @property
    def name(self) -> str: ...

    def predict_series(self, series: dicom.Series, progress: Callable[[float], None] | None = None) -> _Prediction: ...


@dataclass
class IngestReport:
    """What one upload did: studies added (ids), files or series that could not be used, seconds spent."""

    added: list[int] = field(default_factory=list)
    problems: list[dicom.Problem] = field(default_factory=list)
    seconds: float = 0.0


def ingest(
    worklist: Worklist,
    predictor: _Predictor,
    sources: Sequence[dicom.Source],
    labels: pd.DataFrame | None = None,
    *,
    truth: str = "csv",
    demo: bool = False,
    progress: Callable[[float, str], None] | None = None,
) -> IngestReport:
    """Read ``sources``, score every series and put each on the worklist.

    A file that cannot be read, or a series that fails to score or store, becomes a problem line
    and the rest still load. ``progress(fraction, message)`` runs after each file and series:
    reading is the first half of the bar, scoring the second.
    """
    start = time.perf_counter()
    report = IngestReport()
    step = progress or (lambda fraction, message: None)
    expected = max(1, len(sources))

    def on_file(count: int, name: str) -> None:
        step(0.5 * min(1.0, count / expected), f"Reading file {count}")

    loaded = dicom.load(list(sources), progress=on_file)
    report.problems.extend(loaded.problems)
    total = len(loaded.series)
    for i, series in enumerate(loaded.series):
        where = f"series {i + 1} of {total} ({len(series)} slices)"

        def on_batch(fraction: float, i: int = i) -> None:
            step(0.5 + 0.5 * (i + fraction) / total, f"Scoring {where}")

        try:
            prediction = predictor.predict_series(series, progress=on_batch)
            report.added.append(
                worklist.add_study(
                    series, prediction, labels, truth=truth, thresholds=predictor.thresholds, model=predictor.name, demo=demo
                )
            )
        except Exception as exc:  # one bad series must not sink the upload
            report.problems.append(dicom.Problem(where, f"could not be added: {type(exc).__name__}: {exc}"))
    step(1.0, "Done")
    report.seconds = time.perf_counter() - start
    return report


def seed_demo(
    worklist: Worklist,
    predictor: _Predictor,
    n: int = len(DEMO_CASES),
    seed: int = 2019,
    size: int | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> IngestReport | None:
    """Fill an empty worklist, once, with ``n`` synthetic phantom studies and their labels.

    The studies cycle through :data:`DEMO_CASES`, so the demo shows every subtype and a clear
    head. ``size`` is the phantom matrix (default 512; tests use small ones). Returns ``None`` when the worklist
    was seeded before or already holds studies.
    """
    from ich import phantom  # only needed on first start

    step = progress or (lambda fraction, message: None)
    with _SEED_LOCK:  # two sessions opening a fresh server must not both seed
        if worklist.get_meta("demo_seeded") is not None:
            return None
        if len(worklist):  # a store filled before the demo existed stays as it is
            worklist.set_meta("demo_seeded", _now())
            return None
        with tempfile.TemporaryDirectory(prefix="ich-demo-") as tmp:
            labels = []
            for k in range(n):
                step(0.8 * k / n, f"rendering synthetic study {k + 1} of {n}")
                subtypes = DEMO_CASES[k % len(DEMO_CASES)]
                study = phantom.generate_study(
                    seed + k, hemorrhage=bool(subtypes), subtypes=subtypes or None, size=size or phantom.MATRIX
                )
                phantom.write_study(study, tmp)
                labels.append(study.labels)
            report = ingest(
                worklist, predictor, [tmp], pd.concat(labels), truth="phantom", demo=True,
                progress=lambda fraction, message: step(0.8 + 0.2 * fraction, message),
            )
        worklist.set_meta("demo_seeded", _now())
    return report
