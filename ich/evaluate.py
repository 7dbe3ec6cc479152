"""``ich predict`` and ``ich evaluate``: score every readable slice, then compare with labels.

Folders are read in two passes — headers first (grouping and order), then pixels one series at a
time — so a large folder never has to fit in memory; zip archives and uploads are read whole.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ich import dicom, metrics
from ich.inference import STUDY_AGGREGATION, Predictor, study_score
from ich.labels import CLASSES, INDEX_NAME, read_rsna_csv

__all__ = ["Predictions", "predict", "submission", "evaluate", "report_markdown", "find_labels", "load_labels"]


@dataclass
class Predictions:
    frame: pd.DataFrame  # index sop_uid; study_uid, series_uid, slice_index, then one column per class
    problems: list[dicom.Problem] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _series_with_pixels(sources: list, problems: list[dicom.Problem]) -> Iterable[dicom.Series]:
    """Yield series with pixels, holding one series' pixels in memory at a time for plain files."""
    archives = [s for s in sources if isinstance(s, dicom.Upload) or str(s).lower().endswith(".zip")]
    files = [s for s in sources if s not in archives]
    if archives:
        loaded = dicom.load(archives)
        problems += loaded.problems
        yield from loaded.series
    headers = dicom.load(files, pixels=False)
    problems += headers.problems
    for series in headers.series:
        cache: dict[str, list[dicom.Slice]] = {}
        kept = []
        for s in series.slices:
            try:
                if s.path not in cache:
                    cache[s.path] = dicom.read_file(s.path)
                s.hu = next(f.hu for f in cache[s.path] if f.sop_uid == s.sop_uid)
                kept.append(s)
            except dicom.DicomError as exc:
                problems.append(dicom.Problem(exc.path, exc.reason))
        if kept:
            series.slices = kept
            yield series
        for s in kept:  # release this series' pixels before reading the next
            s.hu = None


def predict(predictor: Predictor, sources: Iterable, progress: bool = True) -> Predictions:
    """Probabilities for every readable slice (blank ones included) of every series in ``sources``."""
    from tqdm.auto import tqdm

    sources = list(sources)
    problems: list[dicom.Problem] = []
    rows: list[pd.DataFrame] = []
    totals = {"read_s": 0.0, "preprocess_s": 0.0, "infer_s": 0.0}
    start = time.perf_counter()
    series_iter = _series_with_pixels(sources, problems)
    with tqdm(desc="scoring", unit="slice", disable=not progress) as bar:
        while True:
            t0 = time.perf_counter()
            series = next(series_iter, None)
            totals["read_s"] += time.perf_counter() - t0
            if series is None:
                break
            result = predictor.predict_series(series)
            totals["preprocess_s"] += result.timings["preprocess_s"]
            totals["infer_s"] += result.timings["infer_s"]
            frame = pd.DataFrame(result.probs, columns=list(CLASSES), index=pd.Index(result.sop_uids, name=INDEX_NAME))
            frame.insert(0, "slice_index", np.arange(len(frame)))
            frame.insert(0, "series_uid", series.series_uid)
            frame.insert(0, "study_uid", series.study_uid)
            rows.append(frame)
            bar.update(len(series))
    totals["total_s"] = time.perf_counter() - start
    columns = ["study_uid", "series_uid", "slice_index", *CLASSES]
    frame = pd.concat(rows) if rows else pd.DataFrame(columns=columns).rename_axis(INDEX_NAME)
    return Predictions(frame, problems, totals)


def submission(frame: pd.DataFrame) -> pd.DataFrame:
    """RSNA submission format: ``ID = <SOPInstanceUID>_<class>``, ``Label`` = probability."""
    probs = frame[list(CLASSES)].clip(0.0, 1.0)
    long = probs.stack(future_stack=True)
    return pd.DataFrame({"ID": [f"{sop}_{cls}" for sop, cls in long.index], "Label": long.to_numpy()})


def find_labels(data: Path) -> Path | None:
    """The RSNA label CSV of a dataset folder (``stage_2_train.csv`` or the only ``*.csv``)."""
    if data.is_file():
        return None
    preferred = data / "stage_2_train.csv"
    if preferred.is_file():
        return preferred
    csvs = sorted(data.glob("*.csv"))
    return csvs[0] if len(csvs) == 1 else None


def evaluate(predictions: pd.DataFrame, labels: pd.DataFrame, thresholds: dict[str, float]) -> dict:
    """Slice-level and series-level metrics for the slices that have labels."""
    classes = [c for c in CLASSES if predictions[c].notna().all()]
    joined = predictions.join(labels[classes], rsuffix="_true", how="inner")
    if joined.empty:
        raise ValueError("no predicted slice has a label: do the label IDs match the SOPInstanceUIDs?")
    y_true = joined[[f"{c}_true" for c in classes]].to_numpy(dtype=np.float64)
    y_prob = joined[classes].to_numpy(dtype=np.float64)
    per_series = joined.groupby("series_uid").apply(
        lambda g: pd.Series({"score": study_score(g["any"].to_numpy()), "truth": float(g["any_true"].max()), "slices": len(g)}),
        include_groups=False,
    )
    th = [thresholds.get(c, 0.5) for c in classes]
    series_block = metrics.summarize(per_series[["truth"]].to_numpy(), per_series[["score"]].to_numpy(), ["any"], th[:1])
    return {
        "classes": classes,
        "thresholds": dict(zip(classes, th)),
        "unlabelled_slices": int(len(predictions) - len(joined)),
        "slice": metrics.summarize(y_true, y_prob, classes, th),
        "series": series_block | {"aggregation": STUDY_AGGREGATION},
        "series_scores": per_series.reset_index().to_dict(orient="records"),
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def report_markdown(report: dict, title: str = "Evaluation") -> str:
    s = report["slice"]
    lines = [
        f"# {title}",
        "",
        "Not a medical device: research metrics only.",
        "",
        f"Slices: {s['n']} labelled ({report['unlabelled_slices']} without labels). "
        f"accuracy (any) {_fmt(s['accuracy'])}, accuracy_multi {_fmt(s['accuracy_multi'])}, "
        f"RSNA weighted log loss {_fmt(s['weighted_log_loss'])}",
        "",
        "| class | positives | AUC | sensitivity | specificity | threshold |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c, m in s["per_class"].items():
        lines.append(
            f"| {c} | {round(m['prevalence'] * s['n'])} | {_fmt(m['auc'])} | {_fmt(m['sensitivity'])} | "
            f"{_fmt(m['specificity'])} | {m['threshold']:.2f} |"
        )
    se, any_ = report["series"], report["series"]["per_class"]["any"]
    lines += [
        "",
        f"Series ({se['aggregation']}): {se['n']} series, {round(any_['prevalence'] * se['n'])} with hemorrhage; "
        f"AUC {_fmt(any_['auc'])}, sensitivity {_fmt(any_['sensitivity'])}, specificity {_fmt(any_['specificity'])}.",
        "",
    ]
    return "\n".join(lines)


def load_labels(data: str | os.PathLike, labels: str | os.PathLike | None = None) -> pd.DataFrame:
    """Wide labels from ``labels``, else from the label CSV that :func:`find_labels` finds in ``data``."""
    path = Path(labels) if labels else find_labels(Path(data))
    if path is None:
        raise FileNotFoundError(f"no label CSV found in {data}: pass --labels (RSNA format ID,Label)")
    return read_rsna_csv(path)
