"""ich.files: the data directory (private), the default weights and the one atomic write."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ich import files


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "table.txt"
    target.write_text("old")
    files.atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"

    def crash(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(target, crash)
    assert target.read_text() == "new"  # the old file survives
    assert [p.name for p in tmp_path.iterdir()] == ["table.txt"]  # no temporary file left behind


def test_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(files.DATA_ENV, str(tmp_path / "store"))
    assert files.data_dir() == tmp_path / "store"
    monkeypatch.delenv(files.DATA_ENV)
    assert files.data_dir() == files.source_root() / ".ich-data"  # the tests run from a checkout


def test_installed_package_without_weights_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv(files.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(files, "source_root", lambda: None)  # as if installed from a wheel
    with pytest.raises(FileNotFoundError, match="set ICH_WEIGHTS"):
        files.default_weights()
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.delenv(files.DATA_ENV, raising=False)
    assert files.data_dir() == tmp_path / "ich"
    monkeypatch.setenv(files.WEIGHTS_ENV, str(tmp_path / "m.json"))
    assert files.default_weights() == tmp_path / "m.json"


def test_checkout_weights_are_the_bundled_checkpoint(monkeypatch):
    monkeypatch.delenv(files.WEIGHTS_ENV, raising=False)
    found = files.default_weights()
    assert found.parent.name == "weights" and found.with_suffix(".safetensors").is_file()


@pytest.fixture
def umask():
    """private_dir sets the process's umask: give the next tests back the one they had."""
    before = os.umask(0o022)
    yield
    os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_dir_makes_what_follows_owner_only(tmp_path, umask):
    data = files.private_dir(tmp_path / "data" / "deeper")
    (data / "audit.log").write_text("x")
    (data / "volumes").mkdir()
    assert mode(tmp_path / "data") == mode(data) == mode(data / "volumes") == 0o700
    assert mode(data / "audit.log") == 0o600


def test_the_worklist_database_and_folders_are_private(tmp_path, umask):
    from ich.worklist import Worklist

    Worklist(tmp_path / "data")
    made = [tmp_path / "data", *(tmp_path / "data").iterdir()]
    assert {p.name for p in made} >= {"data", "worklist.sqlite3", "volumes", "headers"}
    assert all(mode(p) & 0o077 == 0 for p in made), {p.name: oct(mode(p)) for p in made}
    assert files.check_permissions(tmp_path / "data") == []


def test_loose_permissions_are_named_by_path_and_mode(tmp_path, caplog):
    data = tmp_path / "data"
    (data / "volumes").mkdir(parents=True, mode=0o700)
    (data / "inbox" / "MRN-12345").mkdir(parents=True)  # deeper names (a patient's, say) are never listed
    (data / "audit.log").write_text("x")
    for path, bits in ((data, 0o755), (data / "inbox", 0o755), (data / "inbox" / "MRN-12345", 0o777)):
        path.chmod(bits)
    (data / "audit.log").chmod(0o644)
    problems = files.check_permissions(data)
    assert [p.split(" has mode ")[0] for p in problems] == [str(data), str(data / "audit.log"), str(data / "inbox")]
    assert "0755" in problems[0] and "0644" in problems[1] and "MRN" not in "".join(problems)
    files.warn_permissions(data)
    files.warn_permissions(data)  # once per process
    assert [r.getMessage() for r in caplog.records] == problems
    assert files.check_permissions(tmp_path / "absent") == []
