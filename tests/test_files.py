"""ich.files: the data directory, the default weights and the one atomic write."""

from __future__ import annotations

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
