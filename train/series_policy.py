"""The study score, the flag threshold and the subtype thresholds, chosen on real complete series.

The out-of-fold slices of :mod:`train.bundle` are single slices; series simulated from them
(:mod:`train.operating_point`) draw slices independently, and on real series the flag chosen that way
missed its sensitivity aim. This module chooses the same product rule on real scans instead:

- study score: the mean of the ``k`` highest slice 'any' probabilities (:func:`ich.inference.study_score`,
  a thin series' slabs counted once), ``k`` in :data:`TOP_K_CHOICES` with the best series AUC (ties: the
  smaller ``k``);
- flag (:func:`margin_threshold`): at least :data:`TARGET_SENSITIVITY` of the bleeding series flagged,
  the threshold halfway between the lowest series score that must be flagged and the highest series score
  (of any series) below it (half that score where none is below). The same series are flagged as at the
  highest such threshold, but none sits on the threshold: the highest one lies one float step under a
  bleeding series' score, and another engine, a GPU or float16 rounding that lowers the score by 1e-7
  un-flags that series;
- subtypes (:func:`naming_threshold`): on real bleeding slices, the cut with the best Matthews
  correlation among those at or above :data:`NAMING_FLOOR` (a calibrated probability a reader would not
  call negligible) where most slices named carry the subtype (precision at least :data:`NAMING_PRECISION`:
  it is named where it is the likely one) and the correlation is above 0; none: not named (:data:`~ich.labels.NOT_NAMED`).

Its honest numbers are cross-validated: the whole choice (``k``, threshold, subtype cuts) is refitted
without each patient and applied to that patient's series (leave one patient out; every real set here
has one series per patient). Intervals: Wilson for sensitivity and specificity, bootstrap over series
for the AUC. A percentile bootstrap over series is reported beside Wilson's (``ci_bootstrap``) to show
why it is not the one quoted: with 20 bleeding series, 19 caught, every resample catches at most all of
them, so its upper bound is 1.00 and its lower bound is narrower than the data support.

    python -m train.bundle --series-policy     # refit on ../shared/data, rewrite weights/ and the card
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ich import evaluate, review
from ich.inference import Predictor, aggregation_text, study_score
from ich.labels import CLASSES, NOT_NAMED, SUBTYPES
from ich.metrics import bootstrap_auc, roc_auc, threshold_for_sensitivity, wilson_interval
from train.operating_point import TARGET_SENSITIVITY

__all__ = [
    "REAL_SETS",
    "TOP_K_CHOICES",
    "NAMING_FLOOR",
    "NAMING_PRECISION",
    "SeriesRule",
    "score_real_sets",
    "series_scores",
    "margin_threshold",
    "choose_rule",
    "naming_threshold",
    "naming_thresholds",
    "cross_validate",
    "fit",
    "available",
    "policy_text",
]

REAL_SETS = ("physionet-series", "rsna-sample")  # complete series with slice labels, never trained on
TOP_K_CHOICES = (1, 2, 3, 4, 5, 6, 8)
NAMING_FLOOR = 0.10  # below one in ten, a named subtype would read as a finding at a probability a reader ignores
NAMING_PRECISION = 0.5  # named where most slices it is named on carry it
TRUE = "_true"  # suffix of the label columns beside the probabilities


@dataclass(frozen=True)
class SeriesRule:
    top_k: int
    threshold: float
    auc_by_k: dict[int, float]

    def flags(self, scores: pd.DataFrame) -> pd.Series:
        """Flagged as the worklist flags: score at or above the threshold."""
        return scores[self.top_k] >= self.threshold


def score_real_sets(predictor: Predictor, shared: Path) -> pd.DataFrame:
    """Every slice of the :data:`REAL_SETS` found in ``shared``, scored as ``ich evaluate`` scores it.

    One row per slice: ``set``, ``series``, ``slab``, the probabilities (:data:`CLASSES`) and the labels
    (``<class>_true``).
    """
    frames = []
    for name in REAL_SETS:
        folder = shared / name
        if not folder.is_dir():
            continue
        result = evaluate.score_folder(predictor, folder, progress=False, every_series=True)
        labels = evaluate.load_labels(folder)
        frame = result.frame.join(labels.add_suffix(TRUE), how="inner")
        uid = frame["series_uid"].astype(str).str.removeprefix(f"{name}:")  # a series.csv's names carry the set's
        frames.append(frame.assign(set=name, series=f"{name}:" + uid))
    if not frames:
        raise SystemExit(f"no real series sets ({', '.join(REAL_SETS)}) in {shared}")
    return pd.concat(frames)


def series_scores(frame: pd.DataFrame, ks: tuple[int, ...] = TOP_K_CHOICES) -> pd.DataFrame:
    """Per series: ``set``, ``truth`` (any slice bleeding) and the study score for each ``k`` (columns ``k``)."""
    rows = {}
    for series, g in frame.groupby("series", sort=True):
        probs = g.drop_duplicates("slab")["any"].to_numpy()  # a thin series' slab counts once, as the worklist's
        rows[series] = {"set": g["set"].iloc[0], "truth": int(g["any" + TRUE].max() > 0)} | {
            k: study_score(probs, k) for k in ks
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def margin_threshold(truth: np.ndarray, score: np.ndarray, target: float = TARGET_SENSITIVITY) -> float:
    """The flag threshold for ``target`` series sensitivity, with a margin (module docstring).

    The lowest bleeding score that must be flagged is the one :func:`ich.metrics.threshold_for_sensitivity`
    sits one float step under; the threshold is the midpoint between it and the highest series score
    below it, bleeding or clear (half of it when no series scores lower). A series is flagged at
    ``score >= threshold``, so the series flagged are those the highest threshold flags.
    """
    s = np.asarray(score, dtype=np.float64).ravel()
    lowest_caught = float(np.nextafter(threshold_for_sensitivity(truth, s, target), np.inf))
    below = s[s < lowest_caught]
    return (lowest_caught + float(below.max())) / 2 if len(below) else lowest_caught / 2


def choose_rule(scores: pd.DataFrame, target: float = TARGET_SENSITIVITY) -> SeriesRule:
    """The ``k`` with the best series AUC (ties to 3 decimals: the smaller), then its threshold for ``target``
    (:func:`margin_threshold`)."""
    ks = [c for c in scores.columns if isinstance(c, int)]
    aucs = {k: roc_auc(scores["truth"], scores[k]) for k in ks}
    best = max(ks, key=lambda k: (round(aucs[k], 3), -k))
    return SeriesRule(best, margin_threshold(scores["truth"], scores[best], target), aucs)


def naming_threshold(carries: np.ndarray, prob: np.ndarray) -> float:
    """The cut for one subtype on bleeding slices (module docstring); :data:`NOT_NAMED` when none qualifies."""
    carries = np.asarray(carries) > 0.5
    prob = np.asarray(prob, dtype=np.float64)
    cuts = np.unique(prob[prob >= NAMING_FLOOR])
    if not carries.any() or len(cuts) == 0:
        return NOT_NAMED
    named = prob[None, :] >= cuts[:, None]
    tp = (named & carries).sum(1).astype(np.float64)
    fp = (named & ~carries).sum(1).astype(np.float64)
    fn, tn = carries.sum() - tp, (~carries).sum() - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        mcc = np.nan_to_num((tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    mcc[tp / (tp + fp) < NAMING_PRECISION] = -np.inf
    best = int(np.argmax(mcc))
    return float(cuts[best]) if mcc[best] > 0 else NOT_NAMED  # 0: naming it says nothing about the slice


def naming_thresholds(frame: pd.DataFrame) -> dict[str, float]:
    """:func:`naming_threshold` per subtype, on the labelled bleeding slices of ``frame``."""
    bleeding = frame[frame["any" + TRUE] > 0]
    return {c: naming_threshold(bleeding[c + TRUE].to_numpy(), bleeding[c].to_numpy()) for c in SUBTYPES}


def _calls(frame: pd.DataFrame, thresholds: Mapping[str, float]) -> pd.DataFrame:
    """What a reader sees named on each slice (:func:`ich.review.calls`)."""
    return pd.DataFrame(
        review.calls(frame[list(CLASSES)].to_numpy(), thresholds), index=frame.index, columns=list(CLASSES)
    )


def cross_validate(frame: pd.DataFrame, scores: pd.DataFrame) -> tuple[pd.Series, pd.DataFrame]:
    """``(flags per series, calls per slice)``, each made by the rule fitted without that series' patient.

    Every real set here has one series per patient, so leaving one series out leaves its patient out.
    """
    flags = pd.Series(False, index=scores.index)
    calls = []
    for series in scores.index:
        rule = choose_rule(scores.drop(index=series))
        held_out = frame["series"] == series
        thresholds = {"any": rule.threshold} | naming_thresholds(frame[~held_out])
        flags[series] = bool(rule.flags(scores.loc[[series]]).iloc[0])
        calls.append(_calls(frame[held_out], thresholds))
    return flags, pd.concat(calls).loc[frame.index]


BOOTSTRAP_RESAMPLES = 1000


def _rate(hits: int, n: int, bootstrap: bool = False) -> dict:
    """``hits`` of ``n`` with its Wilson 95 % interval; ``bootstrap``: also the percentile bootstrap over the
    ``n`` series (resampled with replacement, seeded), which the card quotes to say why it uses Wilson's
    (module docstring)."""
    out: dict = {"hits": hits, "n": n, "rate": hits / n if n else None, "ci": list(wilson_interval(hits, n))}
    if bootstrap:
        draws = np.random.default_rng(0).binomial(n, hits / n, BOOTSTRAP_RESAMPLES) / n if n else None
        out["ci_bootstrap"] = [None, None] if draws is None else [float(q) for q in np.percentile(draws, [2.5, 97.5])]
    return out


def series_table(scores: pd.DataFrame, flags: pd.Series, k: int) -> dict[str, dict]:
    """Per set and all together: series, sensitivity and specificity of ``flags``, AUC of the top-``k`` score."""
    out = {}
    for name, part in [*scores.groupby("set"), ("all", scores)]:
        bleed = part["truth"] == 1
        hit = flags.loc[part.index]
        out[str(name)] = {
            "series": len(part),
            "sensitivity": _rate(int(hit[bleed].sum()), int(bleed.sum()), bootstrap=True),
            "specificity": _rate(int((~hit[~bleed]).sum()), int((~bleed).sum()), bootstrap=True),
            "auc": roc_auc(part["truth"], part[k]),
            "auc_ci": list(bootstrap_auc(part["truth"].to_numpy(), part[k].to_numpy())),
        }
    return out


def naming_table(frame: pd.DataFrame, calls: pd.DataFrame) -> dict[str, dict]:
    """Per subtype, as a reader sees it: named on the slices that carry it, on bleeding slices that do not,
    and on clear slices."""
    bleeding = frame["any" + TRUE] > 0
    out = {}
    for c in SUBTYPES:
        carries = frame[c + TRUE] > 0
        named = calls[c]
        out[c] = {
            "carries": _rate(int(named[carries].sum()), int(carries.sum())),
            "other_bleeds": _rate(int(named[bleeding & ~carries].sum()), int((bleeding & ~carries).sum())),
            "clear": _rate(int(named[~bleeding].sum()), int((~bleeding).sum())),
        }
    return out


def fit(frame: pd.DataFrame, previous: Mapping[str, float | int] | None = None) -> tuple[SeriesRule, dict, dict]:
    """``(rule, thresholds, report)`` from the real series in ``frame`` (:func:`score_real_sets`).

    ``previous`` (``top_k`` and ``threshold``): the rule being replaced, measured on the same series.
    """
    scores = series_scores(frame)
    rule = choose_rule(scores)
    thresholds = {"any": rule.threshold} | naming_thresholds(frame)
    in_sample = rule.flags(scores)
    cv_flags, cv_calls = cross_validate(frame, scores)
    cv_chosen = pd.Series([choose_rule(scores.drop(index=s)).top_k for s in scores.index]).value_counts()
    report = {
        "sets": sorted(set(scores["set"])),
        "series": len(scores),
        "slices": len(frame),
        "target_sensitivity": TARGET_SENSITIVITY,
        "top_k": rule.top_k,
        "threshold": rule.threshold,
        # The scores the threshold lies halfway between (margin_threshold): none lies closer to it.
        "threshold_between": [
            float(scores.loc[~in_sample, rule.top_k].max()) if (~in_sample).any() else None,
            float(scores.loc[in_sample & (scores["truth"] == 1), rule.top_k].min()),
        ],
        "thresholds": thresholds,
        "auc_by_k": rule.auc_by_k,
        "cross_validated": series_table(scores, cv_flags, rule.top_k),
        "cross_validated_top_k": {int(k): int(n) for k, n in cv_chosen.items()},
        "in_sample": series_table(scores, in_sample, rule.top_k),
        "naming_cross_validated": naming_table(frame, cv_calls),
        "naming_in_sample": naming_table(frame, _calls(frame, thresholds)),
        "scores": [
            {
                "series": s,
                "set": r["set"],
                "truth": int(r["truth"]),
                "score": float(r[rule.top_k]),
                "flagged_cross_validated": bool(cv_flags[s]),
            }
            for s, r in scores.iterrows()
        ],
    }
    if previous:
        k = int(previous["top_k"])
        old = series_scores(frame, (k,))
        report["previous"] = {
            "top_k": k,
            "threshold": float(previous["threshold"]),
            "table": series_table(old, old[k] >= float(previous["threshold"]), k),
        }
    return rule, thresholds, report


def available(shared: Path) -> bool:
    """Whether ``shared`` holds any of the :data:`REAL_SETS`."""
    return any((shared / name).is_dir() for name in REAL_SETS)


def policy_text(report: Mapping) -> str:
    """The checkpoint's ``threshold_policy``: the flag's part first (the dashboard shows it, ich.scope)."""
    cv = report["cross_validated"]["all"]
    return (
        f"any: series sensitivity >= {report['target_sensitivity']} on {report['series']} real series "
        f"({', '.join(report['sets'])}) with the study score the {aggregation_text(report['top_k'])} "
        f"(leave-one-patient-out: sensitivity {cv['sensitivity']['rate']:.2f}, specificity "
        f"{cv['specificity']['rate']:.2f}); subtypes: named only on a slice called bleeding, at the Matthews-best "
        f"cut on real bleeding slices but never below {NAMING_FLOOR:.0%}, and not at all where most slices it "
        "would be named on do not carry it"
    )
