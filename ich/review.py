"""Predicted vs actual findings, and a radiologist's read turned into per-slice truth.

A *finding set* is what a slice (or study) is said to show: the subtypes called positive, or
``{"any"}`` for "hemorrhage, type not given", or the empty set for "no hemorrhage". The same sets
describe the model's call (probabilities against the checkpoint's thresholds) and the truth (label
CSV, phantom labels or a radiologist's read), so the viewer can print both and compare them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ich.labels import CLASSES, DEFAULT_THRESHOLD, NOT_NAMED, SUBTYPES

__all__ = [
    "DEFAULT_THRESHOLD",
    "Read",
    "calls",
    "predicted",
    "actual",
    "study_predicted",
    "study_actual",
    "describe",
    "Answer",
    "compare",
    "read_truth",
]

_ANY = CLASSES.index("any")


@dataclass(frozen=True)
class Read:
    """A radiologist's read of one study. ``slice_marks`` are 0-based slice indices showing blood."""

    hemorrhage: bool
    subtypes: tuple[str, ...] = ()
    slice_marks: tuple[int, ...] = ()  # key slices: where the reader saw blood
    created: str = ""
    others_clear: bool = False  # the reader says every slice not marked is clear (else: not assessed)

    def __post_init__(self) -> None:
        unknown = set(self.subtypes) - set(SUBTYPES)
        if unknown:
            raise ValueError(f"unknown subtypes {sorted(unknown)}; choose from {', '.join(SUBTYPES)}")
        if not self.hemorrhage and (self.subtypes or self.slice_marks):
            raise ValueError("a read without hemorrhage cannot name subtypes or mark slices")
        if self.others_clear and not self.slice_marks:
            raise ValueError("'all other slices clear' needs marked slices")

    @property
    def findings(self) -> frozenset[str]:
        if not self.hemorrhage:
            return frozenset()
        return frozenset(self.subtypes) or frozenset({"any"})


def _from_positive(positive: Iterable[str]) -> frozenset[str]:
    positive = set(positive)
    subtypes = positive & set(SUBTYPES)
    return frozenset(subtypes) if subtypes else frozenset(positive & {"any"})


def calls(probs: np.ndarray, thresholds: Mapping[str, float] | None = None) -> np.ndarray:
    """Which classes each probability row (``(N, len(CLASSES))``) calls positive, as booleans.

    NaN (not predicted) is never called, nor a class whose threshold is :data:`~ich.labels.NOT_NAMED`.
    Subtypes are called only where "any" is called too (or not predicted): the subtype thresholds
    are chosen among bleeding slices (to tell subtypes apart), so alone they would name a subtype on
    a slice called clear.
    """
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(CLASSES))
    thresholds = thresholds or {}
    cut = np.array([thresholds.get(c, DEFAULT_THRESHOLD) for c in CLASSES])
    with np.errstate(invalid="ignore"):
        called = (probs >= cut) & (cut < NOT_NAMED)  # NaN compares False
    bleeding = called[:, _ANY] | np.isnan(probs[:, _ANY])
    called[:, [i for i in range(len(CLASSES)) if i != _ANY]] &= bleeding[:, None]
    return called


def predicted(probs: Sequence[float], thresholds: Mapping[str, float] | None = None) -> frozenset[str]:
    """The finding set of one probability row (``CLASSES`` order): the classes :func:`calls` names."""
    return _from_positive(c for c, on in zip(CLASSES, calls(np.asarray(probs), thresholds)[0]) if on)


def actual(labels: Sequence[float]) -> frozenset[str] | None:
    """The truth of a label row (``CLASSES`` order, 0/1); ``None`` when the slice is unlabelled."""
    values = np.asarray(labels, dtype=np.float64)
    if np.isnan(values).all():
        return None
    return _from_positive(c for c, y in zip(CLASSES, values) if y >= 0.5)


def study_predicted(probs: np.ndarray, flagged: bool, thresholds: Mapping[str, float] | None = None) -> frozenset[str]:
    """The study's call: nothing unless flagged, else every subtype that crosses its threshold on some slice."""
    if not flagged:
        return frozenset()
    # fmax skips NaN (a class the checkpoint does not predict) without nanmax's all-NaN warning.
    peaks = np.fmax.reduce(np.asarray(probs, dtype=np.float64).reshape(-1, len(CLASSES)), axis=0, initial=np.nan)
    calls = predicted(peaks, thresholds) - {"any"}
    return calls or frozenset({"any"})


def study_actual(labels: np.ndarray, read: Read | None = None) -> frozenset[str] | None:
    """The study's truth: the latest read if there is one, else the union over labelled slices."""
    if read is not None:
        return read.findings
    rows = [r for r in (actual(row) for row in np.asarray(labels, dtype=np.float64)) if r is not None]
    if not rows:
        return None
    union: frozenset[str] = frozenset().union(*rows)
    return union - {"any"} if union - {"any"} else union


def describe(findings: frozenset[str] | None) -> str:
    """Words for a finding set, subtypes in ``CLASSES`` order."""
    if findings is None:
        return "not labelled"
    if not findings:
        return "no hemorrhage"
    if findings == {"any"}:
        return "hemorrhage, type not given"
    return ", ".join(c for c in SUBTYPES if c in findings)


@dataclass(frozen=True)
class Answer:
    """One question of a comparison: the model's answer and the truth's (``None``: the truth does not say)."""

    question: str  # "hemorrhage" or a subtype
    predicted: bool
    actual: bool | None

    @property
    def agrees(self) -> bool | None:
        return None if self.actual is None else self.predicted == self.actual


def compare(pred: frozenset[str], truth: frozenset[str] | None) -> list[Answer]:
    """Predicted against actual, question by question: hemorrhage yes/no first, then each subtype either names.

    A truth of hemorrhage without a type ("any") answers the first question only: its subtypes are
    unknown, not wrong.
    """
    answers = [Answer("hemorrhage", bool(pred), None if truth is None else bool(truth))]
    typed = truth is not None and bool(truth - {"any"})
    for subtype in SUBTYPES:
        actual = (subtype in truth) if truth is not None and (typed or not truth) else None
        if subtype in pred or actual:
            answers.append(Answer(subtype, subtype in pred, actual))
    return answers


def read_truth(read: Read, n_slices: int) -> np.ndarray:
    """Per-slice labels ``(N, len(CLASSES))`` implied by a read; NaN rows where it says nothing.

    "No hemorrhage" makes every slice negative. Marked (key) slices carry "any" plus the read's
    subtypes; the others are negative only when the reader said all other slices are clear, else
    they stay NaN (not assessed). A hemorrhage read without marks says nothing about single slices.
    """
    truth = np.full((n_slices, len(CLASSES)), np.nan, dtype=np.float32)
    if not read.hemorrhage:
        truth[:] = 0
    elif read.slice_marks:
        if read.others_clear:
            truth[:] = 0
        marks = [i for i in read.slice_marks if 0 <= i < n_slices]
        truth[marks] = 0
        truth[marks, _ANY] = 1
        for subtype in read.subtypes:
            truth[marks, CLASSES.index(subtype)] = 1
    return truth
