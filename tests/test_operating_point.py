"""train.operating_point: the study score and flag threshold from simulated series."""

from __future__ import annotations

import numpy as np

from train.operating_point import SERIES_LENGTHS, TARGET_SENSITIVITY, choose_series_rule, simulate_series


def slices(seed=0, n=3000):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.15).astype(float)
    return y, np.clip(0.6 * y + rng.normal(0.2, 0.15, n), 0, 1)


def test_simulated_series_have_the_asked_bleed_counts():
    y, p = slices()
    series, truth = simulate_series(y, p, [3], n_series=200)
    assert truth.tolist() == [1.0, 0.0] * 100
    assert all(SERIES_LENGTHS[0] <= len(s) <= SERIES_LENGTHS[1] for s in series)
    assert np.isin(series[0][:3], p[y == 1]).all()  # three bleeding slices, drawn from the bleeding ones


def test_choice_reaches_the_target_sensitivity():
    y, p = slices()
    choice = choose_series_rule(y, p, [1, 2, 6, 10], n_series=600)
    assert choice.top_k in (1, 2, 3) and choice.auc_by_k[choice.top_k] == max(choice.auc_by_k.values())
    assert choice.sensitivity >= TARGET_SENSITIVITY and 0 < choice.threshold < 1
    # One bleeding slice in a series: only the highest slice can carry it.
    assert choose_series_rule(y, p, [1], n_series=600).top_k == 1
