"""What the dashboard shows, as text, tables and figures: no Streamlit here, so each piece is unit-tested.

Probabilities are never shown as a bare "100 %" (:func:`pct`); findings lines compare predicted and actual
question by question (:func:`findings_markdown`, Streamlit's ``:colour[...]`` markdown).
"""

from __future__ import annotations

import base64
import datetime as dt
import io
from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from PIL import Image

from ich import review
from ich.inference import STUDY_AGGREGATION, aggregation_text
from ich.labels import CLASSES, SUBTYPES
from ich.worklist import StudyRecord

SOURCE_NAMES = {"upload": "uploaded", "dicom": "received over DICOM", "demo": "synthetic demo study"}
TRUTH_NAMES = {"csv": "label CSV", "phantom": "phantom labels", "review": "radiologist's read"}
CLASS_COLOURS = dict(zip(CLASSES, ("#f2c12e", "#e377c2", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e")))
SUBTYPE_ABBREVIATIONS = dict(zip(SUBTYPES, ("EDH", "IPH", "IVH", "SAH", "SDH")))  # as radiologists write them
OPEN_PREFIX = "Open "  # a worklist row's button label, then its study id


def findings_markdown(
    pred: frozenset[str], truth: frozenset[str] | None, source: str | None = None, unknown: str = "not labelled"
) -> str:
    """Predicted over actual, then question by question (hemorrhage first, then each subtype either side
    names): green where they agree, red where not, grey where the truth does not say; ✓/✗ for
    colour-blind readers. ``unknown`` is what a missing truth is called ("not assessed" after a read)."""
    if truth is None:
        return f"pred: {review.describe(pred)}  \n:gray[actual: {unknown}]"
    origin = f" ({TRUTH_NAMES[source]})" if source else ""
    parts = []
    for answer in review.compare(pred, truth):
        said = f"{answer.question}: {'yes' if answer.predicted else 'no'} / "
        if answer.agrees is None:
            parts.append(f":gray[{said}type not given]")
        else:
            colour, mark = ("green", "✓") if answer.agrees else ("red", "✗")
            parts.append(f":{colour}[{said}{'yes' if answer.actual else 'no'} {mark}]")
    return (
        f"pred: {review.describe(pred)} · actual: {review.describe(truth)}{origin}  \n"
        + " · ".join(parts)
        + " :gray[(pred / actual)]"
    )


def slice_findings(row: pd.Series, thresholds: Mapping[str, float]) -> tuple[frozenset[str], frozenset[str] | None]:
    return (
        review.predicted(row[[f"p_{c}" for c in CLASSES]].to_numpy(float), thresholds),
        review.actual(row[[f"y_{c}" for c in CLASSES]].to_numpy(float)),
    )


def slice_note(row: pd.Series, thresholds: Mapping[str, float]) -> str:
    """The model's line for one slice, drawn on the image while the reader scrolls (short: it sits on the image)."""
    called = slice_findings(row, thresholds)[0]
    types = ", ".join(SUBTYPE_ABBREVIATIONS[c] for c in SUBTYPES if c in called)
    verdict = "called hemorrhage" + (f" ({types})" if types else "") if called else "not called"
    return f"model: any {pct(row['p_any'])} · {verdict}"


def probability_figure(slices: pd.DataFrame, index: int, thresholds: Mapping[str, float]) -> go.Figure:
    """Per-slice probabilities along the series, the current slice, the "any" threshold and the actual."""
    x = slices["index"].to_numpy() + 1
    fig = go.Figure()
    for c in CLASSES:
        fig.add_trace(
            go.Scatter(
                x=x,
                y=slices[f"p_{c}"],
                name=c,
                mode="lines+markers",
                marker=dict(size=5),
                line=dict(color=CLASS_COLOURS[c], width=3 if c == "any" else 1.5),
                hovertemplate=f"slice %{{x}}<br>{c}: %{{y:.0%}}<extra></extra>",
            )
        )
    positive = slices.loc[slices["y_any"] >= 0.5, "index"].to_numpy() + 1
    if len(positive):
        fig.add_trace(
            go.Scatter(
                x=positive,
                y=np.full(len(positive), 1.06),
                name="actual: hemorrhage",
                mode="markers",
                marker=dict(symbol="square", size=8, color="#7f0000"),
                hovertemplate="slice %{x}: actual hemorrhage<extra></extra>",
            )
        )
    fig.add_hline(
        y=thresholds.get("any", review.DEFAULT_THRESHOLD),
        line_dash="dash",
        line_color="#888",
        annotation_text="flag threshold",
        annotation_position="bottom right",
    )
    fig.add_vline(x=index + 1, line_color="#444", line_width=1)
    fig.update_layout(
        height=280,
        margin=dict(l=10, r=10, t=30, b=10),
        xaxis=dict(title=dict(text="slice (click a point to jump)", standoff=4)),
        yaxis=dict(range=[0, 1.1], tickformat=".0%", title=None),
        legend=dict(orientation="h", y=-0.5),
        clickmode="event+select",
        dragmode=False,
    )
    return fig


def flag_rule(top_k: int | None, threshold: float, fallback: str = STUDY_AGGREGATION) -> str:
    """How a study was scored and flagged, in one line; ``fallback`` says how where the store kept no ``top_k``."""
    how = fallback if top_k is None else aggregation_text(top_k)
    return f"Likelihood = {how}; flagged at ≥ {threshold:.0%}"


def worklist_rule(rules: list[tuple[int | None, float]], fallback: str = STUDY_AGGREGATION) -> str:
    """The flag rule of the listed studies (``(top_k, 'any' threshold)`` each), or how many there are."""
    lines = sorted({flag_rule(k, t, fallback) for k, t in rules})
    if len(lines) == 1:
        return lines[0] + "."
    return f"The studies listed were scored under {len(lines)} rules (models); the viewer states each study's."


def studies_table(studies: pd.DataFrame) -> pd.DataFrame:
    """The worklist columns a reader sees (no UIDs); the subtype only where the study is flagged."""
    return pd.DataFrame(
        {
            "Study": studies["label"],
            "Exam": studies["study_datetime"].dt.strftime("%Y-%m-%d %H:%M").fillna("—"),  # never "None"
            "Description": studies["description"].replace("", "—"),
            "Received": studies["received"],
            "Source": studies["source"],
            "Slices": studies["n_slices"],
            "Thickness": studies["thickness"],
            "Likelihood": studies["score"] * 100,
            "Most likely subtype": studies["top_subtype"].where(studies["flagged"]).fillna("—"),
            "Flag": np.where(studies["flagged"], "⚠ flagged", ""),
            # A re-score (a late instance, a re-upload) changed the row: the reader may have seen the old one.
            "Status": studies["status"].where(studies["updated"].isna(), studies["status"] + " · updated"),
        }
    )


def exam_series_table(info: StudyRecord) -> pd.DataFrame:
    """Every series of the exam: the scored one first, the others with why the model did not score them (that
    column second, so a narrow side panel shows it without scrolling); "—" where a header gave nothing (a series
    set aside at the door has no thickness, kernel or plane)."""
    return pd.DataFrame(
        {
            "Series": [c.number for c in info.exam_series],
            "Description": [c.description or "—" for c in info.exam_series],
            "Scored": ["scored" if c.scored else f"not scored: {c.reason}" for c in info.exam_series],
            "Slices": [c.n_slices for c in info.exam_series],
            "Thickness (mm)": [f"{c.thickness:g}" if c.thickness is not None else "—" for c in info.exam_series],
            "Kernel": [c.kernel or "—" for c in info.exam_series],
            "Plane": [c.plane if c.plane != "unknown" else "—" for c in info.exam_series],
        }
    )


def local_time(iso: str) -> str:
    """A stored ISO time as this server's local time, the way a person writes it (27 Nov 2026, 16:12)."""
    when = dt.datetime.fromisoformat(iso).astimezone()
    return f"{when.day} {when:%b %Y, %H:%M}"


def pct(value: float | None) -> str:
    """A probability for a person: never a bare "100 %" or "0 %", which no model can claim."""
    if value is None or not np.isfinite(value):
        return "—"
    return ">99%" if value > 0.99 else "<1%" if value < 0.01 else f"{value:.0%}"


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 grey or RGB image as PNG (fast compression: it goes over a local network once)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def png_data_uri(image: np.ndarray) -> str:
    """An image as a ``data:`` URI: shown from the session's own message, never from a ``/media`` URL that
    a signed-out client could fetch (``st.image`` of an array puts it there)."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def page_icon() -> Image.Image:
    """The tab icon, drawn here: a material-symbol icon would be fetched from a font host, which an offline
    hospital network cannot reach."""
    icon = np.zeros((64, 64, 3), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    icon[(yy - 32) ** 2 / 30**2 + (xx - 32) ** 2 / 24**2 < 1] = (200, 200, 200)  # a head
    icon[(yy - 26) ** 2 + (xx - 40) ** 2 < 8**2] = (220, 40, 40)  # and a bleed
    return Image.fromarray(icon)
