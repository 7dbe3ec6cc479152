"""ich.metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ich import metrics as m


def test_roc_auc_simple_and_with_ties():
    # Positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of 4 pairs ordered right.
    assert m.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # Pairs (pos, neg): (0.5, 0.5) tie = 1/2, (0.5, 0.2), (0.9, 0.5), (0.9, 0.2) = 1 each -> 3.5 / 4.
    assert m.roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert m.roc_auc([1, 0, 1, 0], [0.3, 0.3, 0.3, 0.3]) == pytest.approx(0.5)
    assert m.roc_auc([0, 1], [0.9, 0.1]) == 0.0


def test_roc_auc_undefined_for_one_label_value():
    assert math.isnan(m.roc_auc([1, 1, 1], [0.1, 0.5, 0.9]))
    auc = m.roc_auc_per_class([[1, 0], [0, 0]], [[0.9, 0.2], [0.1, 0.3]])
    assert auc[0] == 1.0 and math.isnan(auc[1])


def test_weighted_log_loss_rsna_weights():
    w = m.rsna_weights(["any", "epidural"])
    assert w.tolist() == [2.0, 1.0]
    # (2 * -ln 0.8 + -ln 0.9) / 3
    expected = (2 * -math.log(0.8) - math.log(0.9)) / 3
    assert m.weighted_log_loss([[1, 0]], [[0.8, 0.1]], w) == pytest.approx(expected)
    # Mean over rows; unweighted is the plain mean BCE.
    two = m.weighted_log_loss([[1, 0], [0, 0]], [[0.8, 0.1], [0.5, 0.5]])
    assert two == pytest.approx(((-math.log(0.8) - math.log(0.9)) / 2 + math.log(2)) / 2)


def test_log_loss_clips_certain_mistakes():
    loss = m.weighted_log_loss([1, 0], [0.0, 1.0])
    assert math.isfinite(loss) and loss == pytest.approx(-math.log(m.LOG_LOSS_EPS), rel=1e-4)


def test_accuracy_multi_is_mean_over_all_cells():
    y = [[1, 0], [0, 1]]
    p = [[0.7, 0.6], [0.2, 0.4]]
    assert m.accuracy_multi(y, p) == 0.5  # predictions [[1, 1], [0, 0]]: 2 of 4 cells right
    assert m.accuracy_multi(y, p, [0.5, 0.3]) == 0.75  # [[1, 1], [0, 1]]


def test_accuracy_and_error_rate_binary():
    assert m.accuracy([1, 0, 1, 0], [0.9, 0.2, 0.4, 0.6]) == 0.5
    assert m.error_rate([1, 0, 1, 0], [0.9, 0.2, 0.6, 0.4]) == 0.0
    with pytest.raises(ValueError):
        m.accuracy([[1, 0]], [[0.5, 0.5]])


def test_sensitivity_specificity():
    sens, spec = m.sensitivity_specificity([1, 1, 0, 0, 0], [0.9, 0.4, 0.6, 0.1, 0.2])
    assert sens[0] == 0.5 and spec[0] == pytest.approx(2 / 3)
    sens, spec = m.sensitivity_specificity([[1, 0], [1, 0]], [[0.9, 0.1], [0.8, 0.9]], [0.5, 0.5])
    assert sens[0] == 1.0 and math.isnan(sens[1]) and math.isnan(spec[0]) and spec[1] == 0.5


def test_youden_threshold_separates_and_defaults():
    thr = m.youden_thresholds([[0, 1], [0, 1], [1, 1], [1, 1]], [[0.1, 0.3], [0.2, 0.4], [0.7, 0.5], [0.8, 0.6]])
    assert 0.2 < thr[0] < 0.7  # any cut between the classes gives J = 1
    assert thr[1] == 0.5  # one label value only: default kept


def test_mcc_threshold_neither_buys_rare_hits_with_false_calls_nor_calls_everything():
    """Rare: 3 positives (0.95, 0.30, 0.25) among 20 low and 10 mid scores (0.40-0.85): Youden's J calls
    all three and 10 false ones (J 0.67); the Matthews correlation calls only the top one (0.56 vs 0.39).
    Common: 10 positives, 4 on top and 6 among 10 negatives: calling everything has the best F1 (0.67)
    and tells nothing; the Matthews correlation calls the top 4 (0.5; calling everything scores 0)."""
    prob = np.r_[0.95, 0.30, 0.25, np.linspace(0.01, 0.2, 20), np.linspace(0.40, 0.85, 10)]
    y = (np.arange(len(prob)) < 3).astype(int)
    assert m.youden_thresholds(y, prob)[0] < 0.25
    assert 0.85 < m.mcc_thresholds(y, prob)[0] < 0.95
    prob = np.r_[0.9, 0.85, 0.8, 0.75, np.linspace(0.1, 0.35, 6), np.linspace(0.05, 0.5, 10)]
    y = (np.arange(len(prob)) < 10).astype(int)
    assert 0.5 < m.mcc_thresholds(y, prob)[0] < 0.75
    assert m.mcc_thresholds([[1], [1]], [[0.2], [0.9]])[0] == 0.5  # one label value only: default kept


def test_summarize_reports_everything():
    classes = ["any", "epidural"]
    y = np.array([[1, 1], [1, 0], [0, 0], [0, 0]])
    p = np.array([[0.9, 0.8], [0.6, 0.3], [0.4, 0.1], [0.2, 0.6]])
    s = m.summarize(y, p, classes, 0.5)
    assert s["n"] == 4
    assert s["accuracy"] == 1.0 and s["error_rate"] == 0.0
    assert s["accuracy_multi"] == 7 / 8
    assert s["per_class"]["any"]["auc"] == 1.0
    assert s["per_class"]["epidural"]["specificity"] == pytest.approx(2 / 3)
    assert s["per_class"]["epidural"]["prevalence"] == 0.25
    assert s["mean_auc"] == pytest.approx(1.0)
    assert s["weighted_log_loss"] == pytest.approx(m.weighted_log_loss(y, p, [2, 1]))
    with pytest.raises(ValueError):
        m.summarize(y, p, ["any"])


def test_unknown_labels_count_nowhere():
    y = np.array([[1, 1], [0, -1], [1, -1], [0, 0]], dtype=float)
    p = np.array([[0.9, 0.8], [0.2, 0.9], [0.7, 0.9], [0.1, 0.1]])
    assert m.roc_auc(y[:, 1], p[:, 1]) == 1.0  # the two unknown rows would make it 0.5 if read as 0
    sens, spec = m.sensitivity_specificity(y, p, 0.5)
    assert sens.tolist() == [1.0, 1.0] and spec.tolist() == [1.0, 1.0]
    s = m.summarize(y, p, ["any", "subdural"])
    assert s["per_class"]["subdural"]["prevalence"] == 0.5 and s["accuracy_multi"] == 1.0
    known_only = m.weighted_log_loss(y[[0, 3]], p[[0, 3]])
    assert m.weighted_log_loss(y, p) != known_only  # rows 1, 2 still count for "any"
    assert np.isfinite(m.weighted_log_loss(y, p))


def test_bootstrap_interval_brackets_the_auc():
    rng = np.random.default_rng(1)
    y = rng.random(500) < 0.2
    s = y + rng.normal(0, 1, 500)
    lo, hi = m.bootstrap_auc(y, s, n=300)
    assert lo < m.roc_auc(y, s) < hi and hi - lo < 0.2
    assert all(np.isnan(m.bootstrap_auc([1, 0, 0], [0.2, 0.1, 0.3])))


def test_threshold_for_sensitivity_catches_the_share_asked_for():
    y = np.array([1] * 20 + [0] * 20)
    s = np.r_[np.linspace(0.5, 1.0, 20), np.linspace(0.0, 0.6, 20)]
    t = m.threshold_for_sensitivity(y, s, 0.95)
    sens, _ = m.sensitivity_specificity(y, s, t)
    assert sens[0] >= 0.95 and (s[y == 1] > t).sum() == 19  # the 19 highest of 20, not all 20
    assert m.threshold_for_sensitivity(y, s, 1.0) < 0.5


def test_wilson_interval():
    from ich.metrics import wilson_interval

    low, high = wilson_interval(2, 26)
    assert 0.02 < low < 0.03 and 0.24 < high < 0.25  # 2 of 26, as the PhysioNet pointing game
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson_interval(10, 10)[1] == pytest.approx(
        1.0
    )
    assert np.isnan(wilson_interval(0, 0)[0])
