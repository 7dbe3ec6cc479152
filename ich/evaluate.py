"""``ich predict`` and ``ich evaluate``: score each exam's chosen series, every readable slice, then compare with labels.

The exam rule (:class:`ich.exam.ExamRule`) picks one series per exam, as the worklist does; ``every_series``
scores them all.

Folders and zip archives (also zips inside folders) are read by :func:`ich.dicom.iter_series` in two
passes — headers first (grouping and order), then pixels one series at a time — so a large folder
or zip never has to fit in memory; uploads are read whole.
Labelled image folders (:mod:`ich.datasets`: the RSNA PNG, PHE-SICH and box layouts) are scored
through the same input definition via :func:`predict_images`; their "series" are the patients
(partial series) or those a ``series.csv`` names (complete ones), and a folder of single slices
(``rsna-png``) has none. A label file may label only some classes: the others are left out and
reported as not labelled.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ich import calibration, datasets, dicom, exam, metrics
from ich.inference import TOP_K, Predictor, aggregation_text, study_score
from ich.labels import CLASSES, DEFAULT_THRESHOLD, INDEX_NAME, NOT_NAMED

__all__ = [
    "EXAM_COLUMNS",
    "Predictions",
    "predict",
    "predict_images",
    "score_folder",
    "image_layout",
    "submission",
    "evaluate",
    "report_markdown",
    "slice_table",
    "reliability_figure",
    "trained_on",
    "find_labels",
    "load_labels",
]

IMAGE_BATCH = 64


EXAM_COLUMNS = [
    "exam", "study_uid", "series_uid", "series_number", "series_description", "slices", "score", "flagged",
    "top_subtype", "not_scored",
]  # fmt: skip


@dataclass
class Predictions:
    # index sop_uid; study_uid, series_uid, slice_index, slab (what was scored: the slice, or a thin series'
    # ~5 mm slab, ich.slabs), then one column per class
    frame: pd.DataFrame
    problems: list[dicom.Problem] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # One row per scored series (EXAM_COLUMNS): per exam under the exam rule, where an exam with no series
    # to score has a row without a score; ``not_scored`` lists the exam's other series and why.
    exams: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=EXAM_COLUMNS))


def predict(predictor: Predictor, sources: Iterable, progress: bool = True, every_series: bool = False) -> Predictions:
    """Probabilities for every readable slice (blank ones included) of each exam's scored series in ``sources``.

    The exam rule (:func:`ich.exam.choose_series`) picks one series per exam, as the worklist does; an exam
    with none to score is a problem line and an unscored row of ``exams``. ``every_series`` scores every
    series instead: for slice labels that cover series the rule does not score (a scout, single slices).
    """
    from tqdm.auto import tqdm

    sources = list(sources)
    problems: list[dicom.Problem] = []
    rows: list[pd.DataFrame] = []
    exams: list[dict] = []
    totals = {"read_s": 0.0, "preprocess_s": 0.0, "infer_s": 0.0}
    start = time.perf_counter()
    rule = None if every_series else exam.ExamRule(problems)
    series_iter = dicom.iter_series(sources, problems, select=rule)
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
            frame.insert(0, "slab", np.arange(len(frame)) if result.slab_of_slice is None else result.slab_of_slice)
            frame.insert(0, "slice_index", np.arange(len(frame)))
            frame.insert(0, "series_uid", series.series_uid)
            frame.insert(0, "study_uid", series.study_uid)
            rows.append(frame)
            first = series.slices[0]
            exams.append(
                {
                    "study_uid": series.study_uid, "series_uid": series.series_uid,
                    "series_number": first.series_number, "series_description": first.series_description,
                    "slices": len(series), "score": result.score, "flagged": result.flagged,
                    "top_subtype": result.top_subtype,
                    "not_scored": "" if rule is None else exam.not_scored_text(rule.exams[series.study_uid]),
                }
            )  # fmt: skip
            bar.update(len(series))
    totals["total_s"] = time.perf_counter() - start
    columns = ["study_uid", "series_uid", "slice_index", "slab", *CLASSES]
    frame = pd.concat(rows) if rows else pd.DataFrame(columns=columns).rename_axis(INDEX_NAME)
    return Predictions(frame, problems, totals, _exam_table(exams, rule))


def _exam_table(scored: list[dict], rule: exam.ExamRule | None) -> pd.DataFrame:
    """The scored rows, with the unscored exams added, in the order the exams came."""
    unscored = [
        {"study_uid": uid, "not_scored": exam.not_scored_text(choices)}
        for uid, choices in (rule.exams.items() if rule else ())
        if not choices[0].scored
    ]
    # Counts stay whole numbers in the CSV ("238", not "238.0") where an unscored exam leaves them blank.
    table = pd.DataFrame(scored + unscored, columns=EXAM_COLUMNS).astype({"series_number": "Int64", "slices": "Int64"})
    order = list(rule.exams) if rule else list(dict.fromkeys(table["study_uid"]))
    table["exam"] = [order.index(uid) + 1 for uid in table["study_uid"]]
    return table.sort_values("exam", kind="stable").reset_index(drop=True)


def image_layout(data: str | os.PathLike) -> bool:
    """True when ``data`` is a labelled folder of pre-windowed images (see :mod:`ich.datasets`)."""
    try:
        return Path(data).is_dir() and datasets.detect_layout(data) != "rsna-dicom"
    except ValueError:
        return False


def predict_images(predictor: Predictor, manifest: pd.DataFrame, progress: bool = True) -> Predictions:
    """Probabilities for each image of a :mod:`ich.datasets` manifest (brain-window images only).

    Each image goes back to HU inside the brain window (:func:`ich.datasets.load_hu`), then
    through the checkpoint's own preprocessing, as a DICOM slice would. An image that does not
    decode becomes a problem, not an end.
    """
    from tqdm.auto import tqdm

    problems: list[dicom.Problem] = []
    rows: list[pd.DataFrame] = []
    start = time.perf_counter()
    totals = {"read_s": 0.0, "preprocess_s": 0.0, "infer_s": 0.0}
    with tqdm(total=len(manifest), desc="scoring", unit="image", disable=not progress) as bar:
        for first in range(0, len(manifest), IMAGE_BATCH):
            chunk = manifest.iloc[first : first + IMAGE_BATCH]
            t0 = time.perf_counter()
            hus, kept = [], []
            for rec in chunk.itertuples(index=False):
                try:
                    hus.append(datasets.load_hu(rec.path, int(rec.rotate)))
                    kept.append(rec)
                except ValueError as exc:
                    problems.append(dicom.Problem(rec.path, str(exc)))
            totals["read_s"] += time.perf_counter() - t0
            probs, timings = predictor.predict_volume(hus)
            for key in ("preprocess_s", "infer_s"):
                totals[key] += timings[key]
            frame = pd.DataFrame(
                probs, columns=list(CLASSES), index=pd.Index([r.image_id for r in kept], name=INDEX_NAME)
            )
            frame.insert(0, "series_uid", [r.patient_id for r in kept])
            frame.insert(0, "study_uid", [r.patient_id for r in kept])
            rows.append(frame)
            bar.update(len(chunk))
    totals["total_s"] = time.perf_counter() - start
    if not rows:
        return Predictions(
            pd.DataFrame(columns=["study_uid", "series_uid", "slice_index", "slab", *CLASSES]), problems, totals
        )
    frame = pd.concat(rows)
    # Each image is scored once: its place in its series (manifest order) is its slab too.
    place = frame.groupby("series_uid", sort=False).cumcount().to_numpy()
    frame.insert(2, "slice_index", place)
    frame.insert(3, "slab", place)
    return Predictions(frame, problems, totals)


def score_folder(
    predictor: Predictor, data: str | os.PathLike, progress: bool = True, every_series: bool = False
) -> Predictions:
    """A labelled folder scored as ``ich evaluate`` scores it: an image layout by :func:`predict_images` (its
    label-file problems first), a DICOM one by :func:`predict`."""
    if image_layout(data):
        source = datasets.read_source(data)
        result = predict_images(predictor, source.manifest, progress)
        result.problems[:0] = source.problems
        return result
    return predict(predictor, [data], progress, every_series)


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


def evaluate(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    thresholds: dict[str, float],
    top_k: int = TOP_K,
    bootstrap: int = 1000,
) -> dict:
    """Slice-level metrics (AUC with a bootstrap 95 % interval per class) and series-level ones.

    Only classes that are both predicted and labelled on some slice are judged; ``not_labelled`` lists the
    predicted ones the labels leave out. Series are scored as the product scores them (mean of the
    ``top_k`` highest 'any' probabilities) and flagged at the 'any' threshold. ``series`` is ``None``
    where every series has one slice (a folder of single slices) or 'any' is not labelled. Labels below
    0 (unknown) count nowhere.
    """
    predicted = [c for c in CLASSES if predictions[c].notna().all()]
    classes = [c for c in predicted if c in labels and (labels[c] >= 0).any()]
    if not classes:
        raise ValueError(f"the labels give none of the predicted classes ({', '.join(predicted)})")
    joined = predictions.join(labels[classes].add_suffix("_true"), how="inner")
    if joined.empty:
        raise ValueError("no predicted slice has a label: do the label IDs match the SOPInstanceUIDs?")
    y_true = joined[[f"{c}_true" for c in classes]].to_numpy(dtype=np.float64)
    y_prob = joined[classes].to_numpy(dtype=np.float64)
    th = [thresholds.get(c, DEFAULT_THRESHOLD) for c in classes]
    slice_block = metrics.summarize(y_true, y_prob, classes, th)
    for i, c in enumerate(classes):
        slice_block["per_class"][c]["auc_ci"] = list(metrics.bootstrap_auc(y_true[:, i], y_prob[:, i], n=bootstrap))
        slice_block["per_class"][c]["positives"] = int((y_true[:, i] > 0.5).sum())
    report = {
        "classes": classes,
        "not_labelled": [c for c in predicted if c not in classes],
        "thresholds": dict(zip(classes, th)),
        "unlabelled_slices": int(len(predictions) - len(joined)),
        "slice": slice_block,
        "series": None,
        "series_scores": [],
        "reliability": {c: calibration.reliability(y_true[:, i], y_prob[:, i]) for i, c in enumerate(classes)},
    }
    if "any" not in classes:
        return report
    # The score counts what was scored once: a thin series' slab, not each of its slices (as the worklist does).
    per_series = joined.groupby("series_uid").apply(
        lambda g: pd.Series(
            {
                "score": study_score(g.drop_duplicates("slab")["any"].to_numpy(), top_k),
                "truth": float(g["any_true"].max()),
                "slices": len(g),
            }
        ),
        include_groups=False,
    )
    if len(per_series) and per_series["slices"].max() > 1:
        # Flagged when score >= threshold, as the worklist flags; summarize counts score > threshold.
        threshold = thresholds.get("any", DEFAULT_THRESHOLD)
        at = np.nextafter(threshold, -np.inf)
        series_block = metrics.summarize(
            per_series[["truth"]].to_numpy(), per_series[["score"]].to_numpy(), ["any"], [at]
        )
        series_block["per_class"]["any"]["threshold"] = threshold
        report["series"] = series_block | {"aggregation": aggregation_text(top_k), "top_k": top_k}
        report["series_scores"] = per_series.reset_index().to_dict(orient="records")
    return report


def reliability_figure(curves: dict[str, list[dict]], title: str = "Reliability"):
    """A plotly reliability plot: observed rate against mean predicted probability per bin, one line per curve."""
    import plotly.graph_objects as go

    fig = go.Figure(
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dash", "color": "#888"}, name="perfect")
    )
    for name, rows in curves.items():
        fig.add_trace(
            go.Scatter(x=[r["predicted"] for r in rows], y=[r["observed"] for r in rows], mode="lines+markers", name=name,
                       text=[f"{r['n']} slices" for r in rows])
        )  # fmt: skip
    fig.update_layout(
        title=title, xaxis_title="mean predicted probability", yaxis_title="observed rate", height=480, width=560
    )
    return fig


def trained_on(metadata: dict, data: str | os.PathLike) -> bool:
    """True when the checkpoint's training sources (``training.sources`` roots) include the folder ``data``."""
    sources = (metadata.get("training") or {}).get("sources") or {}
    here = Path(data).resolve()
    return any(Path(src.get("root", "")).resolve() == here for src in sources.values() if isinstance(src, dict))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def slice_table(block: dict) -> list[str]:
    """Markdown rows of a slice block: positives, AUC with its interval, sensitivity/specificity at the threshold."""
    lines = [
        "| class | positives | AUC (95 % CI) | sensitivity | specificity | threshold |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c, m in block["per_class"].items():
        lo, hi = m.get("auc_ci") or (None, None)
        ci = f" ({_fmt(lo)}–{_fmt(hi)})" if lo is not None and np.isfinite(lo) else ""
        at = (
            f"{_fmt(m['sensitivity'])} | {_fmt(m['specificity'])} | {m['threshold']:.3f}"
            if m["threshold"] < NOT_NAMED
            else "— | — | not named"  # the checkpoint never calls it: its AUC still ranks the probability
        )
        lines.append(f"| {c} | {m.get('positives', '?')} | {_fmt(m['auc'])}{ci} | {at} |")
    return lines


def report_markdown(report: dict, title: str = "Evaluation") -> str:
    s = report["slice"]
    lines = [
        f"# {title}",
        "",
        "Not a medical device: research metrics only.",
        "",
        *(
            ["**The model was trained on this data: these numbers are not a test of it.**", ""]
            if report.get("trained_on_this_data")
            else []
        ),
        f"Slices: {s['n']} labelled ({report['unlabelled_slices']} without labels). "
        f"accuracy (any) {_fmt(s['accuracy'])}, accuracy_multi {_fmt(s['accuracy_multi'])}, "
        f"RSNA weighted log loss {_fmt(s['weighted_log_loss'])}",
        "",
        f"Classes judged: {', '.join(s['per_class'])}"
        + (f"; not labelled: {', '.join(report['not_labelled'])}" if report.get("not_labelled") else "")
        + ".",
        "",
        *slice_table(s),
    ]
    se = report.get("series")
    if se is None:
        why = "single slices" if "any" in s["per_class"] else "'any' is not labelled"
        lines += ["", f"Series: none judged ({why}).", ""]
        return "\n".join(lines)
    any_ = se["per_class"]["any"]
    flagged = sum(r["score"] >= any_["threshold"] for r in report["series_scores"])
    lines += [
        "",
        f"Series ({se['aggregation']}, flagged at >= {any_['threshold']:.3f}): {se['n']} series, "
        f"{round(any_['prevalence'] * se['n'])} with hemorrhage, {flagged} flagged; "
        f"AUC {_fmt(any_['auc'])}, sensitivity {_fmt(any_['sensitivity'])}, specificity {_fmt(any_['specificity'])}.",
        "",
    ]
    return "\n".join(lines)


def load_labels(data: str | os.PathLike, labels: str | os.PathLike | None = None) -> pd.DataFrame:
    """Wide labels from ``labels``, else from the label CSV that :func:`find_labels` finds in ``data``.

    An image layout's labels come from its manifest (:func:`ich.datasets.read_source`). Classes the file
    does not label are :data:`ich.datasets.UNKNOWN` (:func:`ich.datasets.read_labels`).
    """
    if labels is None and image_layout(data):
        manifest = datasets.read_source(data).manifest
        return manifest.set_index("image_id").rename_axis(INDEX_NAME)[list(CLASSES)].astype(int)
    path = Path(labels) if labels else find_labels(Path(data))
    if path is None:
        raise FileNotFoundError(f"no label CSV found in {data}: pass --labels (RSNA format ID,Label)")
    return datasets.read_labels(path)
