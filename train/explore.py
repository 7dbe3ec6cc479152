"""A one-file HTML report on a prepared cache: what the training data looks like.

    python -m train.explore CACHE [--out report.html] [--examples 2]

Label balance, subtype prevalence, BitsStored distribution, the brain-pixel fraction against the
blank-slice threshold, and example slices in several windows (every preset when the source DICOM
is still readable, else the three cached model channels). Plotly is embedded: works offline.
"""

from __future__ import annotations

import argparse
import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from train.data import Cache

__all__ = ["build_report", "example_rows", "get_args_parser", "main"]


def _bar(counts: pd.Series, title: str, xaxis: str) -> go.Figure:
    total = max(int(counts.sum()), 1)
    fig = go.Figure(
        go.Bar(x=[str(i) for i in counts.index], y=counts.to_numpy(), text=[f"{v} ({v / total:.1%})" for v in counts])
    )
    fig.update_layout(title=title, xaxis_title=xaxis, yaxis_title="slices", height=380)
    return fig


def _label_balance(frame: pd.DataFrame) -> go.Figure:
    counts = frame.loc[frame["kept"], "any"].map({0: "no bleed", 1: "bleed"}).value_counts()
    return _bar(counts, "Label balance (kept slices)", "any")


def _prevalence(frame: pd.DataFrame, classes: Sequence[str]) -> go.Figure:
    kept = frame.loc[frame["kept"], list(classes)]
    # Unknown labels (-1: a source that does not say) are not positives.
    return _bar(kept.clip(lower=0).sum().astype(int), f"Subtype prevalence ({len(kept)} kept slices)", "class")


def _sources(frame: pd.DataFrame) -> go.Figure:
    """Slices and bleeds per training source (one bar pair per ``source`` of a multi-source cache)."""
    counts = frame.groupby("source", sort=False)["any"].agg(slices="size", bleeds=lambda s: int((s == 1).sum()))
    fig = go.Figure(
        [
            go.Bar(name=col, x=list(counts.index), y=counts[col].to_numpy(), text=counts[col].to_numpy())
            for col in counts
        ]
    )
    fig.update_layout(
        title="Slices and bleeds per source", barmode="group", xaxis_title="source", yaxis_title="slices", height=380
    )
    return fig


def _bits_stored(frame: pd.DataFrame) -> go.Figure:
    counts = frame["bits_stored"].dropna().astype(int).value_counts().sort_index()
    return _bar(counts, "BitsStored (12-bit files may need the RSNA wrapped-pixel fix)", "bits stored")


def _brain_fraction(frame: pd.DataFrame, threshold: float | None) -> go.Figure:
    fig = px.histogram(frame, x="brain_fraction", nbins=50, title="Brain-pixel fraction per slice")
    if threshold is not None:
        fig.add_vline(x=threshold, line_dash="dash", line_color="red", annotation_text=f"kept from {threshold:.0%}")
    fig.update_layout(height=380, yaxis_title="slices")
    return fig


def example_rows(
    frame: pd.DataFrame, classes: Sequence[str], per_class: int = 2, seed: int = 0
) -> list[tuple[str, int]]:
    """``(label, row)`` pairs: a few kept slices without a bleed, then a few of each present subtype."""
    kept = frame[frame["kept"]]
    groups = [("no bleed", kept[kept["any"] == 0])] + [(c, kept[kept[c] == 1]) for c in classes if c != "any"]
    out = []
    for label, rows in groups:
        for row in rows.sample(min(per_class, len(rows)), random_state=seed).index:
            out.append((label, int(row)))
    return out


def _windows_of(cache: Cache, row: int) -> tuple[np.ndarray, list[str]]:
    """``(stack (W, S, S) uint8, window names)``: every preset from the DICOM, else the cached channels."""
    from ich import dicom
    from ich.windowing import PRESETS, Preprocess

    source = cache.info.get("source")
    path = Path(source or "") / str(cache.frame.at[row, "path"])
    try:
        hu = dicom.read_slice(path).pixels
    except dicom.DicomError:  # the source folder moved or was removed: show what the model sees
        return np.asarray(cache.images[row]), [w[0] for w in cache.info["windows"]]
    # The cache's own crop and resize, with every preset window instead of the model's three.
    preprocess = Preprocess(cache.size, tuple(PRESETS.values()), crop=cache.info.get("crop", True))
    return preprocess(hu), list(PRESETS)


def _example(cache: Cache, label: str, row: int) -> go.Figure:
    stack, names = _windows_of(cache, row)
    fig = px.imshow(stack, facet_col=0, binary_string=True, facet_col_spacing=0.01)
    for annotation, name in zip(fig.layout.annotations, names):
        annotation.text = name
    frame_row = cache.frame.loc[row]
    title = f"{label}: {frame_row['path']} (brain fraction {frame_row['brain_fraction']:.2f})"
    fig.update_layout(title=title, height=300, margin=dict(l=10, r=10, t=60, b=10))
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False)
    return fig


def _summary(cache: Cache) -> str:
    frame = cache.frame
    items = {
        "cache": cache.root,
        "source": cache.info.get("source"),
        "slice size": f"{cache.size} x {cache.size}",
        "files": len(frame),
        "kept (training) slices": int(frame["kept"].sum()),
        "problems": int(frame["problem"].notna().sum()),
        "patients": frame["patient_id"].nunique(),
        "studies": frame["study_uid"].nunique(),
        "series": frame["series_uid"].nunique(),
        "brain-fraction threshold": cache.info.get("min_brain"),
    }
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in items.items())
    return f"<table>{cells}</table>"


def build_report(cache: Cache, per_class: int = 2, seed: int = 0) -> str:
    """The report as one HTML string."""
    frame = cache.frame
    figures = [
        _label_balance(frame),
        _prevalence(frame, cache.classes),
        *([_sources(frame)] if "source" in frame else []),
        _bits_stored(frame),
        _brain_fraction(frame, cache.info.get("min_brain")),
    ]
    figures += [_example(cache, label, row) for label, row in example_rows(frame, cache.classes, per_class, seed)]
    divs = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)]
    style = "body{font-family:sans-serif;margin:2em} th{text-align:left;padding-right:1em}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>ICH training data</title><style>{style}</style></head>"
        f"<body><h1>ICH training data</h1>{_summary(cache)}{''.join(divs)}</body></html>"
    )


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="HTML report on a prepared training cache", add_help=add_help)
    parser.add_argument("cache", type=Path, help="folder written by python -m train.prepare")
    parser.add_argument("--out", type=Path, default=None, help="report file (default CACHE/report.html)")
    parser.add_argument("--examples", type=int, default=2, help="example slices per class")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = get_args_parser().parse_args(argv)
    cache = Cache.open(args.cache)
    out = args.out or cache.root / "report.html"
    out.write_text(build_report(cache, args.examples, args.seed), encoding="utf-8")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
