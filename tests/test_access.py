"""ich.access: users with hashed passwords, roles, the loopback rule (on the page and before start), the audit log."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys

import pytest

from ich import access
from tests.helpers import ROOT


def test_users_are_stored_hashed_with_a_role(tmp_path):
    path = tmp_path / "auth.yaml"
    access.add_user("rita", "a long password", "reader", path)
    access.add_user("adam", "another password", "admin", path)
    config = access.load_config(path)
    assert access.role_of(config, "rita") == "reader" and access.role_of(config, "adam") == "admin"
    text = path.read_text()
    assert "a long password" not in text and "$2b$" in text  # bcrypt, never the password
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ValueError, match="8 characters"):
        access.add_user("bob", "short", "reader", path)
    with pytest.raises(ValueError, match="role"):
        access.add_user("bob", "long enough pw", "owner", path)


@pytest.mark.parametrize(
    ("address", "loopback"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False), ("", False), ("10.1.2.3", False)],
)
def test_loopback(address, loopback):
    assert access.is_loopback(address) is loopback


def test_serving_beyond_this_machine_needs_sign_in(monkeypatch):
    monkeypatch.delenv(access.INSECURE_ENV, raising=False)
    assert access.refuse_reason("127.0.0.1", None) is None
    assert "without sign-in" in access.refuse_reason("0.0.0.0", None)
    assert access.refuse_reason("0.0.0.0", {"credentials": {}}) is None
    monkeypatch.setenv(access.INSECURE_ENV, "1")
    assert access.refuse_reason("0.0.0.0", None) is None


def test_audit_log_appends_whole_lines(tmp_path):
    log = access.AuditLog(tmp_path / "audit.log")
    log.record("rita", "open", 3)
    log.record("rita", "read", 3)
    with pytest.raises(ValueError, match="unknown audit action"):
        log.record("rita", "peek", 3)
    assert [(e["user"], e["action"], e["study"]) for e in log.entries()] == [("rita", "open", 3), ("rita", "read", 3)]


def test_user_command(tmp_path):
    env = {"ICH_AUTH": str(tmp_path / "auth.yaml"), "PATH": "/usr/bin:/bin"}
    run = [sys.executable, "-m", "ich", "user"]
    added = subprocess.run(
        [*run, "add", "adam", "--role", "admin", "--password-stdin"],
        input="a fine password\n", cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    listed = subprocess.run([*run, "list"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert listed.stdout.split() == ["adam", "admin"]


def test_sign_in_lines_carry_the_client_address(tmp_path):
    log = access.AuditLog(tmp_path / "audit.log")
    log.record("rita", "sign-in", address="10.0.0.7")
    log.record("rita", "sign-in")  # no address known (loopback)
    assert [e.get("address") for e in log.entries()] == ["10.0.0.7", None]
    assert "address" not in log.entries()[1]


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--server.address", "0.0.0.0"], {}, "0.0.0.0"),
        (["--server.port=8502", "--server.address=10.1.2.3"], {"STREAMLIT_SERVER_ADDRESS": "::1"}, "10.1.2.3"),
        ([], {"STREAMLIT_SERVER_ADDRESS": "0.0.0.0"}, "0.0.0.0"),
        ([], {}, "127.0.0.1"),  # the project's config.toml over the user's
    ],
)
def test_serving_address_follows_streamlits_precedence(tmp_path, args, env, expected):
    user, project = tmp_path / "user.toml", tmp_path / "project.toml"
    user.write_text('[server]\naddress = "0.0.0.0"\n')
    project.write_text('[server]\naddress = "127.0.0.1"\nheadless = true\n')
    assert access.serving_address(args, env, (user, project)) == expected
    assert access.serving_address([], {}, (tmp_path / "absent.toml",)) == ""  # Streamlit's default: every interface


def test_preflight_refuses_serving_beyond_loopback_without_sign_in(tmp_path, monkeypatch):
    monkeypatch.setenv(access.AUTH_ENV, str(tmp_path / "auth.yaml"))
    monkeypatch.delenv(access.INSECURE_ENV, raising=False)
    monkeypatch.delenv("STREAMLIT_SERVER_ADDRESS", raising=False)
    assert "without sign-in" in access.preflight(["--server.address", "0.0.0.0"])
    assert access.preflight(["--server.address", "127.0.0.1"]) is None
    (tmp_path / "auth.yaml").write_text("credentials: {usernames: {}}\n")
    assert "no users" in access.preflight(["--server.address", "127.0.0.1"])  # a broken file: said before start
    (tmp_path / "auth.yaml").unlink()
    access.add_user("adam", "a fine password", "admin", tmp_path / "auth.yaml")
    assert access.preflight(["--server.address", "0.0.0.0"]) is None


def venv_stamp() -> str | None:
    """The requirements file .venv was installed from while current, so scripts/setup.sh installs nothing."""
    want = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(ROOT.glob("requirements*.txt")))).hexdigest()
    stamps = (ROOT / ".venv").glob(".installed-*")
    return next((s.name.removeprefix(".installed-") for s in stamps if s.read_text().strip() == want), None)


def test_run_script_refuses_before_streamlit_starts(tmp_path):
    requirements = venv_stamp()
    if requirements is None:
        pytest.skip("scripts/setup.sh would install packages: .venv is not current")
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),  # no user-wide Streamlit config
        "ICH_DATA_DIR": str(tmp_path / "data"),
        "ICH_REQUIREMENTS": requirements,
    }
    (tmp_path / "data").mkdir(mode=0o755)  # an older installation's data directory, open to other accounts
    (tmp_path / "data").chmod(0o755)
    run = subprocess.run(
        [str(ROOT / "scripts" / "run"), "--server.address", "0.0.0.0", "--server.port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode != 0 and "without sign-in" in run.stderr, run.stderr
    assert f"ich: warning: {tmp_path / 'data'} has mode 0755" in run.stderr  # said in the terminal, at start
    assert "URL" not in run.stdout + run.stderr


def test_client_address_is_an_ip_or_none():
    assert access.client_address("10.0.0.7") == "10.0.0.7"
    assert access.client_address("2001:DB8::1") == "2001:db8::1"
    assert access.client_address(None) is None and access.client_address(object()) is None
