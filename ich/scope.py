"""What a score means, and where it does not apply: the checkpoint's validation, in words a reader uses.

- :func:`out_of_scope`: plain lines for a series unlike the ones the model learned from and was
  checked on (axial, ~5 mm non-contrast adult head CT: RSNA 2019, PHE-SICH, CQ500).
- :func:`score_meaning`: what "flagged" means for this checkpoint (its operating point).
- :func:`subtype_rule`: when a subtype is named, from a study's thresholds.
- :func:`validation_lines`: the checkpoint's own out-of-fold numbers, per class, with intervals, and
  which subtypes it does not name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from ich.dicom import Series
from ich.labels import CLASSES, NOT_NAMED, SUBTYPES
from ich.slabs import THIN_MM as THIN_SLICE_MM  # the training slices are ~5 mm (RSNA 2019)

__all__ = [
    "ADULT_YEARS",
    "NOTE_PREFIX",
    "THIN_SLICE_MM",
    "out_of_scope",
    "score_meaning",
    "subtype_rule",
    "validation_lines",
]

NOTE_PREFIX = "Outside what the model was validated on: "  # how these lines are kept among a series' notes

AXIAL_COSINE = 0.9  # |slice normal . patient z| below this: not an axial (or a strongly tilted) series
ADULT_YEARS = 18.0  # the training sets are adults; a child's head and its normal findings differ
_AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 1 / 52, "D": 1 / 365}


def _age_years(text: str) -> float | None:
    match = re.fullmatch(r"(\d{1,3})([YMWD])", text.strip().upper())
    return int(match.group(1)) * _AGE_UNITS[match.group(2)] if match else None


def out_of_scope(series: Series) -> list[str]:
    """Why this series is outside what the model was validated on (empty when it is not)."""
    first = series.slices[0]
    lines = []
    thickness = first.thickness if first.thickness is not None else series.spacing
    if thickness is not None and thickness < THIN_SLICE_MM:
        lines.append(f"thin slices ({thickness:.1f} mm): the model learned from ~5 mm slices")
    normal = first.normal
    if normal is not None and abs(float(normal[2])) < AXIAL_COSINE:
        lines.append("not an axial series: the model learned from axial slices only")
    if first.contrast_agent:
        lines.append("contrast-enhanced: the model learned from non-contrast scans, where blood alone is bright")
    age = _age_years(first.patient_age)
    if age is not None and age < ADULT_YEARS:
        lines.append("a patient under 18: the model learned from adults")
    return lines


def score_meaning(metadata: dict) -> str:
    """One sentence on the flag: the threshold and how it was chosen."""
    threshold = float(metadata.get("thresholds", {}).get("any", 0.5))
    policy = str(metadata.get("threshold_policy", "")).split(";")[0].removeprefix("any:").strip()
    how = f"chosen for {policy}" if policy else "the checkpoint's default"
    return (
        f"Probabilities are calibrated estimates, not certainties. A study is flagged at a likelihood of "
        f'{threshold:.0%} or more: {how}. Flagged means "read this first", not "hemorrhage".'
    )


def subtype_rule(thresholds: Mapping[str, float]) -> str:
    """One sentence on when a subtype is named, from the thresholds a study was scored with."""
    named = {c: float(thresholds[c]) for c in SUBTYPES if c in thresholds and float(thresholds[c]) < NOT_NAMED}
    unnamed = [c for c in SUBTYPES if c not in named]
    line = "A subtype is named only on a slice called bleeding, and only at or above its own threshold"
    if named:
        low, high = min(named.values()), max(named.values())
        line += f" ({low:.0%}" + (f"–{high:.0%}" if f"{high:.0%}" != f"{low:.0%}" else "") + ")"
    if unnamed:
        line += f"; not named by this model: {', '.join(unnamed)}"
    return line + "."


def validation_lines(metadata: dict) -> list[str]:
    """The checkpoint's out-of-fold AUC per class with its 95 % interval (markdown bullet lines)."""
    per_class = metadata.get("metrics", {}).get("out_of_fold", {}).get("per_class", {})
    lines = []
    for name in CLASSES:
        m = per_class.get(name)
        if not m or not np.isfinite(m.get("auc", np.nan)):
            continue
        low, high = m.get("auc_ci", (np.nan, np.nan))
        unnamed = name != "any" and float(metadata.get("thresholds", {}).get(name, 0.0)) >= NOT_NAMED
        lines.append(
            f"- {name}: AUC {m['auc']:.2f} ({low:.2f}–{high:.2f}), {m.get('positives', '?')} positive slices"
            + ("; not named by this model (never the likely subtype at a probability worth naming)" if unnamed else "")
        )
    return lines
