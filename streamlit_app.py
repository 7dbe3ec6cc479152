"""ich dashboard: upload head-CT series, triage them on a worklist, read them in a viewer.

Start with ``.venv/bin/streamlit run streamlit_app.py`` (settings in ``.streamlit/config.toml``).
UI only: reading, scoring, storage, findings and heatmaps live in the ``ich`` package. Functions
ending in ``_ui`` draw widgets and return their values; the page functions wire them to the store.
Not a medical device.
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import logging
import os
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from PIL import Image

from ich import access, dicom, explain, files, review, scope, viewer
from ich.exam import SeriesChoice
from ich.inference import STUDY_AGGREGATION, Predictor, default_weights
from ich.labels import CLASSES, NOT_NAMED, SUBTYPES, read_rsna_csv
from ich.listener import Inbox
from ich.viewer.component import data_id, download_button, slice_viewer
from ich.windowing import PRESETS, Window
from ich.worklist import (
    INTAKE_FAILED,
    STATUS_NEW,
    STATUSES,
    IngestReport,
    StoreError,
    StudyRecord,
    Worklist,
    data_dir,
    ingest,
    seed_demo,
)

NOTICE = "**Not a medical device — research use only.** The model's scores are not diagnoses."
VIEW_WINDOWS = ("brain", "subdural", "bone", "stroke")
SOURCE_NAMES = {"upload": "uploaded", "dicom": "received over DICOM", "demo": "synthetic demo study"}
TRUTH_NAMES = {"csv": "label CSV", "phantom": "phantom labels", "review": "radiologist's read"}
CLASS_COLOURS = dict(zip(CLASSES, ("#f2c12e", "#e377c2", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e")))
GALLERY = 6
SUBTYPE_ABBREVIATIONS = dict(zip(SUBTYPES, ("EDH", "IPH", "IVH", "SAH", "SDH")))  # as radiologists write them
ARRIVALS_POLL_SECONDS = 10  # how often an open page checks for flagged studies from the listener or other readers
log = logging.getLogger(__name__)
PERCENT_BAR = st.column_config.ProgressColumn(format="%.0f%%", min_value=0, max_value=100)
STUDY_COLUMNS = {
    "Exam": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm", help="Study date and time from the scanner"),
    "Received": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm", help="When it reached this worklist"),
    "Thickness": st.column_config.NumberColumn(format="%.1f mm"),
    "Likelihood": PERCENT_BAR,
}


# --------------------------------------------------------------------------- cached resources


@st.cache_resource(show_spinner="Loading the model…")
def predictor(weights: str) -> Predictor:
    return Predictor.from_checkpoint(weights, device="auto")


@st.cache_resource(show_spinner=False)
def worklist(directory: str) -> Worklist:
    return Worklist(directory)


# A volume is shared read-only by every session; cache_resource hands out the same array, where
# cache_data would unpickle 18 MB on every slider move.
@st.cache_resource(max_entries=4, show_spinner="Loading images…")
def volume(directory: str, study_id: int, version: str, series_uid: str | None = None) -> np.ndarray:
    """The scored series' HU, or (``series_uid``) another series of the exam kept for the viewer."""
    vol = worklist(directory).volume(study_id, series_uid)
    vol.flags.writeable = False
    return vol


@st.cache_resource(max_entries=4, show_spinner=False)
def volume_file(directory: str, study_id: int, version: str, series_uid: str | None = None) -> bytes:
    """A series as ``.nii.gz`` bytes for the viewer (sent to a browser only while it does not hold them)."""
    affine = worklist(directory).affine(study_id, series_uid)
    return viewer.volume_nifti(volume(directory, study_id, version, series_uid), affine)


def viewer_volume(
    directory: str, study_id: int, version: str, series_uid: str | None = None
) -> tuple[str, Callable[[], bytes], list[float], list[float], bool]:
    """A series for the viewer: (its id, its ``.nii.gz`` bytes on demand, slice normal, slice positions,
    whether the headers gave them)."""
    affine = worklist(directory).affine(study_id, series_uid)
    normal, locations = viewer.slice_axis(affine, len(volume(directory, study_id, version, series_uid)))
    return (
        data_id(f"volume:{directory}:{study_id}:{version}:{series_uid or ''}"),
        lambda: volume_file(directory, study_id, version, series_uid),
        normal,
        locations,
        affine is not None,
    )


# The NIfTI bytes, not the float maps: a 238-slice study's maps are 250 MB, its compressed file a few MB.
@st.cache_resource(max_entries=8, show_spinner=False)
def heatmap_file(directory: str, study_id: int, version: str, target: str, weights: str) -> bytes:
    """The study's Grad-CAM for ``target`` (one scale for the whole study) as ``.nii.gz`` bytes."""
    vol = volume(directory, study_id, version)
    bar = st.progress(0.0, f"Computing the heatmap for {target} on {len(vol)} slices…")
    cams = explain.study_heatmap(predictor(weights), vol, target, progress=bar.progress)
    bar.empty()
    return viewer.heatmap_nifti(cams, worklist(directory).affine(study_id))


