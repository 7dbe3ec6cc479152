"""Probability calibration: per-class Platt scaling fitted on out-of-fold predictions.

A network trained from scratch on a mix of sources is over-confident, and its base rates follow
the training mix (58 % of PHE-SICH slices bleed, 15 % of RSNA's), not a worklist's. Platt scaling
maps each class's logit ``z`` to ``sigmoid(a * z + b)``: ``a`` is an inverse temperature, ``b``
moves the base rate. Both are fitted by maximum likelihood on predictions the model made for
slices it never trained on, so the shipped probabilities mean what they say on such data. The
map is monotone: it changes no AUC and no ranking, only the numbers shown and thresholded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Platt", "fit_platt", "logit", "reliability", "PROB_EPS"]

# Probabilities are clipped here before taking logits, as in the log loss.
PROB_EPS = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), PROB_EPS, 1 - PROB_EPS)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class Platt:
    """``sigmoid(a * z + b)`` per class; ``a = 1, b = 0`` is the identity."""

    a: tuple[float, ...]
    b: tuple[float, ...]

    def apply_logits(self, z: np.ndarray) -> np.ndarray:
        """Calibrated probabilities ``(N, C)`` from raw logits ``(N, C)``."""
        scaled = np.asarray(z, dtype=np.float64) * np.asarray(self.a) + np.asarray(self.b)
        return 0.5 * (1.0 + np.tanh(0.5 * scaled))  # the logistic function, without overflow

    def __call__(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probabilities from raw probabilities ``(N, C)``."""
        return self.apply_logits(logit(p))

    def to_json(self, classes: Sequence[str]) -> dict:
        return {"method": "platt", "a": dict(zip(classes, self.a)), "b": dict(zip(classes, self.b))}

    @classmethod
    def from_json(cls, data: dict, classes: Sequence[str]) -> Platt:
        if data.get("method") != "platt":
            raise ValueError(f"unknown calibration method {data.get('method')!r}")
        return cls(tuple(float(data["a"][c]) for c in classes), tuple(float(data["b"][c]) for c in classes))


def _nll(z: np.ndarray, y: np.ndarray, a: float, b: float) -> float:
    s = a * z + b
    return float(np.sum(np.logaddexp(0.0, s) - y * s))


def _fit_one(z: np.ndarray, y: np.ndarray, iterations: int = 100) -> tuple[float, float]:
    """Damped Newton on the (convex) logistic log-likelihood of ``y ~ sigmoid(a z + b)``.

    Constant scores leave only the base rate to fit (``a = 0``); each step is halved until the
    likelihood improves, so separable or degenerate data cannot send ``a`` to infinity in one jump.
    """
    rate = float(np.clip(y.mean(), PROB_EPS, 1 - PROB_EPS))
    if np.ptp(z) < 1e-8:
        return 0.0, float(np.log(rate) - np.log1p(-rate))
    a, b = 1.0, 0.0
    x = np.stack([z, np.ones_like(z)], axis=1)
    loss = _nll(z, y, a, b)
    for _ in range(iterations):
        p = 0.5 * (1.0 + np.tanh(0.5 * (a * z + b)))  # the logistic function, without overflow
        grad = x.T @ (p - y)
        hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6 and (new := _nll(z, y, a - scale * step[0], b - scale * step[1])) > loss:
            scale /= 2
        if scale <= 1e-6:
            break
        a, b, improvement, loss = a - scale * step[0], b - scale * step[1], loss - new, new
        if improvement < 1e-10 * max(loss, 1.0):
            break
    return float(a), float(b)


def fit_platt(y_true: np.ndarray, y_prob: np.ndarray) -> Platt:
    """Per-class Platt scaling from labels and raw probabilities ``(N, C)``.

    Unknown labels (below 0) are left out. A class with only one label value keeps the identity.
    """
    t = np.asarray(y_true, dtype=np.float64)
    z = logit(y_prob)
    if t.ndim == 1:
        t, z = t[:, None], z[:, None]
    a, b = [], []
    for c in range(t.shape[1]):
        known = t[:, c] >= 0
        yc, zc = t[known, c], z[known, c]
        if len(yc) == 0 or yc.min() == yc.max():
            a.append(1.0)
            b.append(0.0)
            continue
        ac, bc = _fit_one(zc, yc)
        a.append(ac)
        b.append(bc)
    return Platt(tuple(a), tuple(b))


def reliability(y_true: np.ndarray, y_prob: np.ndarray, bins: int = 10) -> list[dict]:
    """Reliability table of one class: per equal-width probability bin, its count, mean prediction and observed rate.

    Empty bins are left out; unknown labels (below 0) are ignored.
    """
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    known = t >= 0
    t, p = t[known], p[known]
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        if inside.any():
            rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "n": int(inside.sum()),
                         "predicted": float(p[inside].mean()), "observed": float((t[inside] > 0.5).mean())})  # fmt: skip
    return rows
