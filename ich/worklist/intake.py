"""Putting uploads on the worklist: read each exam, score its chosen series, store it; and the first-start demo.

The unit is the exam (Study Instance UID): the headers of everything are read first, grouped by exam,
and :func:`ich.exam.choose_series` picks the one series per exam the model scores (axial, original, soft
tissue, not a scout or a reformat). Then the series' pixels are read one series at a time
(:func:`ich.dicom.iter_series`, zip members from their archive), so an upload never holds more than one
series' pixels beside the store's: each exam's scored series first, which puts the exam on the worklist,
then its other CT series, kept unscored for the viewer (:meth:`ich.worklist.Worklist.add_other_series`).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd

from ich import dicom, exam, scope
from ich.worklist.store import Worklist, _now, _Prediction

__all__ = ["DEMO_CASES", "DEMO_RUNNING", "DEMO_SEEDED", "IngestReport", "Scorer", "ingest", "seed_demo"]

log = logging.getLogger(__name__)

# What the first-start demo shows: each subtype once (two together, as they often occur) and a clear head.
DEMO_CASES: tuple[tuple[str, ...], ...] = (
    ("subdural",),
    ("intraparenchymal", "intraventricular"),
    ("epidural",),
    ("subarachnoid",),
    (),
)
DEMO_SEEDED = "demo_seeded"  # the store's meta key: when the demo was seeded, or DEMO_RUNNING while it is
DEMO_RUNNING = "running"

Progress = Callable[[float, str], object]  # (fraction done, message); what it returns is ignored (st.progress)


class Scorer(Protocol):
    """What ingest needs of a model: :class:`ich.inference.Predictor` (kept abstract: no torch import here)."""

    thresholds: dict[str, float]
    top_k: int  # the study score's k (ich.inference.study_score), stored with each study it scores

    @property
    def name(self) -> str: ...

    def predict_series(self, series: dicom.Series, progress: Callable[[float], None] | None = None) -> _Prediction: ...


@dataclass
class IngestReport:
    """What one upload did: exams added (worklist ids), files or exams that could not be used, seconds spent.

    ``failed`` holds why each exam whose scoring or storing raised failed (a full disk, a model error):
    worth trying again, unlike an exam with no series to score, which is only a problem line.
    """

    added: list[int] = field(default_factory=list)
    problems: list[dicom.Problem] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _silent(fraction: float, message: str) -> None:
    return None


class _Bar:
    """The share of an upload's slices read and scored, never going back.

    How many slices come is not known before the last series is read, so the files given stand in
    for it (a slice each: exact for DICOM files, as the dashboard and the demo pass them); where
    folders or archives hold more, the slices seen so far do.
    """

    def __init__(self, step: Progress, files: int) -> None:
        self.step, self.files, self.shown = step, files, 0.0

    def show(self, done: float, seen: int, message: str) -> None:
        """``done`` slices' worth of work out of the ``seen`` slices read so far."""
        self.shown = max(self.shown, done / max(self.files, seen, 1))
        self.step(self.shown, message)


def ingest(
    worklist: Worklist,
    predictor: Scorer,
    sources: Sequence[dicom.Source],
    labels: pd.DataFrame | None = None,
    *,
    truth: str = "csv",
    demo: bool = False,
    source: str = "upload",
    progress: Progress | None = None,
    set_aside: Sequence[exam.SeriesChoice] = (),
) -> IngestReport:
    """Read ``sources`` exam by exam, score each exam's chosen series and put the exam on the worklist.

    A file that cannot be read, an exam without a series to score, or one that fails to score or store,
    becomes a problem line (an exam is named by its place in the upload, never by an identifier) and
    the rest still load.
    ``progress(fraction, message)`` runs as each series is read and scored: the fraction is the
    share of the upload's slices done, reading a slice counting as half its work, scoring as the rest.
    ``set_aside``: series of the exam received but never stored (the DICOM listener's, :func:`ich.exam.set_aside`),
    listed with its series (``sources`` then hold one exam).
    """
    start = time.perf_counter()
    report = IngestReport()
    bar = _Bar(progress or _silent, len(sources))
    rule = exam.ExamRule(report.problems, keep_viewable=True, set_aside=set_aside)
    stored: set[str] = set()  # exams on the worklist: their other series are kept for the viewer

    done = 0  # slices of the exams finished
    bar.show(done, done, "Reading files…")
    for series in dicom.iter_series(sources, report.problems, select=rule):
        n, place = len(series), rule.place(series.study_uid)  # its place in the upload, never an identifier
        if not rule.scored(series):
            bar.show(done, done + n, f"Keeping the other series of {place} for the viewer ({n} slices)")
            if series.study_uid in stored:
                _keep_other(worklist, series, place, report)
            done += n
            continue
        message = f"Scoring {place} ({n} slices)"

        def on_batch(fraction: float, done: int = done, n: int = n, message: str = message) -> None:
            bar.show(done + 0.5 * n * (1 + fraction), done + n, message)

        on_batch(0.0)  # read
        series.notes.extend(scope.NOTE_PREFIX + line for line in scope.out_of_scope(series))
        try:
            prediction = predictor.predict_series(series, progress=on_batch)
            report.added.append(
                worklist.add_study(
                    series,
                    prediction,
                    labels,
                    truth=truth,
                    thresholds=predictor.thresholds,
                    model=predictor.name,
                    demo=demo,
                    source=source,
                    exam_series=rule.exams[series.study_uid],
                    top_k=predictor.top_k,
                )
            )
            stored.add(series.study_uid)
        except Exception as exc:  # one bad exam must not sink the upload
            log.exception("%s (%d slices) of an upload could not be added", place, n)
            why = f"{type(exc).__name__}: {exc}"  # not exc: its frames hold the pixels
            report.problems.append(dicom.Problem(f"{place} ({n} slices)", f"could not be added: {why}"))
            report.failed.append(why)
        done += n
        bar.show(done, done, "Reading files…")
    bar.step(1.0, "Done")
    report.seconds = time.perf_counter() - start
    return report


