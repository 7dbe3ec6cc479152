"""ich.calibration: Platt scaling fitted on out-of-fold predictions."""

from __future__ import annotations

import numpy as np
import pytest

from ich.calibration import Platt, fit_platt, reliability
from ich.metrics import roc_auc, weighted_log_loss


def overconfident(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.15).astype(float)
    z = 3.0 * (2.0 * y + rng.normal(0, 1, n)) - 1.0  # right ranking, far too sure, base rate too high
    return y, 1 / (1 + np.exp(-z))


def test_platt_lowers_out_of_fold_log_loss_and_keeps_the_ranking():
    y, p = overconfident()
    fit_y, fit_p, test_y, test_p = y[:2000], p[:2000], y[2000:], p[2000:]
    platt = fit_platt(fit_y[:, None], fit_p[:, None])
    calibrated = platt(test_p[:, None])[:, 0]
    assert weighted_log_loss(test_y, calibrated) < 0.6 * weighted_log_loss(test_y, test_p)
    assert roc_auc(test_y, calibrated) == pytest.approx(roc_auc(test_y, test_p))
    assert 0 < platt.a[0] < 1  # over-confident: the temperature goes up
    assert abs(calibrated.mean() - test_y.mean()) < 0.02


def test_platt_skips_unknown_labels_and_degenerate_classes():
    y, p = overconfident(1000)
    labels = np.stack([y, np.full_like(y, -1), np.zeros_like(y)], axis=1)
    labels[::3, 0] = -1
    platt = fit_platt(labels, np.stack([p, p, p], axis=1))
    assert platt.a[1:] == (1.0, 1.0) and platt.b[1:] == (0.0, 0.0)
    constant = fit_platt(y[:, None], np.full((len(y), 1), 0.3))
    assert constant.a == (0.0,) and constant(np.full((2, 1), 0.3))[0, 0] == pytest.approx(y.mean())


def test_platt_json_round_trip_and_identity():
    platt = Platt((0.5, 2.0), (-1.0, 0.25))
    assert Platt.from_json(platt.to_json(["any", "subdural"]), ["any", "subdural"]) == platt
    p = np.array([[0.2, 0.7]])
    np.testing.assert_allclose(Platt((1.0, 1.0), (0.0, 0.0))(p), p)
    with pytest.raises(ValueError, match="unknown calibration"):
        Platt.from_json({"method": "isotonic"}, ["any"])


def test_reliability_bins():
    y = np.array([0, 0, 1, 1, -1])
    p = np.array([0.05, 0.15, 0.95, 0.85, 0.5])
    rows = reliability(y, p, bins=2)
    assert rows == [
        {"low": 0.0, "high": 0.5, "n": 2, "predicted": pytest.approx(0.1), "observed": 0.0},
        {"low": 0.5, "high": 1.0, "n": 2, "predicted": pytest.approx(0.9), "observed": 1.0},
    ]
