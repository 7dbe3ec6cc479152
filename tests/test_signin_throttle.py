"""Sign-in throttling (ich.access.Throttle, ich.access.sign_in): locks per user name and per client address,
shared through a file, kept across restarts; failures audited without the password; one line per sign-in."""

from __future__ import annotations

import functools
import stat

import bcrypt
import pytest
from streamlit.testing.v1 import AppTest

from ich import access
from tests.helpers import ROOT

PASSWORD = "reader-pass-1"


class Clock:
    """A settable time for the throttle."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def fast_hashes(monkeypatch):
    """bcrypt's cheapest cost: these tests check many passwords."""
    monkeypatch.setattr(bcrypt, "gensalt", functools.partial(bcrypt.gensalt, rounds=4))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def setup(tmp_path, clock):
    """A sign-in file with rita, a throttle file and an audit log in a data directory."""
    path = access.add_user("rita", PASSWORD, "reader", tmp_path / "auth.yaml")
    throttle = access.Throttle(tmp_path / access.THROTTLE_FILE, clock)
    audit = access.AuditLog(tmp_path / "audit.log")
    return access.load_config(path), throttle, audit


def attempt(setup, password: str, name: str = "rita", address: str | None = "10.0.0.7") -> access.User | str:
    config, throttle, audit = setup
    try:
        return access.sign_in(config, name, password, address, throttle, audit)
    except access.SignInError as exc:
        return str(exc)


def fail(setup, times: int, **kwargs) -> None:
    for _ in range(times):
        assert attempt(setup, "wrong password", **kwargs) == access.WRONG


def test_lock_seconds_double_up_to_the_cap():
    free = access.USER_FREE_FAILURES
    assert access.lock_seconds(free - 1, free) == 0
    assert access.lock_seconds(free, free) == access.FIRST_LOCK_SECONDS
    assert access.lock_seconds(free + 1, free) == 2 * access.FIRST_LOCK_SECONDS
    assert access.lock_seconds(free + 100, free) == access.MAX_LOCK_SECONDS


def test_a_locked_name_refuses_even_the_right_password_until_the_lock_ends(setup, clock):
    fail(setup, access.USER_FREE_FAILURES)
    refused = attempt(setup, PASSWORD)
    assert (
        "try again at" in refused and "not checked" in refused and f"in {int(access.FIRST_LOCK_SECONDS)} s" in refused
    )
    clock.now += access.FIRST_LOCK_SECONDS
    assert attempt(setup, PASSWORD) == access.User("rita", "reader")
    fail(setup, access.USER_FREE_FAILURES - 1)  # a right password forgave the name's failures
    assert attempt(setup, PASSWORD) == access.User("rita", "reader")


def test_each_failure_past_a_lock_doubles_it(setup, clock):
    fail(setup, access.USER_FREE_FAILURES)
    clock.now += access.FIRST_LOCK_SECONDS
    fail(setup, 1)
    clock.now += access.FIRST_LOCK_SECONDS
    assert "try again" in attempt(setup, PASSWORD)  # locked for twice as long now
    clock.now += access.FIRST_LOCK_SECONDS
    assert isinstance(attempt(setup, PASSWORD), access.User)


def test_old_failures_are_forgotten(setup, clock):
    fail(setup, access.USER_FREE_FAILURES - 1)
    clock.now += access.FORGET_SECONDS + 1
    fail(setup, access.USER_FREE_FAILURES - 1)
    assert isinstance(attempt(setup, PASSWORD), access.User)


def test_user_names_are_throttled_case_insensitively_and_across_addresses(setup):
    for i in range(access.USER_FREE_FAILURES):
        fail(setup, 1, name="RITA " if i % 2 else "rita", address=f"10.0.0.{i}")
    assert "try again" in attempt(setup, PASSWORD, address="10.9.9.9")


def test_one_address_trying_many_names_is_locked(setup, clock):
    for i in range(access.ADDRESS_FREE_FAILURES):
        fail(setup, 1, name=f"guess{i}")
    assert "try again" in attempt(setup, PASSWORD)  # rita, from that address
    assert isinstance(attempt(setup, PASSWORD, address="10.0.0.8"), access.User)  # elsewhere she signs in
    clock.now += access.FIRST_LOCK_SECONDS
    assert isinstance(attempt(setup, PASSWORD), access.User)


