"""ich.access: users with hashed passwords, roles, the loopback rule and the audit log."""

from __future__ import annotations

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
