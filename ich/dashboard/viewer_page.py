"""The Viewer page: one exam's slices in the browser viewer, the model's numbers beside them, the read."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from ich import explain, review, scope
from ich.dashboard.resources import (
    ViewerVolume,
    aggregation,
    heatmap_file,
    model,
    pred_metadata,
    shown_volume,
    store,
    viewer_volume,
    volume,
)
from ich.dashboard.session import audit, user
from ich.dashboard.worklist_page import PERCENT_BAR
from ich.exam import SeriesChoice
from ich.inference import default_weights
from ich.labels import CLASSES, NOT_NAMED, SUBTYPES
from ich.presentation import (
    SOURCE_NAMES,
    exam_series_table,
    findings_markdown,
    flag_rule,
    local_time,
    pct,
    png_bytes,
    png_data_uri,
    probability_figure,
    slice_findings,
    slice_note,
)
from ich.viewer.component import data_id, download_button, slice_viewer
from ich.viewer.planes import Planes
from ich.windowing import PRESETS, Window, render
from ich.worklist import STATUS_NEW, StudyRecord, Worklist, data_dir

VIEW_WINDOWS = ("brain", "subdural", "bone", "stroke")
GALLERY = 6


def window_ui() -> Window:
    name = st.segmented_control(
        "Window", (*VIEW_WINDOWS, "custom"), default="brain", required=True, key="window", persist_state="session",
        label_visibility="collapsed", help="Window presets (keys 1-3 on the image; left-drag windows freely)",
    )  # fmt: skip
    if name != "custom":
        return PRESETS[name]
    level_col, width_col = st.columns(2)
    level = level_col.number_input("Level (HU)", -1000, 3000, 40, step=10, key="level", persist_state="session")
    width = width_col.number_input("Width (HU)", 1, 4000, 80, step=10, key="width", persist_state="session")
    return Window("custom", float(level), float(width))


def heatmap_ui(classes: tuple[str, ...], enabled: bool) -> str | None:
    """The class to explain, or ``None`` when the overlay is off."""
    on_col, target_col = st.columns([4, 3], vertical_alignment="center")
    on = on_col.toggle("Heatmap", key="heatmap", disabled=not enabled, persist_state="session")
    target = target_col.selectbox(
        "for", classes, key="heatmap_target", disabled=not on, label_visibility="collapsed", persist_state="session",
        help="Grad-CAM: where the model looked for this class; not a segmentation of the bleed. H on the image hides it.",
    )  # fmt: skip
    return target if on else None


def thin_ui(planes: Planes) -> bool:
    """For a thin series: whether to show its thin slices instead of the slabs the model scored."""
    if not planes.slabbed:  # nothing to choose: the series' own slices are shown
        return False
    return st.toggle(
        "Thin slices",
        key="thin",
        persist_state="session",
        help=f"Off: the {len(planes)} ~5 mm slabs the model scored (each the mean of its "
        "thin slices), quick to scroll and window. On: every thin slice as stored.",
    )


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
        label_visibility="collapsed",
        help="The model scored one series of the exam; the others are here to look at, without probabilities.",
    )  # fmt: skip


def read_ui(
    study_id: int, n_slices: int, previous: review.Read | None, current: range, unit: str
) -> tuple[bool, list[str], list[int], bool] | None:
    """The radiologist's read form; ``(hemorrhage, subtypes, 0-based key slices, others clear)`` when saved.

    ``current``: the 0-based slices of the plane on screen (one slice, or a slab's), which "Mark" adds.
    """
    marks_key, subtypes_key, rejected_key = f"marks-{study_id}", f"sub-{study_id}", f"read-rejected-{study_id}"
    if rejected_key in st.session_state:  # the last save was refused: its choices are cleared, not kept for the next
        st.session_state[subtypes_key], st.session_state[marks_key] = [], []
        st.error(st.session_state.pop(rejected_key))
    if marks_key not in st.session_state:
        st.session_state[marks_key] = [i + 1 for i in previous.slice_marks] if previous else []
    if subtypes_key not in st.session_state:
        st.session_state[subtypes_key] = list(previous.subtypes) if previous else []

    def mark_current() -> None:
        st.session_state[marks_key] = sorted(set(st.session_state[marks_key]) | {i + 1 for i in current})

    what = (
        f"slice {current.start + 1}"
        if len(current) == 1
        else f"{unit.lower()} (slices {current.start + 1}–{current.stop})"
    )
    st.button(
        f"Mark {what} as showing hemorrhage", on_click=mark_current, key=f"mark-{study_id}", shortcut="M",
        icon=":material/bookmark_add:",
    )  # fmt: skip
    with st.form(f"read-{study_id}", border=True):
        answer_col, save_col = st.columns([3, 2], vertical_alignment="bottom")
        answer = answer_col.radio(
            "Hemorrhage",
            ("yes", "no"),
            horizontal=True,
            key=f"hem-{study_id}",
            index=None if previous is None else (0 if previous.hemorrhage else 1),
        )
        saved = save_col.form_submit_button("Save read", type="primary", shortcut="Ctrl+Enter", width="stretch")
        subtypes = st.multiselect(
            "Subtypes", SUBTYPES, key=subtypes_key, label_visibility="collapsed", placeholder="Subtypes (optional)"
        )
        marks = st.multiselect(
            "Key slices: where you see hemorrhage (optional; slices not marked count as not assessed)",
            range(1, n_slices + 1),
            key=marks_key,
            label_visibility="collapsed",
            placeholder="Key slices: where you see hemorrhage (optional; M marks the one on screen)",
        )
        others_clear = st.checkbox(
            "All other slices are clear",
            value=bool(previous and previous.others_clear),
            key=f"others-clear-{study_id}",
            help="Only with key slices: then every slice not marked counts as no hemorrhage; unmarked slices "
            "otherwise count as not assessed.",
        )
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


def study_picker_ui(studies: pd.DataFrame) -> tuple[int, DeltaGenerator]:
    """The study selector (worklist order) and previous / next unread buttons (K / J); returns the study id
    and the place beside it for the series selector."""
    ids = [int(i) for i in studies["id"]]
    if st.session_state.get("study") not in ids:
        st.session_state["study"] = ids[0]
    unread = [i for i, status in zip(ids, studies["status"]) if status == STATUS_NEW]

    def move(step: int) -> None:
        """To the next (``1``) or previous (``-1``) unread study in worklist order, wrapping around."""
        here = ids.index(st.session_state["study"])
        ahead = [i for i in unread if (ids.index(i) - here) * step > 0]
        st.session_state["study"] = (ahead[::step] or unread[::step])[0]

    pick_col, series_col, prev_col, next_col = st.columns([4, 3, 1.5, 1.5], vertical_alignment="bottom")
    labels = {  # what a reader picks by: the likelihood, the flag and whether it is read yet
        int(r.id): f"{r.label} — likelihood {pct(r.score)}{' · flagged' if r.flagged else ''} · {r.status}"
        for r in studies.itertuples()
    }
    study_id = pick_col.selectbox(
        "Study (worklist order)", ids, format_func=labels.__getitem__, key="study", persist_state="session",
        label_visibility="collapsed",
    )  # fmt: skip
    prev_col.button(
        "Prev unread", icon=":material/skip_previous:", help="The previous unread study in worklist order", on_click=move, args=(-1,), disabled=not unread,
        width="stretch", shortcut="K",
    )  # fmt: skip
    next_col.button(
        "Next unread", icon=":material/skip_next:", help="The next unread study in worklist order", on_click=move, args=(1,), disabled=not unread, width="stretch",
        shortcut="J",
    )  # fmt: skip
    return study_id, series_col


def gallery_ui(
    slices: pd.DataFrame,
    planes: Planes,
    shown: np.ndarray,
    window: Window,
    thresholds: Mapping[str, float],
    jump: Callable[[int], None],
    unknown: str = "not labelled",
) -> None:
    """The most suspicious planes (slices, or a thin series' slabs: six different ones, not six neighbours)
    with predicted/actual lines; "Show" calls ``jump(1-based slice)``."""
    rows = slices.iloc[planes.first]
    probs = rows["p_any"].to_numpy(float)
    for col, k in zip(st.columns(GALLERY), np.argsort(-np.nan_to_num(probs, nan=-1.0), kind="stable")[:GALLERY]):
        first = int(planes.first[k])
        with col:
            st.image(png_data_uri(render(shown[k], window)[::2, ::2]), width="stretch")
            st.markdown(
                f"**{planes.label(int(k), of_total=False)}** · any {pct(probs[k])}  \n"
                + findings_markdown(*slice_findings(rows.iloc[k], thresholds), unknown=unknown)
            )
            st.button("Show", key=f"go-{first}", icon=":material/visibility:", on_click=jump, args=(first + 1,))


def page() -> None:
    wl = store()
    studies = wl.studies()
    if studies.empty:
        st.info("No studies yet. Add a series on the Upload page.")
        return
    study_id, series_place = study_picker_ui(studies)
    st.query_params["study"] = str(study_id)  # the address is a link to this study
    if st.session_state.get("opened") != study_id:  # audit each study a reader opens, once per switch
        st.session_state["opened"] = study_id
        audit("open", study_id)
    if "flash" in st.session_state:
        st.success(st.session_state.pop("flash"), icon=":material/check_circle:")
    info, slices = wl.study(study_id), wl.slices(study_id)
    directory, version = str(data_dir()), info.received
    try:
        volume(directory, study_id, version)
    except (OSError, ValueError, KeyError) as exc:  # a damaged volume file spoils this study only
        st.error(f"The images of {info.label} cannot be read ({type(exc).__name__}: {exc}). Upload the series again.")
        return
    slice_key, nonce_key = f"slice-{study_id}", f"goto-{study_id}"
    if slice_key not in st.session_state:  # open at the most suspicious slice
        st.session_state[slice_key] = int(np.argmax(np.nan_to_num(slices["p_any"].to_numpy(float), nan=-1.0))) + 1

    def jump(to: int) -> None:
        """Move the viewer to slice ``to`` (1-based): a new nonce tells the browser it is a request."""
        st.session_state[slice_key] = to
        st.session_state[nonce_key] = st.session_state.get(nonce_key, 0) + 1

    unassessed = "not assessed by the read" if info.read else "not labelled"  # a slice the read says nothing of
    thickness = studies.set_index("id")["thickness"].get(study_id)
    thickness = None if thickness is None or pd.isna(thickness) else float(thickness)
    with series_place:
        shown_series = series_ui(info, wl.other_series(study_id))
    reading_screen(wl, info, slices, thickness, shown_series, jump, unassessed)

    shown = viewer_volume(directory, study_id, version, bool(st.session_state.get("thin")))
    st.subheader(f"Most suspicious {shown.planes.unit.lower()}s")
    gallery_ui(
        slices, shown.planes, shown_volume(directory, study_id, version, bool(st.session_state.get("thin"))),
        current_window(), info.thresholds, jump, unassessed,
    )  # fmt: skip
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
        delete_study_form(wl, study_id, info.label)


def current_window() -> Window:
    """The window the toolbar shows (the gallery below follows it on the page's next full run)."""
    name = st.session_state.get("window") or "brain"
    if name != "custom":
        return PRESETS[name]
    return Window("custom", float(st.session_state.get("level", 40)), float(st.session_state.get("width", 80)))


@st.fragment
def reading_screen(
    wl: Worklist,
    info: StudyRecord,
    slices: pd.DataFrame,
    thickness: float | None,
    shown_series: SeriesChoice,
    jump: Callable[[int], None],
    unassessed: str,
) -> None:
    """The reading screen: toolbar, image and, beside it, the slice's numbers and the read (saved from here).

    A fragment: settling on a slice or changing the window reruns this alone, not the gallery and exports
    below, so the side panel follows the reader quickly (issue 25).
    """
    study_id, n, thresholds = info.id, info.n_slices, info.thresholds
    directory, version = str(data_dir()), info.received
    slice_key, nonce_key, seen_key = f"slice-{study_id}", f"goto-{study_id}", f"viewer-seq-{study_id}"
    pred = model()
    image_col, side_col = st.columns([3, 2], gap="medium")
    with image_col:
        window_col, heat_col, thin_col = st.columns([9, 5, 4], vertical_alignment="center")
        scored = shown_series.series_uid == info.series_uid
        with window_col:
            window = window_ui()
        with heat_col:
            target = heatmap_ui(pred.model_classes if pred else ("any",), enabled=pred is not None and scored)
        series_uid = None if scored else shown_series.series_uid
        with thin_col:
            default = viewer_volume(directory, study_id, version, False, series_uid)
            thin = thin_ui(default.planes)
        shown = viewer_volume(directory, study_id, version, thin, series_uid) if thin else default
        planes = shown.planes
        reported = None
        if not scored:  # another series of the exam: its images only, the numbers stay the scored series'
            other_series_ui(shown, shown_series, window, key=f"viewer-{study_id}-{series_uid}")
            planes = viewer_volume(directory, study_id, version, thin).planes  # the side panel's: the scored one's
        else:
            weights = str(default_weights())
            rows = slices.iloc[planes.first]
            heat_key = f"heatmap:{directory}:{study_id}:{version}:{target}:{weights}:{thin}"
            reported = viewer_ui(
                shown,
                goto=int(planes.of_slice[st.session_state[slice_key] - 1]) + 1,
                goto_nonce=st.session_state.get(nonce_key, 0),
                window=window,
                slice_notes=[slice_note(row, thresholds) for _, row in rows.iterrows()],
                thickness=None if planes.slabbed else thickness,  # a slab's span is in its label
                heatmap_id=data_id(heat_key) if target else None,
                heatmap=(lambda: heatmap_file(directory, study_id, version, target, weights, thin)) if target else None,
                heatmap_label=target or "",
                key=f"viewer-{study_id}",
            )
    if reported and reported.get("seq") != st.session_state.get(seen_key):  # the reader settled on a plane
        st.session_state[seen_key] = reported["seq"]
        k = int(np.clip(reported["slice"], 1, len(planes))) - 1
        if planes.of_slice[st.session_state[slice_key] - 1] != k:  # a slice within the plane stays chosen
            st.session_state[slice_key] = int(planes.first[k]) + 1
    index = st.session_state[slice_key] - 1
    plane = int(planes.of_slice[index])
    with side_col:
        slice_panel_ui(slices, index, planes, thresholds, unassessed)
        read_tab, curve_tab, study_tab = st.tabs(["Your read", "Along the series", "Study"])
        with read_tab:
            if info.read:
                st.caption(f"Last read {local_time(info.read.created)}: {review.describe(info.read.findings)}")
            span = range(int(planes.first[plane]), int(planes.last[plane]) + 1)
            saved = read_ui(study_id, n, info.read, span, planes.unit)
            if saved is not None:
                read = wl.save_review(study_id, *saved)
                audit("read", study_id)
                st.session_state["flash"] = f"Read saved for {info.label}: {review.describe(read.findings)}"
                st.rerun()  # the whole page: the header and lines show the read as the actual
        with curve_tab:

            def jump_to_clicked() -> None:
                points = st.session_state[f"curve-{study_id}"].selection.points
                if points:
                    jump(round(points[0]["x"]))

            st.plotly_chart(
                probability_figure(slices, index, thresholds),
                key=f"curve-{study_id}",
                on_select=jump_to_clicked,
                selection_mode="points",
                config={"displayModeBar": False},
            )
        with study_tab:
            study_summary_ui(info, slices, thresholds)


def viewer_ui(
    shown: ViewerVolume,
    *,
    goto: int,
    goto_nonce: int,
    window: Window,
    slice_notes: list[str],
    thickness: float | None,
    heatmap_id: str | None = None,
    heatmap: Callable[[], bytes] | None = None,
    heatmap_label: str = "",
    key: str,
) -> dict | None:
    """The slice viewer on ``shown``'s planes; the plane the reader settled on (1-based) when reported."""
    planes = shown.planes

    def preview() -> bytes:  # the first image, before the browser has loaded the viewer and the volume
        return png_bytes(render(shown.hu()[goto - 1], window))

    return slice_viewer(
        shown.volume_id,
        shown.data,
        len(planes),
        normal=shown.normal,
        locations=shown.locations,
        positions=shown.positions,
        positions_known=shown.known,
        unit=planes.unit,
        spans=[(int(a) + 1, int(b) + 1) for a, b in zip(planes.first, planes.last)] if planes.slabbed else None,
        goto=goto,
        goto_nonce=goto_nonce,
        window=(window.name, window.level, window.width),
        presets={name: (PRESETS[name].level, PRESETS[name].width) for name in VIEW_WINDOWS},
        slice_notes=slice_notes,
        thickness=thickness,
        heatmap_id=heatmap_id,
        heatmap=heatmap,
        heatmap_label=heatmap_label,
        preview=preview,
        key=key,
    )


def slice_panel_ui(
    slices: pd.DataFrame, index: int, planes: Planes, thresholds: Mapping[str, float], unassessed: str
) -> None:
    """The plane on screen: its findings line and each class's probability against its threshold."""
    row = slices.iloc[index]
    plane = int(planes.of_slice[index])
    st.markdown(
        f"**{planes.label(plane)}** — " + findings_markdown(*slice_findings(row, thresholds), row["truth"], unassessed)
    )
    st.dataframe(
        pd.DataFrame(
            {
                "class": CLASSES,
                "probability": [row[f"p_{c}"] * 100 for c in CLASSES],
                # "not named" where the checkpoint does not name the class (ich.labels.NOT_NAMED).
                "threshold": [
                    f"{t:.1%}" if t < NOT_NAMED else "not named"
                    for t in (thresholds.get(c, review.DEFAULT_THRESHOLD) for c in CLASSES)
                ],
            }
        ),
        hide_index=True,
        column_config={
            "probability": PERCENT_BAR,
            "threshold": st.column_config.TextColumn(help="Called at or above this. " + scope.subtype_rule(thresholds)),
        },
    )


def study_summary_ui(info: StudyRecord, slices: pd.DataFrame, thresholds: Mapping[str, float]) -> None:
    """The study's score, its predicted-vs-actual line, scope warnings and what the numbers mean."""
    probs, truth = (
        slices[[f"p_{c}" for c in CLASSES]].to_numpy(float),
        slices[[f"y_{c}" for c in CLASSES]].to_numpy(float),
    )
    flag = f":red[**flagged**] · most likely subtype **{info.top_subtype or '—'}**" if info.flagged else "not flagged"
    updated = f" · :orange[updated {local_time(info.updated)}]" if info.updated else ""
    st.markdown(
        f"Likelihood **{pct(info.score)}** · {flag} · status **{info.status}** · "
        f"{SOURCE_NAMES[info.source]} · scored by {info.model or 'an unnamed model'}{updated}"
    )
    st.caption(flag_rule(info.top_k, info.thresholds.get("any", review.DEFAULT_THRESHOLD), aggregation()) + ".")
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
        st.markdown(scope.score_meaning(pred_metadata()) + " " + scope.subtype_rule(thresholds))
        lines = scope.validation_lines(pred_metadata())
        if lines:
            st.markdown(
                "Out-of-fold results of this model on RSNA slices it did not train on (95 % intervals):\n"
                + "\n".join(lines)
                + "\n\nReal DICOM series it never saw, failure modes and limits: `weights/MODEL_CARD.md`. "
                "**Not a medical device.**"
            )


def other_series_ui(shown: ViewerVolume, series: SeriesChoice, window: Window, key: str) -> None:
    """An unscored series of the exam in the slice viewer: its images, no probabilities, no heatmap."""
    st.info(
        f"Not scored by the model: {series.reason}. The probabilities, the heatmap and your read are for the "
        "scored series (choose it under Series).",
        icon=":material/info:",
    )
    planes = shown.planes
    viewer_ui(
        shown,
        goto=(len(planes) + 1) // 2,
        goto_nonce=0,
        window=window,
        slice_notes=["not scored"] * len(planes),
        thickness=None if planes.slabbed else series.thickness,
        key=key,
    )


def delete_study_form(wl: Worklist, study_id: int, label: str) -> None:
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
    record = wl.study(study_id)
    how = aggregation(record.top_k)  # the study's own rule, not the loaded model's (they differ after an update)
    built = f"results-{study_id}-{record.received}"  # a re-score needs new results
    if built not in st.session_state:
        if st.button("Prepare results for PACS (DICOM SR + key image)", icon=":material/download:"):
            with st.spinner("Building the structured report and the key image…"):
                st.session_state[built] = results.study_results_zip(wl, study_id, cam, how)
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