def _keep_other(worklist: Worklist, series: dicom.Series, place: str, report: IngestReport) -> None:
    """Keep an unscored series for the viewer; failing costs only that view (the exam is scored), so it
    is a problem line, not a failed exam."""
    try:
        worklist.add_other_series(series.study_uid, series)
    except Exception as exc:  # noqa: BLE001 - a full disk or an odd geometry: the exam's result stands
        log.warning("a series of %s could not be kept for the viewer (%s)", place, type(exc).__name__)
        report.problems.append(
            dicom.Problem(f"{place}, series {series.slices[0].series_number or '?'}", f"not kept for the viewer: {exc}")
        )


def seed_demo(
    worklist: Worklist,
    predictor: Scorer,
    n: int = len(DEMO_CASES),
    seed: int = 2019,
    size: int | None = None,
    progress: Progress | None = None,
) -> IngestReport | None:
    """Fill an empty worklist, once, with ``n`` synthetic phantom studies and their labels.

    The studies cycle through :data:`DEMO_CASES`, so the demo shows every subtype and a clear
    head; each is on the worklist as soon as it is scored, so readers see the demo fill up. ``size`` is the
    phantom matrix (default 512; tests use small ones). Returns ``None`` when the worklist was seeded before,
    is being seeded, or already holds studies.
    """
    from ich import phantom  # only needed on first start

    step = progress or _silent
    if not _claim_demo(worklist):
        return None
    start = time.perf_counter()
    report = IngestReport()
    try:
        for k in range(n):

            def part(fraction: float, message: str, k: int = k) -> None:
                step((k + fraction) / n, f"study {k + 1} of {n}: {message}")

            part(0.0, "rendering")
            subtypes = DEMO_CASES[k % len(DEMO_CASES)]
            study = phantom.generate_study(
                seed + k, hemorrhage=bool(subtypes), subtypes=subtypes or None, size=size or phantom.MATRIX
            )
            with tempfile.TemporaryDirectory(prefix="ich-demo-") as tmp:
                one = ingest(
                    worklist,
                    predictor,
                    phantom.write_study(study, Path(tmp)),  # a file a slice, so ingest's bar knows how many come
                    study.labels,
                    truth="phantom",
                    demo=True,
                    progress=lambda fraction, _: part(0.5 + 0.5 * fraction, "scoring"),  # rendering takes as long
                )
            report.added += one.added
            report.problems += [dicom.Problem(f"demo study {k + 1}, {p.path}", p.reason) for p in one.problems]
            report.failed += one.failed
    finally:  # a demo that failed half way is not tried again on every start
        worklist.set_meta(DEMO_SEEDED, _now())
    report.seconds = time.perf_counter() - start
    return report


def _claim_demo(worklist: Worklist) -> bool:
    """Whether this caller seeds the demo: the store is marked in one transaction, so of the sessions and
    servers opening a fresh store at once exactly one seeds. A store filled before the demo existed is marked
    seeded."""
    if worklist.claim_meta(DEMO_SEEDED, DEMO_RUNNING, only_if_empty=True):
        return True
    if worklist.get_meta(DEMO_SEEDED) is None:  # refused for its studies: it never needs a demo
        worklist.claim_meta(DEMO_SEEDED, _now())
    return False