def test_without_a_client_address_only_the_name_counts(setup):
    for i in range(access.ADDRESS_FREE_FAILURES):
        fail(setup, 1, name=f"guess{i}", address=None)
    assert isinstance(attempt(setup, PASSWORD, address=None), access.User)


def test_locks_survive_a_restart_and_hold_for_other_processes(setup, tmp_path, clock):
    fail(setup, access.USER_FREE_FAILURES)
    config, _, audit = setup
    restarted = access.Throttle(tmp_path / access.THROTTLE_FILE, clock)  # a new object: a new process reads the file
    with pytest.raises(access.SignInError, match="try again"):
        access.sign_in(config, "rita", PASSWORD, None, restarted, audit)
    assert stat.S_IMODE((tmp_path / access.THROTTLE_FILE).stat().st_mode) & 0o077 == 0


def test_failures_are_audited_without_the_password_and_a_sign_in_once(setup, tmp_path):
    fail(setup, access.USER_FREE_FAILURES, name="rita")
    attempt(setup, PASSWORD)  # locked
    fail(setup, 1, name="x" * 500)  # a long name, cut
    _, _, audit = setup
    entries = audit.entries()
    assert [e["action"] for e in entries] == ["sign-in-failed"] * 5 + ["sign-in-locked", "sign-in-failed"]
    assert all(e["address"] == "10.0.0.7" for e in entries)
    assert len(entries[-1]["user"]) == access.AUDIT_NAME_CHARS
    text = (tmp_path / "audit.log").read_text()
    assert "wrong password" not in text and PASSWORD not in text
    assert attempt(setup, PASSWORD, address="10.0.0.9", name="someone") == access.WRONG  # an unknown name, same answer
    assert stat.S_IMODE((tmp_path / "audit.log").stat().st_mode) == 0o600


def test_empty_fields_are_not_an_attempt(setup):
    assert "Enter a user name" in attempt(setup, "")
    _, _, audit = setup
    assert audit.entries() == []


# --------------------------------------------------------------------------- through the app


@pytest.fixture
def app_data(tmp_path, monkeypatch, tiny_checkpoint):
    """A data directory with rita in its sign-in file; no demo studies (sign-in is what is tested)."""
    monkeypatch.setenv("ICH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ICH_WEIGHTS", str(tiny_checkpoint))
    monkeypatch.setenv("ICH_DEMO", "0")
    access.add_user("rita", PASSWORD, "reader", tmp_path / "data" / "auth.yaml")
    return access.AuditLog(tmp_path / "data" / "audit.log")


def start() -> AppTest:
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=180).run()
    assert not at.exception, at.exception
    return at


def sign_in(at: AppTest, password: str) -> list[str]:
    """The error messages after signing in as rita."""
    at.text_input[0].input("rita")
    at.text_input[1].input(password)
    next(b for b in at.button if b.label == "Login").click().run()
    assert not at.exception, at.exception
    return [e.value for e in at.error]


def test_the_dashboard_refuses_the_right_password_after_repeated_failures(app_data):
    at = start()
    for _ in range(access.USER_FREE_FAILURES):
        assert sign_in(at, "wrong password") == [access.WRONG]
    assert any("try again" in e for e in sign_in(at, PASSWORD))
    assert len(at.text_input) == 2 and not [b for b in at.button if b.label == "Sign out"]  # still signed out
    assert [e["action"] for e in app_data.entries()] == ["sign-in-failed"] * access.USER_FREE_FAILURES + [
        "sign-in-locked"
    ]
    assert any("try again" in e for e in sign_in(start(), PASSWORD))  # another session: the same lock


def test_a_sign_in_is_audited_once_however_often_the_page_reruns(app_data):
    at = start()
    assert sign_in(at, PASSWORD) == []
    assert not [b for b in at.button if b.label == "Login"]
    assert "Signed in as **rita** (reader)" in "\n".join(c.value for c in at.caption)
    at.run()
    at.run()
    assert [e["action"] for e in app_data.entries()] == ["sign-in"]
    next(b for b in at.button if b.label == "Sign out").click().run()
    assert len(at.text_input) == 2  # back at the form
