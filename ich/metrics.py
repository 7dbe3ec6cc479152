"""Evaluation metrics on numpy arrays (no scikit-learn).

Arrays are ``y_true`` 0/1 labels and ``y_prob`` probabilities, shaped ``(N,)`` for one class or
``(N, C)`` with one column per class. A label below 0 means unknown (a training source that does not
say): that cell counts in no metric. Undefined values (an AUC when a class never or always
occurs, a sensitivity without positives) are ``nan``, never an exception.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ich.labels import DEFAULT_THRESHOLD

__all__ = [
    "RSNA_WEIGHTS",
    "roc_auc",
    "roc_auc_per_class",
    "rsna_weights",
    "weighted_log_loss",
    "accuracy_multi",
    "accuracy",
    "error_rate",
    "sensitivity_specificity",
    "youden_thresholds",
    "mcc_thresholds",
    "threshold_for_sensitivity",
    "bootstrap_auc",
    "wilson_interval",
    "summarize",
]

# Kaggle RSNA 2019 scoring: the "any" column counts twice, each subtype once.
RSNA_WEIGHTS: dict[str, float] = {"any": 2.0}
# One threshold for every class, or one per class.
Thresholds = float | Sequence[float] | np.ndarray
# Clipping as in scikit-learn's log_loss, which the competition used.
LOG_LOSS_EPS = 1e-15


def _as_2d(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    return y[:, None] if y.ndim == 1 else y


def _check(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t, p = _as_2d(y_true), _as_2d(y_prob)
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_prob {p.shape} differ in shape")
    return t, p


def _rank(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start index of each run of equal values, and its length.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    counts = np.diff(np.r_[starts, len(xs)])
    avg = starts + (counts + 1) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, counts)
    return ranks


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve for one class (Mann-Whitney U; a tie counts one half)."""
    t = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    known = t >= 0
    positive, s = t[known] > 0.5, s[known]
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    u = _rank(s)[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc_per_class(y_true: np.ndarray, y_prob: np.ndarray) -> np.ndarray:
    """``(C,)`` AUC of each column."""
    t, p = _check(y_true, y_prob)
    return np.array([roc_auc(t[:, c], p[:, c]) for c in range(t.shape[1])])


def rsna_weights(classes: Sequence[str]) -> np.ndarray:
    """Per-class weights of the RSNA score for ``classes`` (``any`` 2, others 1)."""
    return np.array([RSNA_WEIGHTS.get(c, 1.0) for c in classes])


def weighted_log_loss(
    y_true: np.ndarray, y_prob: np.ndarray, weights: Sequence[float] | np.ndarray | None = None
) -> float:
    """Mean over rows of the weighted mean of per-class binary cross-entropy (the RSNA score).

    ``weights`` defaults to 1 per class; pass ``rsna_weights(classes)`` for the competition score.
    """
    t, p = _check(y_true, y_prob)
    w = np.ones(t.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    p = np.clip(p, LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
    known = t >= 0
    bce = np.where(known, -(t * np.log(p) + (1 - t) * np.log1p(-p)), 0.0)
    # Each row: the weighted mean over its known classes.
    with np.errstate(invalid="ignore", divide="ignore"):
        per_row = (bce @ w) / (known @ w)
    return float(np.nanmean(per_row)) if np.isfinite(per_row).any() else float("nan")


def _thresholds(thresholds: Thresholds, n: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (n,))


def accuracy_multi(y_true: np.ndarray, y_prob: np.ndarray, thresh: Thresholds = DEFAULT_THRESHOLD) -> float:
    """fastai's ``accuracy_multi``: the fraction of all (row, class) cells predicted right.

    fastai applies a sigmoid to logits first; here ``y_prob`` is already a probability.
    """
    t, p = _check(y_true, y_prob)
    pred = p > _thresholds(thresh, t.shape[1])
    known = t >= 0
    return float((pred == (t > 0.5))[known].mean()) if known.any() else float("nan")


def accuracy(y_true: np.ndarray, y_prob: np.ndarray, thresh: float = DEFAULT_THRESHOLD) -> float:
    """Binary accuracy of one class (``(N,)`` or ``(N, 1)``)."""
    t, p = _check(y_true, y_prob)
    if t.shape[1] != 1:
        raise ValueError("accuracy takes one class; use accuracy_multi for several")
    return accuracy_multi(t, p, thresh)


def error_rate(y_true: np.ndarray, y_prob: np.ndarray, thresh: float = DEFAULT_THRESHOLD) -> float:
    """``1 - accuracy`` (fastai's ``error_rate``)."""
    return 1.0 - accuracy(y_true, y_prob, thresh)


def sensitivity_specificity(
    y_true: np.ndarray, y_prob: np.ndarray, thresholds: Thresholds = DEFAULT_THRESHOLD
) -> tuple[np.ndarray, np.ndarray]:
    """``(sensitivity, specificity)``, each ``(C,)``; a prediction is positive when ``prob > threshold``."""
    t, p = _check(y_true, y_prob)
    pos, neg = t > 0.5, (t >= 0) & (t <= 0.5)
    pred = p > _thresholds(thresholds, t.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = (pred & pos).sum(0) / pos.sum(0)
        spec = (~pred & neg).sum(0) / neg.sum(0)
    return sens.astype(np.float64), spec.astype(np.float64)


def _best_thresholds(y_true: np.ndarray, y_prob: np.ndarray, criterion: str, default: float) -> np.ndarray:
    """Per class, the threshold maximising ``criterion`` (``"youden"`` or ``"mcc"``) over the known labels.

    Candidate thresholds sit halfway between consecutive distinct probabilities, so the choice
    does not sit on a validation example. A class with one label value (or one probability) only
    keeps ``default``.
    """
    t, p = _check(y_true, y_prob)
    out = np.full(t.shape[1], default, dtype=np.float64)
    for c in range(t.shape[1]):
        known = t[:, c] >= 0
        pos, prob = t[known, c] > 0.5, p[known, c]
        values = np.unique(prob)
        if pos.all() or not pos.any() or len(values) == 1:
            continue
        cands = np.r_[values[0] - 1e-9, (values[1:] + values[:-1]) / 2]
        pred = prob[None, :] > cands[:, None]
        tp, fp = (pred & pos).sum(1).astype(np.float64), (pred & ~pos).sum(1).astype(np.float64)
        fn, tn = pos.sum() - tp, (~pos).sum() - fp
        if criterion == "youden":
            score = tp / pos.sum() - fp / (~pos).sum()  # sensitivity + specificity - 1
        else:
            with np.errstate(invalid="ignore", divide="ignore"):
                score = np.nan_to_num((tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
        out[c] = float(np.clip(cands[int(np.argmax(score))], 0.0, 1.0))
    return out


def youden_thresholds(y_true: np.ndarray, y_prob: np.ndarray, default: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Per class, the threshold maximising sensitivity + specificity - 1 (Youden's J)."""
    return _best_thresholds(y_true, y_prob, "youden", default)


def mcc_thresholds(y_true: np.ndarray, y_prob: np.ndarray, default: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Per class, the threshold maximising the Matthews correlation between calls and labels.

    Calling everything (or nothing) scores 0, so unlike F1 it does not drift to calling every case
    when a class is common; and unlike Youden's J it weighs false calls against hits, not against the
    far more numerous negatives, so for a rare class it will not buy a few hits with many false calls.
    """
    return _best_thresholds(y_true, y_prob, "mcc", default)


def threshold_for_sensitivity(y_true: np.ndarray, y_score: np.ndarray, sensitivity: float) -> float:
    """The highest threshold at which at least ``sensitivity`` of the positives score above it.

    A prediction is positive when ``score > threshold`` (as in :func:`sensitivity_specificity`),
    so the threshold sits just below the positive score that must still be caught.
    """
    t = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    pos = np.sort(s[t > 0.5])
    if len(pos) == 0:
        raise ValueError("no positive example to set a sensitivity on")
    # Positives at or above index i are caught when the threshold is just below pos[i].
    i = int(np.floor((1 - sensitivity) * len(pos) + 1e-9))
    return float(np.nextafter(pos[min(i, len(pos) - 1)], -np.inf))


def bootstrap_auc(
    y_true: np.ndarray, y_score: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`roc_auc` (cases resampled with replacement).

    ``(nan, nan)`` when the class has fewer than 2 positives or negatives, where no interval means much.
    """
    t = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    known = t >= 0
    t, s = t[known], s[known]
    if (t > 0.5).sum() < 2 or (t <= 0.5).sum() < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = np.array([roc_auc(t[i], s[i]) for i in rng.integers(0, len(t), size=(n, len(t)))])
    draws = draws[np.isfinite(draws)]
    tail = (1 - level) / 2 * 100
    return float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


def summarize(
    y_true: np.ndarray,
    y_prob: np.ndarray,
    classes: Sequence[str],
    thresholds: Thresholds = DEFAULT_THRESHOLD,
) -> dict:
    """Every metric the training table and checkpoint report, as a JSON-ready dict of floats.

    ``accuracy`` / ``error_rate`` are those of the first class (``any`` in RSNA order), which is
    the paper's binary bleed / no-bleed figure in both tasks.
    """
    t, p = _check(y_true, y_prob)
    if t.shape[1] != len(classes):
        raise ValueError(f"{t.shape[1]} columns but {len(classes)} classes")
    thr = _thresholds(thresholds, len(classes))
    auc = roc_auc_per_class(t, p)
    sens, spec = sensitivity_specificity(t, p, thr)
    acc = accuracy_multi(t[:, :1], p[:, :1], thr[0])
    mean_auc = float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")  # nanmean warns on all-NaN
    return {
        "n": int(t.shape[0]),
        "accuracy": acc,
        "error_rate": 1.0 - acc,
        "accuracy_multi": accuracy_multi(t, p, thr),
        "weighted_log_loss": weighted_log_loss(t, p, rsna_weights(classes)),
        "mean_auc": mean_auc,
        "per_class": {
            c: {
                "auc": float(auc[i]),
                "sensitivity": float(sens[i]),
                "specificity": float(spec[i]),
                "prevalence": float((t[:, i][t[:, i] >= 0] > 0.5).mean()) if (t[:, i] >= 0).any() else float("nan"),
                "threshold": float(thr[i]),
            }
            for i, c in enumerate(classes)
        },
    }


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion ``hits / n`` (sound at small ``n`` and near 0 or 1)."""
    if n == 0:
        return float("nan"), float("nan")
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)
