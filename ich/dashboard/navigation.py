"""The dashboard's pages and moving between them (``st.navigation``)."""

from __future__ import annotations

import streamlit as st

from ich.dashboard.resources import store


def home_page() -> None:
    """``/``: the worklist, under its own address so that ``/worklist`` works as a link too."""
    go("worklist")


def pages() -> dict[str, st.Page]:
    """Every page by name. The page modules use this module to move between pages, so they are imported here.

    A page's address opened directly (``/worklist``, ``/viewer?study=3``) logs two 404s in the browser: Streamlit's
    frontend cannot tell a page from a base URL path, so it probes ``/worklist/_stcore/health`` and
    ``/worklist/_stcore/host-config`` beside ``/_stcore/...``, and the server answers the former 404 on purpose.
    The page then connects at ``/``. No setting avoids it: https://github.com/streamlit/streamlit/issues/7074.
    """
    from ich.dashboard import upload_page, viewer_page, worklist_page

    return {
        "home": st.Page(home_page, title="ich", url_path="home", default=True, visibility="hidden"),
        "upload": st.Page(upload_page.page, title="Upload", icon=":material/upload:", url_path="upload"),
        "worklist": st.Page(worklist_page.page, title="Worklist", icon=":material/list_alt:", url_path="worklist"),
        "viewer": st.Page(viewer_page.page, title="Viewer", icon=":material/radiology:", url_path="viewer"),
    }


def go(name: str) -> None:
    """Switch to page ``name`` (:func:`pages`)."""
    st.switch_page(pages()[name])


def deep_link_ui(page: st.Page) -> None:
    """``?study=ID`` opens that study in the viewer (once per session; the viewer keeps the address current)."""
    if st.session_state.get("deep_link_done"):  # only the address a session starts from is a request
        return
    st.session_state["deep_link_done"] = True
    requested = st.query_params.get("study", "")
    if requested.isdigit() and int(requested) in set(store().studies()["id"]):
        st.session_state["study"] = int(requested)
        if page.url_path != "viewer":
            go("viewer")