def store() -> Worklist:
    return worklist(str(data_dir()))


def load_model() -> tuple[Predictor | None, str | None]:
    """``(predictor, None)``, or ``(None, why)`` when the checkpoint cannot be loaded."""
    try:
        return predictor(str(default_weights())), None
    except Exception as exc:  # a missing or corrupt checkpoint must not hide the worklist
        log.exception("the model could not be loaded")
        return None, f"{type(exc).__name__}: {exc}"


def model() -> Predictor | None:
    return load_model()[0]


# --------------------------------------------------------------------------- rendering helpers


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


def studies_table(studies: pd.DataFrame) -> pd.DataFrame:
    """The worklist columns a reader sees (no UIDs); the subtype only where the study is flagged."""
    return pd.DataFrame(
        {
            "Study": studies["label"],
            "Exam": studies["study_datetime"],
            "Description": studies["description"],
            "Received": studies["received"],
            "Source": studies["source"],
            "Slices": studies["n_slices"],
            "Thickness": studies["thickness"],
            "Likelihood": studies["score"] * 100,
            "Most likely subtype": studies["top_subtype"].where(studies["flagged"]).fillna("—"),
            "Flag": np.where(studies["flagged"], "⚠ above threshold", ""),
            "Status": studies["status"],
        }
    )


