"""Who uses the dashboard: sign-in, the signed-in user, the audit log and the identifiers switch."""

from __future__ import annotations

import streamlit as st

from ich import access, files
from ich.worklist import Worklist, data_dir

SIGNED_IN = "ich_signed_in"  # session state: the user this browser tab signed in as (no cookie: docs/ARCHITECTURE.md)


def user() -> access.User:
    return st.session_state["ich_user"]


def audit(action: str, study: int | None = None) -> None:
    access.AuditLog().record(user().username, action, study)


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


def identifiers_shown(wl: Worklist) -> bool:
    """Patient ID and accession on screen: only when an admin turned them on, and only behind sign-in."""
    return wl.identifiers_on and access.load_config() is not None


def identifiers_switch(wl: Worklist) -> None:
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
