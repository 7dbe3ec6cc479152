"""The study score and the flag threshold, chosen on out-of-fold slice predictions.

The training sets hold single slices, not series (``rsna-png`` has no series at all), so
series-level behaviour is estimated on *simulated* series: a clear series is ``L`` slices drawn
from the out-of-fold clear slices, a bleeding one ``k`` out-of-fold bleeding slices plus ``L - k``
clear ones. ``L`` is drawn from the RSNA series lengths (28-44 slices) and ``k`` from the number of
hematoma slices per patient in PHE-SICH (training labels, not test data). Slices are drawn
independently, which real series are not: the card says so, and the real series of ``rsna-sample``
check the result.

The aggregation (mean of the top ``k`` slice probabilities) with the best simulated series AUC is
chosen, then the highest threshold that flags at least :data:`TARGET_SENSITIVITY` of simulated
bleeding series.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ich.inference import study_score
from ich.metrics import roc_auc, sensitivity_specificity, threshold_for_sensitivity

__all__ = [
    "TARGET_SENSITIVITY",
    "SERIES_LENGTHS",
    "TOP_K_CHOICES",
    "SeriesChoice",
    "simulate_series",
    "choose_series_rule",
]

TARGET_SENSITIVITY = 0.95
SERIES_LENGTHS = (28, 44)  # slices per RSNA 2019 series (data README)
TOP_K_CHOICES = (1, 2, 3)


@dataclass(frozen=True)
class SeriesChoice:
    top_k: int
    threshold: float
    sensitivity: float
    specificity: float
    auc_by_k: dict[int, float]
    n_series: int


def simulate_series(
    y_any: np.ndarray, p_any: np.ndarray, bleed_counts: Sequence[int], n_series: int = 2000, seed: int = 0
) -> tuple[list[np.ndarray], np.ndarray]:
    """``(slice probabilities per series, truth per series)``: half bleeding, half clear."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y_any) > 0.5
    p = np.asarray(p_any, dtype=np.float64)
    pos, neg = p[y], p[~y]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("series simulation needs both bleeding and clear slices")
    counts = np.asarray(bleed_counts, dtype=np.int64)
    series, truth = [], np.zeros(n_series)
    for i in range(n_series):
        length = int(rng.integers(SERIES_LENGTHS[0], SERIES_LENGTHS[1] + 1))
        k = int(min(rng.choice(counts), length)) if i % 2 == 0 else 0
        truth[i] = float(k > 0)
        series.append(np.concatenate([rng.choice(pos, k), rng.choice(neg, length - k)]))
    return series, truth


def choose_series_rule(
    y_any: np.ndarray, p_any: np.ndarray, bleed_counts: Sequence[int], n_series: int = 2000, seed: int = 0
) -> SeriesChoice:
    """Best top-``k`` aggregation by simulated series AUC, then its threshold for the target sensitivity."""
    series, truth = simulate_series(y_any, p_any, bleed_counts, n_series, seed)
    scores = {k: np.array([study_score(s, k) for s in series]) for k in TOP_K_CHOICES}
    aucs = {k: roc_auc(truth, scores[k]) for k in TOP_K_CHOICES}
    best = max(TOP_K_CHOICES, key=lambda k: (round(aucs[k], 4), -k))  # ties: the simpler (smaller) k
    threshold = threshold_for_sensitivity(truth, scores[best], TARGET_SENSITIVITY)
    sens, spec = sensitivity_specificity(truth, scores[best], threshold)
    return SeriesChoice(best, threshold, float(sens[0]), float(spec[0]), aucs, n_series)
