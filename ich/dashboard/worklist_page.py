"""The Worklist page: exams by hemorrhage likelihood, unread first; arrivals, intake problems, the demo."""

from __future__ import annotations

import json
import os

import pandas as pd
import streamlit as st

from ich import review
from ich.dashboard import navigation
from ich.dashboard.resources import DemoSeeding, aggregation, demo_seeding, store
from ich.dashboard.session import audit, identifiers_shown, user
from ich.inference import Predictor
from ich.listener import Inbox
from ich.presentation import OPEN_PREFIX, pct, studies_table, worklist_rule
from ich.viewer.component import download_button
from ich.worklist import INTAKE_FAILED, STATUSES, Worklist, data_dir
from ich.worklist.intake import DEMO_SEEDED

ARRIVALS_POLL_SECONDS = 10  # how often an open page checks for flagged studies from the listener or other readers
DEMO_POLL_SECONDS = 2  # how often an open page shows the first-start demo's progress
PERCENT_BAR = st.column_config.ProgressColumn(format="%.0f%%", min_value=0, max_value=100)
# Widths (px) that fit every column on a 1440-pixel reading screen; a cut description shows whole on hover.
STUDY_COLUMNS = {
    "Study": st.column_config.TextColumn(width=135),
    "Exam": st.column_config.TextColumn(width=120, help="Study date and time from the scanner"),
    "Description": st.column_config.TextColumn(width=140),
    "Received": st.column_config.DatetimeColumn(
        format="YYYY-MM-DD HH:mm", width=120, help="When it reached this worklist"
    ),
    "Source": st.column_config.TextColumn(width=65),
    "Slices": st.column_config.NumberColumn(width=55),
    "Thickness": st.column_config.NumberColumn(format="%.1f mm", width=80),
    "Likelihood": st.column_config.ProgressColumn(format="%.0f%%", min_value=0, max_value=100, width=110),
    "Most likely subtype": st.column_config.TextColumn("Subtype", width=120),
    "Flag": st.column_config.TextColumn(width=85, help="Likelihood at or above the flag threshold"),
    "Status": st.column_config.TextColumn(width=140),
}


def filter_ui() -> str | None:
    choice = st.segmented_control(
        "Show", ("all", *STATUSES), default="all", required=True, key="status_filter", persist_state="session"
    )
    return None if choice == "all" else choice


def page() -> None:
    title_col, upload_col = st.columns([4, 1], vertical_alignment="bottom")
    title_col.header("Worklist")
    if upload_col.button("Upload studies", icon=":material/upload:", width="stretch"):
        navigation.go("upload")
    wl = store()
    pending_exams_panel(wl)
    status = filter_ui()
    studies = wl.studies(status)
    if studies.empty:
        st.info("No studies yet: upload a series." if status is None else "No studies with this status.")
        return
    # Each study's own rule, as stored when it was scored: studies scored by different models may differ.
    rules = [
        (None if pd.isna(k) else int(k), float(json.loads(t).get("any", review.DEFAULT_THRESHOLD)))
        for k, t in zip(studies["top_k"], studies["thresholds"])
    ]
    st.caption(
        "Unread studies first, each group by likelihood of hemorrhage, highest first. "
        + worklist_rule(rules, aggregation())
        + " "
        "Open a study with its row's button, or select a row and open it below."
        + (" Demo studies are synthetic phantoms with known labels." if studies["demo"].any() else "")
    )
    table = studies_table(studies)
    if identifiers_shown(wl):
        ids = wl.identifiers().set_index("id").reindex(studies["id"])
        table.insert(1, "Patient ID", ids["patient_id"].fillna("—").to_numpy())
        table.insert(2, "Accession", ids["accession"].fillna("—").to_numpy())
    # Each row's button names its study: a click opens that study even if the list was re-sorted since
    # it was drawn (an arrival, another reader's read); a row position would open whichever sits there now.
    table.insert(0, "Open", [f"{OPEN_PREFIX}{i}" for i in studies["id"]])
    open_key = f"open-row-{status}"
    drawn_key = f"drawn-{status}"  # the ids in the order the reader saw them, for the selection below
    event = st.dataframe(
        table,
        hide_index=True,
        on_select="rerun",
        selection_mode="single-row",
        key=f"table-{status}",
        selection_default={"selection": {"rows": [0]}},
        column_config={
            **STUDY_COLUMNS,
            "Open": st.column_config.ButtonColumn(
                "", type="tertiary", key=open_key, width=75, help="Open in the viewer"
            ),
        },
    )
    clicked = st.session_state.get(open_key)  # set only in the rerun a row's Open button caused
    seen = st.session_state.get(drawn_key) or studies["id"].tolist()
    st.session_state[drawn_key] = studies["id"].tolist()
    row = (event.selection.rows or [0])[0]
    chosen_id = int(clicked["label"].removeprefix(OPEN_PREFIX)) if clicked else seen[min(row, len(seen) - 1)]
    try:
        chosen = wl.study(chosen_id)
    except KeyError:  # deleted since it was drawn
        st.warning("That study is no longer on the worklist.", icon=":material/warning:")
        return
    open_col, export_col, uid_col = st.columns([2, 1, 1], vertical_alignment="center")
    if clicked or open_col.button(f"Open {chosen.label} in the viewer", type="primary", icon=":material/radiology:"):
        st.session_state["study"] = chosen.id
        navigation.go("viewer")
    uids = uid_col.checkbox(
        "Include DICOM UIDs", key="export_uids", help="Off by default: UIDs can identify a patient's exam."
    )
    with export_col:
        if download_button(
            "Download worklist (CSV)", wl.export_csv(uids=uids).encode(), "ich-worklist.csv", "text/csv",
            key="export-worklist",
        ):  # fmt: skip
            audit("export")


