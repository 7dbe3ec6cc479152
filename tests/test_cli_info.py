"""`python -m ich info` as a user runs it: a subprocess, exit codes, JSON, no torch, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.dicom_factory import make_ct, to_bytes
from tests.helpers import ROOT


def run_info(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ich", "info", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def study(tmp_path):
    from pydicom.uid import generate_uid

    series, study_uid = generate_uid(), generate_uid()
    for i in range(3):
        (tmp_path / f"{i}.dcm").write_bytes(
            to_bytes(make_ct(z=5.0 * i, series_uid=series, study_uid=study_uid, instance=i + 1))
        )
    (tmp_path / "broken.dcm").write_bytes(b"\x00" * 10)
    return tmp_path, study_uid, series


def test_info_json(study):
    path, study_uid, series = study
    out = run_info(str(path), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    (s,) = data["series"]
    assert (s["study_uid"], s["series_uid"], s["modality"], s["slices"]) == (study_uid, series, "CT", 3)
    assert s["spacing"] == 5.0
    (problem,) = data["problems"]
    assert problem["path"] == str(path / "broken.dcm") and "not a DICOM file" in problem["reason"]
    assert "DOE" not in out.stdout and "TEST-0001" not in out.stdout


def test_info_text_lists_problems(study):
    path, _, series = study
    out = run_info(str(path))
    assert out.returncode == 0
    assert series in out.stdout and "3 slices" in out.stdout
    assert f"{path / 'broken.dcm'}: not a DICOM file" in out.stderr


def test_info_nothing_usable_exits_2(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"nope")
    out = run_info(str(tmp_path), str(tmp_path / "missing"), "--json")
    assert out.returncode == 2
    reasons = [p["reason"] for p in json.loads(out.stdout)["problems"]]
    assert any("not a DICOM" in r for r in reasons) and any("no such file" in r for r in reasons)
    assert "Traceback" not in out.stderr


def test_info_does_not_import_torch(study):
    path, _, _ = study
    code = "import sys; from ich.cli import main; main(['info', sys.argv[1]]); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "False"
