"""ich dashboard: upload head-CT exams, triage them on a worklist, read them in a viewer.

Start with ``scripts/run`` (``streamlit run streamlit_app.py``; settings in ``.streamlit/config.toml``).
This is the entry point only: the pages are :mod:`ich.dashboard`, what they show :mod:`ich.presentation`,
and reading, scoring, storage and heatmaps the rest of ``ich``. Not a medical device.
"""

from __future__ import annotations

import streamlit as st

from ich import dicom
from ich.dashboard import navigation, session
from ich.dashboard.resources import load_model, store
from ich.dashboard.worklist_page import arrivals_ui, demo_status_ui, start_demo_seeding
from ich.presentation import page_icon
from ich.worklist import StoreError

NOTICE = "**Not a medical device — research use only.** The model's scores are not diagnoses."
# Streamlit leaves ~6 rem above the first element under a top navigation bar: a reading screen needs it.
COMPACT = "<style>[data-testid='stMainBlockContainer'] { padding-top: 3.5rem; }</style>"


def main() -> None:
    dicom.quiet_invalid_values()  # this server is an entry point: uploads of RSNA files must not warn per file
    st.set_page_config(
        page_title="ich · hemorrhage triage", page_icon=page_icon(), layout="wide", initial_sidebar_state="collapsed"
    )
    st.html(COMPACT)
    st.warning(NOTICE, icon=":material/warning:")
    st.session_state["ich_user"] = signed_in = session.sign_in_ui()  # nothing below runs for a signed-out client
    page = st.navigation(list(navigation.pages().values()), position="top")  # the reading screen keeps its width
    navigation.deep_link_ui(page)
    if signed_in.username != "local":
        st.sidebar.caption(f"Signed in as **{signed_in.username}** ({signed_in.role}).")
    pred, why = load_model()
    if pred is None:
        st.error(f"The model could not be loaded, so uploads and heatmaps are off. {why}")
    else:
        st.sidebar.caption(f"Model: {pred.name}. Worklist and reads are stored on this server only.")
    try:
        session.identifiers_switch(store())
        if seeding := start_demo_seeding(store(), pred):
            demo_status_ui(seeding, store())
        arrivals_ui(store())
        page.run()
    except StoreError as exc:  # a damaged database: say which file and what to do, never a traceback
        st.error(str(exc), icon=":material/database:")


if __name__ == "__main__":
    main()
