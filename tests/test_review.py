"""ich.review: predicted versus actual findings, per slice and per study, and what a read implies."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from ich import review
from ich.labels import CLASSES, DEFAULT_THRESHOLD, NOT_NAMED


def test_findings_and_agreement():
    thresholds = dict.fromkeys(CLASSES, 0.5)
    pred = review.predicted([0.9, 0.1, 0.7, np.nan, 0.2, 0.6], thresholds)
    assert pred == {"intraparenchymal", "subdural"}
    assert review.describe(pred) == "intraparenchymal, subdural"
    assert review.predicted([0.9, 0.1, 0.1, 0.1, 0.1, 0.1], thresholds) == {"any"}
    assert review.describe(frozenset()) == "no hemorrhage" and review.describe(None) == "not labelled"
    assert review.actual([np.nan] * 6) is None
    assert review.actual([1, 0, 0, 0, 0, 1]) == {"subdural"}


def answers(pred: set[str], truth: set[str] | None) -> list[tuple[str, bool, bool | None, bool | None]]:
    result = review.compare(frozenset(pred), None if truth is None else frozenset(truth))
    return [(a.question, a.predicted, a.actual, a.agrees) for a in result]


def test_compare_question_by_question():
    # The bleed is found, one subtype right and one wrong: hemorrhage agrees, each subtype on its own.
    assert answers({"intraparenchymal", "subdural"}, {"subdural"}) == [
        ("hemorrhage", True, True, True),
        ("intraparenchymal", True, False, False),
        ("subdural", True, True, True),
    ]
    # A truth of "hemorrhage, type not given" decides only the first question.
    assert answers({"subdural"}, {"any"}) == [("hemorrhage", True, True, True), ("subdural", True, None, None)]
    assert answers(set(), {"epidural"}) == [("hemorrhage", False, True, False), ("epidural", False, True, False)]
    assert answers({"any"}, set()) == [("hemorrhage", True, False, False)]
    assert answers(set(), None) == [("hemorrhage", False, None, None)]


def test_study_level_findings():
    probs = np.array([[0.9, 0.1, 0.1, 0.1, 0.1, 0.8], [0.6, 0.1, 0.1, 0.7, 0.1, 0.2]])
    assert review.study_predicted(probs, True) == {"subdural", "intraventricular"}
    assert review.study_predicted(probs, False) == frozenset()
    binary = np.full((3, len(CLASSES)), np.nan)  # a checkpoint that predicts "any" only
    binary[:, 0] = 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no all-NaN RuntimeWarning on every viewer rerun
        assert review.study_predicted(binary, True) == {"any"}
    labels = np.array([[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], float)
    assert review.study_actual(labels) == {"subdural"}
    assert review.study_actual(np.full((2, 6), np.nan)) is None
    assert review.study_actual(labels, review.Read(False)) == frozenset()


def test_thresholds_are_per_class_with_the_default_elsewhere():
    probs = [0.4, 0.1, 0.3, 0.0, 0.0, 0.0]
    assert review.predicted(probs) == frozenset()  # DEFAULT_THRESHOLD for every class
    assert review.predicted(probs, {"any": 0.35, "intraparenchymal": 0.25}) == {"intraparenchymal"}
    assert review.predicted([DEFAULT_THRESHOLD, 0, 0, 0, 0, 0]) == {"any"}  # at the threshold counts


def test_calls_name_subtypes_only_on_slices_called_bleeding():
    thresholds = dict.fromkeys(CLASSES, 0.5)
    probs = np.array(
        [
            [0.9, 0.1, 0.7, 0.2, 0.2, 0.6],  # bleeding: its subtypes over threshold are named
            [0.3, 0.1, 0.7, 0.2, 0.2, 0.6],  # clear: subtypes over threshold are not named
            [np.nan, 0.6, 0.1, 0.1, 0.1, 0.1],  # "any" not predicted: subtypes stand alone
            [0.9, np.nan, np.nan, np.nan, np.nan, np.nan],  # binary checkpoint: never a subtype
        ]
    )
    expected = np.array(
        [
            [1, 0, 1, 0, 0, 1],
            [0, 0, 0, 0, 0, 0],
            [0, 1, 0, 0, 0, 0],
            [1, 0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(review.calls(probs, thresholds), expected)
    assert [review.predicted(row, thresholds) for row in probs] == [
        {"intraparenchymal", "subdural"}, frozenset(), {"epidural"}, {"any"}
    ]  # fmt: skip


def test_a_subtype_the_checkpoint_does_not_name_is_never_called():
    """A NOT_NAMED threshold calls nothing, even at a probability of exactly 1.0 (float32 reaches it)."""
    probs = np.array([[0.9, 1.0, 0.8, 0.0, 0.0, 0.0]])
    thresholds = {"any": 0.5, "epidural": NOT_NAMED, "intraparenchymal": 0.5}
    assert review.predicted(probs[0], thresholds) == {"intraparenchymal"}
    assert review.study_predicted(probs, True, thresholds) == {"intraparenchymal"}


def test_a_read_validates_what_it_says():
    with pytest.raises(ValueError, match="unknown subtypes"):
        review.Read(True, ("chronic",))
    with pytest.raises(ValueError, match="cannot name subtypes"):
        review.Read(False, ("subdural",))
    with pytest.raises(ValueError, match="needs marked slices"):
        review.Read(True, others_clear=True)
    assert review.Read(True).findings == {"any"}
    assert review.Read(True, ("subdural", "epidural")).findings == {"subdural", "epidural"}


def test_read_truth_per_slice():
    clear = review.read_truth(review.Read(False), 3)
    assert (clear == 0).all()
    subdural = CLASSES.index("subdural")
    # Key slices only: the slices not marked are not assessed (NaN), not declared clear.
    keys = review.read_truth(review.Read(True, ("subdural",), slice_marks=(1, 7)), 3)  # 7 is past the end
    assert keys[1, 0] == 1 and keys[1, subdural] == 1 and keys[1].sum() == 2  # "any" and the one subtype named
    assert np.isnan(keys[[0, 2]]).all()
    everything = review.read_truth(review.Read(True, ("subdural",), slice_marks=(1,), others_clear=True), 3)
    assert (everything[[0, 2]] == 0).all() and everything[1].sum() == 2
    unmarked = review.read_truth(review.Read(True, ("subdural",)), 3)
    assert np.isnan(unmarked).all()  # a read without marks says nothing about single slices


def test_no_subtype_is_named_on_a_slice_not_called_bleeding():
    low_subtype_thresholds = {"any": 0.5, "epidural": 0.003, "subdural": 0.08}
    assert review.predicted([0.33, 0.01, 0.0, 0.0, 0.0, 0.2], low_subtype_thresholds) == frozenset()
    assert review.predicted([0.6, 0.01, 0.0, 0.0, 0.0, 0.2], low_subtype_thresholds) == {"epidural", "subdural"}
    binary_free = [np.nan, 0.01, 0.0, 0.0, 0.0, 0.9]  # a checkpoint without "any": subtypes stand alone
    assert review.predicted(binary_free, low_subtype_thresholds) == {"epidural", "subdural"}