def exam_series_table(info: StudyRecord) -> pd.DataFrame:
    """Every series of the exam: the scored one first, the others with why the model did not score them."""
    return pd.DataFrame(
        {
            "Series": [c.number for c in info.exam_series],
            "Description": [c.description or "—" for c in info.exam_series],
            "Slices": [c.n_slices for c in info.exam_series],
            "Thickness (mm)": [c.thickness for c in info.exam_series],
            "Kernel": [c.kernel or "—" for c in info.exam_series],
            "Plane": [c.plane for c in info.exam_series],
            "Scored": ["scored" if c.scored else f"not scored: {c.reason}" for c in info.exam_series],
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


# --------------------------------------------------------------------------- widgets (return values)


def filter_ui() -> str | None:
    choice = st.segmented_control(
        "Show", ("all", *STATUSES), default="all", required=True, key="status_filter", persist_state="session"
    )
    return None if choice == "all" else choice


def window_ui() -> Window:
    name = st.segmented_control(
        "Window", (*VIEW_WINDOWS, "custom"), default="brain", required=True, key="window", persist_state="session"
    )
    if name != "custom":
        return PRESETS[name]
    level_col, width_col = st.columns(2)
    level = level_col.number_input("Level (HU)", -1000, 3000, 40, step=10, key="level", persist_state="session")
    width = width_col.number_input("Width (HU)", 1, 4000, 80, step=10, key="width", persist_state="session")
    return Window("custom", float(level), float(width))


def heatmap_ui(classes: tuple[str, ...], enabled: bool) -> str | None:
    """The class to explain, or ``None`` when the overlay is off."""
    on_col, target_col = st.columns([1, 1])
    on = on_col.toggle(
        "Heatmap (Grad-CAM)",
        key="heatmap",
        disabled=not enabled,
        persist_state="session",
        help="Where the model looked for the chosen class; it is not a segmentation of the bleed.",
    )
    target = target_col.selectbox(
        "for", classes, key="heatmap_target", disabled=not on, label_visibility="collapsed", persist_state="session"
    )
    return target if on else None


def series_ui(info: StudyRecord, kept: Mapping[str, int]) -> SeriesChoice:
    """The series the viewer shows: the scored one (the default), or another one of the exam kept for it."""
    choices = [c for c in info.exam_series if c.scored or c.series_uid in kept]
    if not choices or not choices[0].scored:  # a study stored before exams were kept (schema < 5)
        return SeriesChoice(info.series_uid, None, "", info.n_slices, None, "", "axial", True, "")

    def name(c: SeriesChoice) -> str:
        number = f"Series {c.number}" if c.number is not None else "Series"
        what = " · ".join(v for v in (c.description, c.plane, f"{c.n_slices} slices") if v)
        return f"{number} · {what}" + (" — scored" if c.scored else " — not scored")

    return st.selectbox(
        "Series", choices, format_func=name, key=f"series-{info.id}", disabled=len(choices) < 2,
        help="The model scored one series of the exam; the others are here to look at, without probabilities.",
    )  # fmt: skip


def read_ui(
    study_id: int, n_slices: int, previous: review.Read | None, current: int
) -> tuple[bool, list[str], list[int], bool] | None:
    """The radiologist's read form; ``(hemorrhage, subtypes, 0-based key slices, others clear)`` when saved."""
    marks_key, subtypes_key, rejected_key = f"marks-{study_id}", f"sub-{study_id}", f"read-rejected-{study_id}"
    if rejected_key in st.session_state:  # the last save was refused: its choices are cleared, not kept for the next
        st.session_state[subtypes_key], st.session_state[marks_key] = [], []
        st.error(st.session_state.pop(rejected_key))
    if marks_key not in st.session_state:
        st.session_state[marks_key] = [i + 1 for i in previous.slice_marks] if previous else []
    if subtypes_key not in st.session_state:
        st.session_state[subtypes_key] = list(previous.subtypes) if previous else []

    def mark_current() -> None:
        st.session_state[marks_key] = sorted(set(st.session_state[marks_key]) | {current + 1})

    st.button(f"Mark slice {current + 1} as showing hemorrhage", on_click=mark_current, key=f"mark-{study_id}")
    with st.form(f"read-{study_id}", border=True):
        answer = st.radio(
            "Hemorrhage",
            ("yes", "no"),
            horizontal=True,
            key=f"hem-{study_id}",
            index=None if previous is None else (0 if previous.hemorrhage else 1),
        )
        subtypes = st.multiselect("Subtypes", SUBTYPES, key=subtypes_key)
        marks = st.multiselect(
            "Key slices: where you see hemorrhage (optional; slices not marked count as not assessed)",
            range(1, n_slices + 1),
            key=marks_key,
        )
        others_clear = st.checkbox(
            "All other slices are clear",
            value=bool(previous and previous.others_clear),
            key=f"others-clear-{study_id}",
            help="Only with key slices: then every slice not marked counts as no hemorrhage.",
        )
        saved = st.form_submit_button("Save read", type="primary")
    if not saved:
        return None
    if answer is None:
        st.error("Choose yes or no before saving.")
        return None
    if answer == "no" and (subtypes or marks):
        st.session_state[rejected_key] = (
            "A read of no hemorrhage cannot name subtypes or mark slices: nothing was saved, and they were cleared."
        )
        st.rerun()
    if others_clear and not marks:
        st.error("'All other slices are clear' needs key slices: mark where you see hemorrhage.")
        return None
    return answer == "yes", subtypes, [m - 1 for m in marks], others_clear and answer == "yes"


def study_picker_ui(studies: pd.DataFrame) -> int:
    """The study selector (worklist order) and a "next unread" button; returns the study id."""
    ids = [int(i) for i in studies["id"]]
    if st.session_state.get("study") not in ids:
        st.session_state["study"] = ids[0]
    unread = [i for i, status in zip(ids, studies["status"]) if status == STATUS_NEW]

    def next_unread() -> None:
        later = [i for i in unread if ids.index(i) > ids.index(st.session_state["study"])]
        st.session_state["study"] = (later or unread)[0]

    pick_col, next_col = st.columns([4, 1], vertical_alignment="bottom")
    labels = {  # what a reader picks by: the likelihood, the flag and whether it is read yet
        int(r.id): f"{r.label} — likelihood {pct(r.score)}{' · flagged' if r.flagged else ''} · {r.status}"
        for r in studies.itertuples()
    }
    study_id = pick_col.selectbox(
        "Study (worklist order)", ids, format_func=labels.__getitem__, key="study", persist_state="session"
    )
    next_col.button(
        "Next unread", icon=":material/skip_next:", on_click=next_unread, disabled=not unread, width="stretch"
    )
    return study_id


def png_data_uri(image: np.ndarray) -> str:
    """An image as a ``data:`` URI: shown from the session's own message, never from a ``/media`` URL that
    a signed-out client could fetch (``st.image`` of an array puts it there)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def gallery_ui(
    slices: pd.DataFrame,
    vol: np.ndarray,
    window: Window,
    thresholds: Mapping[str, float],
    jump: Callable[[int], None],
    unknown: str = "not labelled",
) -> None:
    """The most suspicious slices with predicted/actual lines; "Show" calls ``jump(1-based slice)``."""
    probs = slices["p_any"].to_numpy(float)
    for col, i in zip(st.columns(GALLERY), np.argsort(-np.nan_to_num(probs, nan=-1.0), kind="stable")[:GALLERY]):
        with col:
            st.image(png_data_uri(explain.render(vol[i], window)[::2, ::2]), width="stretch")
            st.markdown(
                f"**Slice {i + 1}** · any {pct(probs[i])}  \n"
                + findings_markdown(*slice_findings(slices.iloc[i], thresholds), unknown=unknown)
            )
            st.button("Show", key=f"go-{i}", icon=":material/visibility:", on_click=jump, args=(int(i) + 1,))


# --------------------------------------------------------------------------- pages


def upload_page() -> None:
    st.header("Upload")
    st.write(
        "Drop a head-CT exam: its DICOM files, or one or more `.zip` archives. Each exam lands on the worklist, "
        "scored on one series (axial, soft tissue, not a scout or a reformat); files that cannot be read are "
        "listed with the reason."
    )
    run = st.session_state.setdefault("upload_run", 0)
    files = st.file_uploader(
        "DICOM files (.dcm or no extension) or .zip archives", accept_multiple_files=True, key=f"files-{run}"
    )
    csv = st.file_uploader(
        "Labels (optional): RSNA-format CSV, `ID,Label` with ID = `<SOPInstanceUID>_<class>`",
        type=["csv"],
        key=f"labels-{run}",
    )
    pred = model()
    clicked = st.button("Score and add to worklist", type="primary", disabled=not files or pred is None)
    if clicked and pred is not None:  # a disabled button is never clicked
        labels, csv_problem = None, None
        if csv is not None:
            try:
                labels = read_rsna_csv(io.StringIO(csv.getvalue().decode("utf-8-sig")))
            except (ValueError, UnicodeDecodeError) as exc:
                csv_problem = dicom.Problem(csv.name, f"not an RSNA label CSV, so no labels were used: {exc}")
        bar = st.progress(0.0, "Reading files…")
        uploads = [dicom.Upload(f.name, f.getvalue()) for f in files]
        report = ingest(store(), pred, uploads, labels, progress=lambda f, text: bar.progress(f, text))
        if csv_problem:
            report.problems.append(csv_problem)
        bar.empty()
        st.session_state["upload_report"] = report
        st.session_state["upload_run"] = run + 1  # fresh, empty uploaders: the files are on the worklist now
        st.rerun()
    shown: IngestReport | None = st.session_state.get("upload_report")
    if shown is not None:
        if shown.added:
            n = len(shown.added)
            st.success(f"{n} exam{'' if n == 1 else 's'} added to the worklist in {shown.seconds:.1f} s.")
            studies = store().studies()
            st.dataframe(
                studies_table(studies[studies["id"].isin(shown.added)]), hide_index=True, column_config=STUDY_COLUMNS
            )
            st.page_link(PAGES["worklist"], label="Open the worklist", icon=":material/list_alt:")
        else:
            st.warning("No usable CT exam was found in the upload.")
        if shown.problems:
            st.warning(f"{len(shown.problems)} file(s) or exam(s) could not be used; the rest were added.")
            st.dataframe(
                pd.DataFrame([(p.path, p.reason) for p in shown.problems], columns=["file", "reason"]), hide_index=True
            )


def worklist_page() -> None:
    title_col, upload_col = st.columns([4, 1], vertical_alignment="bottom")
    title_col.header("Worklist")
    if upload_col.button("Upload studies", icon=":material/upload:", width="stretch"):
        st.switch_page(PAGES["upload"])
    wl = store()
    intake_ui(wl)
    status = filter_ui()
    studies = wl.studies(status)
    if studies.empty:
        st.info("No studies yet: upload a series." if status is None else "No studies with this status.")
        return
    thresholds = wl.study(int(studies["id"].iloc[0])).thresholds
    st.caption(
        f"Unread studies first, each group by likelihood of hemorrhage, highest first. Likelihood = {pred.aggregation if (pred := model()) else STUDY_AGGREGATION}; "
        f"flagged at ≥ {thresholds.get('any', review.DEFAULT_THRESHOLD):.0%}. "
        "Open a study with its row's button, or select a row and open it below."
        + (" Demo studies are synthetic phantoms with known labels." if studies["demo"].any() else "")
    )
    table = studies_table(studies)
    if identifiers_shown(wl):
        ids = wl.identifiers().set_index("id").reindex(studies["id"])
        table.insert(1, "Patient ID", ids["patient_id"].fillna("—").to_numpy())
        table.insert(2, "Accession", ids["accession"].fillna("—").to_numpy())
    table.insert(0, "Open", ":material/radiology: Open")
    open_key = f"open-row-{status}"
    event = st.dataframe(
        table,
        hide_index=True,
        on_select="rerun",
        selection_mode="single-row",
        key=f"table-{status}",
        selection_default={"selection": {"rows": [0]}},
        column_config={
            **STUDY_COLUMNS,
            "Open": st.column_config.ButtonColumn("", type="tertiary", key=open_key, help="Open in the viewer"),
        },
    )
    clicked = st.session_state.get(open_key)  # set only in the rerun a row's Open button caused
    rows = [clicked["row"]] if clicked else event.selection.rows or [0]
    chosen = wl.study(int(studies["id"].iloc[rows[0]]))
    open_col, export_col, uid_col = st.columns([2, 1, 1], vertical_alignment="center")
    if clicked or open_col.button(f"Open {chosen.label} in the viewer", type="primary", icon=":material/radiology:"):
        st.session_state["study"] = chosen.id
        st.switch_page(PAGES["viewer"])
    uids = uid_col.checkbox(
        "Include DICOM UIDs", key="export_uids", help="Off by default: UIDs can identify a patient's exam."
    )
    with export_col:
        if download_button(
            "Download worklist (CSV)", wl.export_csv(uids=uids).encode(), "ich-worklist.csv", "text/csv",
            key="export-worklist",
        ):  # fmt: skip
            audit("export")


def intake_ui(wl: Worklist) -> None:
    """Exams received but not on the worklist: arriving (not scored on part of an exam), or failed with the
    reason and the next try. Admins may give up on a failed one (its received files are removed)."""
    pending = wl.intake()
    if pending.empty:
        return
    failed = pending[pending["state"] == INTAKE_FAILED]
    if len(pending) > len(failed):
        st.info(
            f"{len(pending) - len(failed)} exam(s) arriving: scored once the sender is quiet.",
            icon=":material/downloading:",
        )
    if failed.empty:
        return
    with st.expander(f":red[{len(failed)} exam(s) received but not on the worklist]", icon=":material/error:"):
        st.dataframe(
            failed[["first_seen", "source", "attempts", "next_try", "reason"]].rename(
                columns={"first_seen": "Received", "source": "How", "attempts": "Attempts", "next_try": "Next try",
                         "reason": "Why"}
            ),
            hide_index=True,
        )  # fmt: skip
        if user().is_admin:
            key = st.selectbox(
                "Exam", failed["key"], format_func=lambda k: f"received {failed.set_index('key').at[k, 'first_seen']}"
            )
            if st.button("Remove this exam and its received files", key="intake-remove"):
                Inbox(data_dir() / "inbox").discard(key)
                wl.intake_done(key)
                audit("remove failed exam")
                st.rerun()


def study_summary_ui(info: StudyRecord, slices: pd.DataFrame, thresholds: Mapping[str, float]) -> None:
    """The study's score, its predicted-vs-actual line, scope warnings and what the numbers mean."""
    probs, truth = (
        slices[[f"p_{c}" for c in CLASSES]].to_numpy(float),
        slices[[f"y_{c}" for c in CLASSES]].to_numpy(float),
    )
    flag = f":red[**flagged**] · most likely subtype **{info.top_subtype or '—'}**" if info.flagged else "not flagged"
    updated = f" · :orange[updated {info.updated[:16].replace('T', ' ')}]" if info.updated else ""
    st.markdown(
        f"Likelihood **{pct(info.score)}** · {flag} · status **{info.status}** · "
        f"{SOURCE_NAMES[info.source]} · scored by {info.model or 'an unnamed model'}{updated}"
    )
    if len(info.exam_series) > 1:
        with st.expander(f"Series in this exam: {len(info.exam_series)}, one scored", icon=":material/stacks:"):
            st.dataframe(exam_series_table(info), hide_index=True)
    study_source = "review" if info.read else next(iter(slices["truth"].dropna()), None)
    st.markdown(
        "**Study** — "
        + findings_markdown(
            review.study_predicted(probs, info.flagged, thresholds),
            review.study_actual(truth, info.read),
            study_source,
        )
    )
    for note in info.notes:
        if note.startswith(scope.NOTE_PREFIX):  # the score may not mean here what it meant on validation
            st.warning(note, icon=":material/report:")
        else:
            st.caption(f":material/warning: Series note: {note}")
    with st.expander("What these numbers mean", icon=":material/info:"):
        st.markdown(scope.score_meaning(pred_metadata()))
        lines = scope.validation_lines(pred_metadata())
        if lines:
            st.markdown(
                "Out-of-fold results of this model on RSNA slices it did not train on (95 % intervals):\n"
                + "\n".join(lines)
                + "\n\nReal DICOM series it never saw, failure modes and limits: `weights/MODEL_CARD.md`. "
                "**Not a medical device.**"
            )


def viewer_page() -> None:
    wl = store()
    studies = wl.studies()
    if studies.empty:
        st.info("No studies yet. Add a series on the Upload page.")
        return
    study_id = study_picker_ui(studies)
    st.query_params["study"] = str(study_id)  # the address is a link to this study
    if st.session_state.get("opened") != study_id:  # audit each study a reader opens, once per switch
        st.session_state["opened"] = study_id
        audit("open", study_id)
    if "flash" in st.session_state:
        st.success(st.session_state.pop("flash"), icon=":material/check_circle:")
    info, slices = wl.study(study_id), wl.slices(study_id)
    directory, version, n, thresholds = str(data_dir()), info.received, info.n_slices, info.thresholds
    try:
        vol = volume(directory, study_id, version)
    except (OSError, ValueError, KeyError) as exc:  # a damaged volume file spoils this study only
        st.error(f"The images of {info.label} cannot be read ({type(exc).__name__}: {exc}). Upload the series again.")
        return
    probs = slices[[f"p_{c}" for c in CLASSES]].to_numpy(float)
    thickness = studies.set_index("id")["thickness"].get(study_id)
    thickness = None if thickness is None or pd.isna(thickness) else float(thickness)
    unassessed = "not assessed by the read" if info.read else "not labelled"  # a slice the read says nothing of

    slice_key, nonce_key, seen_key = f"slice-{study_id}", f"goto-{study_id}", f"viewer-seq-{study_id}"
    if slice_key not in st.session_state:  # open at the most suspicious slice
        st.session_state[slice_key] = int(np.argmax(np.nan_to_num(slices["p_any"].to_numpy(float), nan=-1.0))) + 1

    def jump(to: int) -> None:
        """Move the viewer to slice ``to`` (1-based): a new nonce tells the browser it is a request."""
        st.session_state[slice_key] = to
        st.session_state[nonce_key] = st.session_state.get(nonce_key, 0) + 1

    def jump_to_clicked() -> None:
        points = st.session_state[f"curve-{study_id}"].selection.points
        if points:
            jump(round(points[0]["x"]))

    pred = model()
    image_col, side_col = st.columns([3, 2], gap="medium")
    with side_col:  # filled top-down: the slice's numbers first, controls and the study's summary below
        slice_panel, controls, summary = st.container(), st.container(), st.container()
    with controls:
        shown_series = series_ui(info, wl.other_series(study_id))
        scored = shown_series.series_uid == info.series_uid
        window = window_ui()
        target = heatmap_ui(pred.model_classes if pred else ("any",), enabled=pred is not None and scored)
    with image_col:
        shown = None
        if not scored:  # another series of the exam: its images only, the numbers stay the scored series'
            other_series_ui(directory, study_id, version, shown_series, window)
        else:
            volume_id, volume_bytes, normal, locations, known = viewer_volume(directory, study_id, version)
            weights = str(default_weights())
            shown = slice_viewer(
                volume_id,
                volume_bytes,
                n,
                normal=normal,
                locations=locations,
                positions_known=known,
                goto=st.session_state[slice_key],
                goto_nonce=st.session_state.get(nonce_key, 0),
                window=(window.name, window.level, window.width),
                presets={name: (PRESETS[name].level, PRESETS[name].width) for name in VIEW_WINDOWS},
                slice_notes=[slice_note(row, thresholds) for _, row in slices.iterrows()],
                thickness=thickness,
                heatmap_id=data_id(f"heatmap:{directory}:{study_id}:{version}:{target}:{weights}") if target else None,
                heatmap=(lambda: heatmap_file(directory, study_id, version, target, weights)) if target else None,
                heatmap_label=target or "",
                key=f"viewer-{study_id}",
            )
    if shown and shown.get("seq") != st.session_state.get(seen_key):  # the reader settled on a slice
        st.session_state[seen_key] = shown["seq"]
        st.session_state[slice_key] = int(np.clip(shown["slice"], 1, n))
    index = st.session_state[slice_key] - 1
    row = slices.iloc[index]
    with summary:
        study_summary_ui(info, slices, thresholds)
    with slice_panel:
        st.markdown(
            f"**Slice {index + 1} / {n}** — "
            + findings_markdown(*slice_findings(row, thresholds), row["truth"], unassessed)
        )
        st.dataframe(
            pd.DataFrame(
                {
                    "class": CLASSES,
                    "probability": probs[index] * 100,
                    # Blank where the checkpoint does not name the class (ich.labels.NOT_NAMED).
                    "threshold": [
                        t * 100 if t < NOT_NAMED else None
                        for t in (thresholds.get(c, review.DEFAULT_THRESHOLD) for c in CLASSES)
                    ],
                }
            ),
            hide_index=True,
            column_config={
                "probability": PERCENT_BAR,
                "threshold": st.column_config.NumberColumn(
                    format="%.1f%%", help="Called at or above this. Blank: this model does not name the class."
                ),
            },
        )
        st.plotly_chart(
            probability_figure(slices, index, thresholds),
            key=f"curve-{study_id}",
            on_select=jump_to_clicked,
            selection_mode="points",
            config={"displayModeBar": False},
        )

    st.subheader("Most suspicious slices")
    gallery_ui(slices, vol, window, thresholds, jump, unassessed)

    st.subheader("Your read")
    if info.read:
        st.caption(f"Last read {local_time(info.read.created)}: {review.describe(info.read.findings)}")
    saved = read_ui(study_id, n, info.read, index)
    if saved is not None:
        read = wl.save_review(study_id, *saved)
        audit("read", study_id)
        st.session_state["flash"] = f"Read saved for {info.label}: {review.describe(read.findings)}"
        st.rerun()  # redraw the header and lines with the read as the actual
    uids = st.checkbox(
        "Include SOPInstanceUIDs", key="slice_uids", help="Off by default: UIDs can identify a patient's exam."
    )
    if download_button(
        "Download slice scores (CSV)", wl.slices_csv(study_id, uids=uids).encode(),
        f"ich-study-{study_id}-slices.csv", "text/csv", key=f"export-slices-{study_id}",
    ):  # fmt: skip
        audit("export", study_id)
    results_ui(wl, study_id)
    if user().is_admin:
        delete_ui(wl, study_id, info.label)


def other_series_ui(directory: str, study_id: int, version: str, series: SeriesChoice, window: Window) -> None:
    """An unscored series of the exam in the slice viewer: its images, no probabilities, no heatmap."""
    st.info(
        f"Not scored by the model: {series.reason}. The probabilities, the heatmap and your read are for the "
        "scored series (choose it under Series).",
        icon=":material/info:",
    )
    volume_id, volume_bytes, normal, locations, known = viewer_volume(directory, study_id, version, series.series_uid)
    n = len(locations)
    slice_viewer(
        volume_id,
        volume_bytes,
        n,
        normal=normal,
        locations=locations,
        positions_known=known,
        goto=(n + 1) // 2,
        goto_nonce=0,
        window=(window.name, window.level, window.width),
        presets={name: (PRESETS[name].level, PRESETS[name].width) for name in VIEW_WINDOWS},
        slice_notes=["not scored"] * n,
        thickness=series.thickness,
        key=f"viewer-{study_id}-{series.series_uid}",
    )


def delete_ui(wl: Worklist, study_id: int, label: str) -> None:
    """Admins only: remove a study (with a confirmation), e.g. a demo or a wrong upload."""
    with st.expander(f"Delete {label}", icon=":material/delete:"):
        sure = st.checkbox("Yes, delete this study, its slices and its reads", key=f"delete-sure-{study_id}")
        if st.button("Delete", disabled=not sure, key=f"delete-{study_id}"):
            wl.delete_study(study_id)
            audit("delete", study_id)
            st.session_state.pop("study", None)
            st.session_state["flash"] = f"{label} deleted."
            st.rerun()


def results_ui(wl: Worklist, study_id: int) -> None:
    """The study's DICOM results (SR + key image, :func:`ich.results.study_results_zip`) for the reader's PACS.

    Built only when asked for (a SR and a Grad-CAM key image take a few seconds), then offered from the
    page itself (:func:`ich.viewer.component.download_button`); audited like the CSV exports.
    """
    from ich import results  # highdicom, loaded once a study is shown rather than at every start

    if wl.header(study_id) is None:
        st.caption(f":material/info: {results.NO_HEADER}.")
        return
    pred = model()
    cam = (lambda hu: explain.grad_cam(pred, hu, "any")) if pred and "any" in pred.model_classes else None
    aggregation = pred.aggregation if pred else STUDY_AGGREGATION
    built = f"results-{study_id}-{wl.study(study_id).received}"  # a re-score needs new results
    if built not in st.session_state:
        if st.button("Prepare results for PACS (DICOM SR + key image)", icon=":material/download:"):
            with st.spinner("Building the structured report and the key image…"):
                st.session_state[built] = results.study_results_zip(wl, study_id, cam, aggregation)
            st.rerun()
    elif download_button(
        "Download results for PACS (.zip)", st.session_state[built], f"ich-study-{study_id}-results.zip",
        "application/zip", key=f"export-results-{study_id}",
    ):  # fmt: skip
        audit("export", study_id)
    st.caption(
        "Two DICOM files for the scanned study, as new series: a structured report and a key image. "
        "**They carry the patient's identifiers from the original headers** (name, ID, birth date, "
        "accession), so PACS files them with the scan. Not for diagnostic use."
    )


# --------------------------------------------------------------------------- app


def home_page() -> None:
    """``/``: the worklist, under its own address so that ``/worklist`` works as a link too."""
    st.switch_page(PAGES["worklist"])


PAGES: dict[str, st.Page] = {
    "home": st.Page(home_page, title="ich", url_path="home", default=True, visibility="hidden"),
    "upload": st.Page(upload_page, title="Upload", icon=":material/upload:", url_path="upload"),
    "worklist": st.Page(worklist_page, title="Worklist", icon=":material/list_alt:", url_path="worklist"),
    "viewer": st.Page(viewer_page, title="Viewer", icon=":material/radiology:", url_path="viewer"),
}


def page_icon() -> Image.Image:
    """The tab icon, drawn here: a material-symbol icon would be fetched from a font host, which an offline
    hospital network cannot reach."""
    icon = np.zeros((64, 64, 3), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    icon[(yy - 32) ** 2 / 30**2 + (xx - 32) ** 2 / 24**2 < 1] = (200, 200, 200)  # a head
    icon[(yy - 26) ** 2 + (xx - 40) ** 2 < 8**2] = (220, 40, 40)  # and a bleed
    return Image.fromarray(icon)


def pred_metadata() -> dict:
    """The loaded checkpoint's metadata (empty when no model could be loaded)."""
    pred = model()
    return pred.metadata if pred is not None else {}


def identifiers_shown(wl: Worklist) -> bool:
    """Patient ID and accession on screen: only when an admin turned them on, and only behind sign-in."""
    return wl.identifiers_on and access.load_config() is not None


def identifiers_ui(wl: Worklist) -> None:
    """Admins (signed in): turn identifiers on or off for this worklist."""
    if not user().is_admin or access.load_config() is None:
        return

    def changed() -> None:
        on = bool(st.session_state["identifiers_on"])
        wl.set_identifiers(on)
        audit("identifiers-on" if on else "identifiers-off")

    st.sidebar.toggle(
        "Patient ID and accession",
        value=wl.identifiers_on,
        key="identifiers_on",
        on_change=changed,
        help="Kept and shown to signed-in users from the next study on; turning it off erases the stored ones.",
    )


def user() -> access.User:
    return st.session_state["ich_user"]


def audit(action: str, study: int | None = None) -> None:
    access.AuditLog().record(user().username, action, study)


SIGNED_IN = "ich_signed_in"  # session state: the user this browser tab signed in as (no cookie: docs/ARCHITECTURE.md)


def sign_in_ui() -> access.User:
    """The signed-in user; stops the page at the sign-in form until there is one.

    Without a sign-in file the server is single-user and local: everyone is the local admin, and a
    server listening beyond this machine refuses to serve (see :func:`ich.access.refuse_reason`).
    """
    files.warn_permissions(data_dir())
    config = access.load_config()
    refusal = access.refuse_reason(str(st.get_option("server.address") or ""), config)
    if refusal:
        st.error(refusal, icon=":material/lock:")
        st.stop()
    if config is None:
        return access.User("local", "admin")
    name = str(st.session_state.get(SIGNED_IN, ""))
    if name not in config["credentials"]["usernames"]:  # signed out, or removed from the sign-in file since
        sign_in_form_ui(config)
    st.sidebar.button("Sign out", on_click=st.session_state.pop, args=(SIGNED_IN, None))
    return access.User(name, access.role_of(config, name))


def sign_in_form_ui(config: dict) -> None:
    """The sign-in form; stops the page. A right password, while no lock holds, signs this tab in.

    :func:`ich.access.sign_in` throttles and audits each attempt, so a sign-in is audited once, when
    its password is checked, however often the page reruns.
    """
    with st.form("sign-in", clear_on_submit=True):
        st.subheader("Sign in to ich")
        username = st.text_input("Username", autocomplete="username")
        password = st.text_input("Password", type="password", autocomplete="current-password")
        submitted = st.form_submit_button("Login")
    if submitted:
        address = access.client_address(st.context.ip_address)
        try:
            st.session_state[SIGNED_IN] = access.sign_in(config, username, password, address).username
        except access.SignInError as exc:
            st.error(str(exc), icon=":material/lock:")
        else:
            st.rerun()  # the page, without the form
    st.stop()


@st.fragment(run_every=ARRIVALS_POLL_SECONDS)
def arrivals_ui(wl: Worklist) -> None:
    """A toast for each flagged study that lands while this page is open (DICOM listener, other uploads)."""
    studies = wl.studies()
    newest = int(studies["id"].max()) if len(studies) else 0
    seen = st.session_state.setdefault("seen_study_id", newest)
    for row in studies[(studies["id"] > seen) & studies["flagged"]].itertuples():
        st.toast(f"Flagged: {row.label} ({pct(row.score)} likelihood)", icon=":material/priority_high:")
    st.session_state["seen_study_id"] = max(seen, newest)


def deep_link_ui(page: st.Page) -> None:
    """``?study=ID`` opens that study in the viewer (once per session; the viewer keeps the address current)."""
    if st.session_state.get("deep_link_done"):  # only the address a session starts from is a request
        return
    st.session_state["deep_link_done"] = True
    requested = st.query_params.get("study", "")
    if requested.isdigit() and int(requested) in set(store().studies()["id"]):
        st.session_state["study"] = int(requested)
        if page.url_path != PAGES["viewer"].url_path:
            st.switch_page(PAGES["viewer"])


def seed_demo_ui(wl: Worklist, pred: Predictor | None) -> None:
    """First start: fill an empty worklist with synthetic demo studies, showing progress.

    Never where real studies already arrived (the listener, an earlier upload), or with ``ICH_DEMO=0``.
    """
    if pred is None or wl.get_meta("demo_seeded") is not None or len(wl) or os.environ.get("ICH_DEMO") == "0":
        return
    bar = st.progress(0.0, "First start: preparing demo studies…")
    report = seed_demo(
        wl, pred, progress=lambda f, text: bar.progress(f, f"First start: preparing demo studies — {text}")
    )
    bar.empty()
    if report is not None and report.problems:
        st.warning("Some demo studies could not be prepared: " + "; ".join(map(str, report.problems)))


def main() -> None:
    dicom.quiet_invalid_values()  # this server is an entry point: uploads of RSNA files must not warn per file
    st.set_page_config(
        page_title="ich · hemorrhage triage", page_icon=page_icon(), layout="wide", initial_sidebar_state="collapsed"
    )
    st.warning(NOTICE, icon=":material/warning:")
    st.session_state["ich_user"] = signed_in = sign_in_ui()  # nothing below runs for a signed-out client
    page = st.navigation(list(PAGES.values()), position="top")  # the reading screen keeps its width
    deep_link_ui(page)
    if signed_in.username != "local":
        st.sidebar.caption(f"Signed in as **{signed_in.username}** ({signed_in.role}).")
    pred, why = load_model()
    if pred is None:
        st.error(f"The model could not be loaded, so uploads and heatmaps are off. {why}")
    else:
        st.sidebar.caption(f"Model: {pred.name}. Worklist and reads are stored on this server only.")
    try:
        identifiers_ui(store())
        seed_demo_ui(store(), pred)
        arrivals_ui(store())
        page.run()
    except StoreError as exc:  # a damaged database: say which file and what to do, never a traceback
        st.error(str(exc), icon=":material/database:")


if __name__ == "__main__":
    main()