def pending_exams_panel(wl: Worklist) -> None:
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


@st.fragment(run_every=ARRIVALS_POLL_SECONDS)
def arrivals_ui(wl: Worklist) -> None:
    """A toast for each flagged study that lands while this page is open (DICOM listener, other uploads)."""
    studies = wl.studies()
    newest = int(studies["id"].max()) if len(studies) else 0
    seen = st.session_state.setdefault("seen_study_id", newest)
    # Not the demo's studies: they join the worklist one by one after a first start, and need no one.
    for row in studies[(studies["id"] > seen) & studies["flagged"] & ~studies["demo"]].itertuples():
        st.toast(f"Flagged: {row.label} ({pct(row.score)} likelihood)", icon=":material/priority_high:")
    st.session_state["seen_study_id"] = max(seen, newest)


def start_demo_seeding(wl: Worklist, pred: Predictor | None) -> DemoSeeding | None:
    """First start: seed the demo studies in the background, once per server; the seeding (to show) or ``None``.

    Never where real studies already arrived (the listener, an earlier upload), or with ``ICH_DEMO=0``. No page
    waits for it: each demo study joins the worklist as soon as it is scored.
    """
    if pred is None or os.environ.get("ICH_DEMO") == "0":
        return None
    seeding = demo_seeding(str(wl.directory))
    if not seeding.started and wl.get_meta(DEMO_SEEDED) is None and not len(wl):
        seeding.start(wl, pred)
    return seeding if seeding.started else None


def demo_status_ui(seeding: DemoSeeding, wl: Worklist) -> None:
    """The demo's progress while it seeds; what could not be prepared, once a session, when it is done."""
    if seeding.running:
        demo_progress_ui(seeding, wl, len(wl))
    elif seeding.problems and not st.session_state.get("demo_problems_shown"):
        st.session_state["demo_problems_shown"] = True  # once a session, not on every page from now on
        st.warning("Some demo studies could not be prepared: " + "; ".join(seeding.problems), icon=":material/warning:")


@st.fragment(run_every=DEMO_POLL_SECONDS)
def demo_progress_ui(seeding: DemoSeeding, wl: Worklist, studies: int) -> None:
    """The demo's progress while it seeds. ``studies``: how many the page shows (the fragment's reruns keep the
    full run's arguments); the whole page reruns when a demo study joins the worklist, and when seeding ends."""
    if seeding.running and len(wl) == studies:
        st.progress(seeding.fraction, f"First start: preparing demo studies — {seeding.text}")
    else:  # in the fragment's own reruns: a full run has just taken its arguments, so no click is rerun away
        st.rerun()
