"""The Upload page: drop an exam's DICOM files or zips, score them onto the worklist, or, where the deployment
scores on workers (:func:`ich.jobs.uploads_queued`), queue them for the workers."""

from __future__ import annotations

import io
import logging

import pandas as pd
import streamlit as st

from ich import dicom
from ich.dashboard import navigation
from ich.dashboard.resources import model, store
from ich.dashboard.worklist_page import STUDY_COLUMNS
from ich.jobs import QueuedUploads, upload_to_queue, uploads_queued
from ich.labels import read_rsna_csv
from ich.presentation import studies_table
from ich.worklist import IngestReport, data_dir, ingest

log = logging.getLogger(__name__)

FILES_LABEL = "DICOM files (.dcm or no extension) or .zip archives"


def page() -> None:
    st.header("Upload")
    if uploads_queued(store()):
        queue_page()
        return
    st.write(
        "Drop a head-CT exam: its DICOM files, or one or more `.zip` archives. Each exam lands on the worklist, "
        "scored on one series (axial, soft tissue, not a scout or a reformat); files that cannot be read are "
        "listed with the reason."
    )
    run = st.session_state.setdefault("upload_run", 0)
    files = st.file_uploader(FILES_LABEL, accept_multiple_files=True, key=f"files-{run}")
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
        keep_outcome("upload_report", report, run)
    shown: IngestReport | None = st.session_state.get("upload_report")
    if shown is not None:
        n = len(shown.added)
        studies = store().studies()
        outcome_ui(
            f"{n} exam{'' if n == 1 else 's'} added to the worklist in {shown.seconds:.1f} s." if n else None,
            shown.problems,
            "added",
            studies[studies["id"].isin(shown.added)],
        )


def queue_page() -> None:
    """A queue deployment: the files go to the shared inbox and each exam to the workers, as the listener's do;
    nothing is scored in the dashboard (no model loaded for it)."""
    st.write(
        "Drop a head-CT exam: its DICOM files, or one or more `.zip` archives. Each exam is queued for the scoring "
        "workers and lands on the worklist once scored, on one series (axial, soft tissue, not a scout or a "
        "reformat); files that cannot be read are listed with the reason. Labels (a CSV) are taken only where the "
        "dashboard scores uploads itself."
    )
    run = st.session_state.setdefault("upload_run", 0)
    files = st.file_uploader(FILES_LABEL, accept_multiple_files=True, key=f"files-{run}")
    if st.button("Queue for scoring", type="primary", disabled=not files):
        try:
            report = upload_to_queue(store(), data_dir(), [dicom.Upload(f.name, f.getvalue()) for f in files])
        except Exception as exc:  # the database unreachable when the queue opens: nothing was stored
            log.exception("the upload could not be queued")
            st.error(f"The scoring queue could not be reached ({type(exc).__name__}); nothing was queued. Try again.")
            return
        keep_outcome("upload_queued", report, run)
    shown: QueuedUploads | None = st.session_state.get("upload_queued")
    if shown is not None:
        n = len(shown.queued)
        outcome_ui(
            f"{n} exam{'' if n == 1 else 's'} queued for scoring; "
            f"{'it appears' if n == 1 else 'they appear'} on the worklist when scored."
            if n
            else None,
            shown.problems,
            "queued",
        )


def keep_outcome(key: str, report: object, run: int) -> None:
    """Keep an upload's ``report`` for the page's next run, with fresh, empty uploaders (the files are stored)."""
    st.session_state[key] = report
    st.session_state["upload_run"] = run + 1
    st.rerun()


def outcome_ui(success: str | None, found: list[dicom.Problem], done: str, studies: pd.DataFrame | None = None) -> None:
    """What an upload gave: ``success`` (``None``: no usable exam), the ``studies`` added, and the files or exams
    that could not be used, with why."""
    if success:
        st.success(success)
        if studies is not None:
            st.dataframe(studies_table(studies), hide_index=True, column_config=STUDY_COLUMNS)
        st.page_link(navigation.pages()["worklist"], label="Open the worklist", icon=":material/list_alt:")
    else:
        st.warning("No usable CT exam was found in the upload.")
    if found:
        st.warning(f"{len(found)} file(s) or exam(s) could not be used; the rest were {done}.")
        st.dataframe(pd.DataFrame([(p.path, p.reason) for p in found], columns=["file", "reason"]), hide_index=True)
