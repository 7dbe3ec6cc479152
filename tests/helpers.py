"""Helpers the tests import (fixtures stay in ``conftest.py``)."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.uid import generate_uid

from ich import dicom
from ich.labels import CLASSES
from ich.worklist import Worklist
from tests.dicom_factory import make_ct, to_bytes

ROOT = Path(__file__).resolve().parents[1]
# The real scans beside the checkout; ICH_SHARED_DATA points a clone elsewhere at them (never copied in).
SHARED_DATA = Path(os.environ.get("ICH_SHARED_DATA") or ROOT.parent / "shared" / "data")


def make_checkpoint(
    stem: Path, classes: tuple[str, ...] | None = None, arch: str = "resnet18", size: int = 64, **extra
) -> Path:
    """A randomly initialised checkpoint, small enough for fast tests; returns its JSON path.

    ``extra`` metadata (``calibration``, ``tta_flip``, ``study_top_k``, input ``windows``/``clip``...) overrides the defaults.
    """
    import torch

    from ich import checkpoint
    from ich.models import build_model
    from ich.windowing import MODEL_WINDOWS

    classes = tuple(classes or CLASSES)
    torch.manual_seed(0)
    model = build_model(arch, len(classes))
    metadata = {
        "arch": arch,
        "num_classes": len(classes),
        "classes": list(classes),
        "task": "multilabel" if len(classes) > 1 else "binary",
        "windows": [[w.name, w.level, w.width] for w in MODEL_WINDOWS],
        "input_size": size,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "thresholds": {c: 0.5 for c in classes},
    } | extra
    return checkpoint.save(model, stem, metadata)[1]


THRESHOLDS = {c: 0.5 for c in CLASSES}


@dataclass
class FakePrediction:
    sop_uids: list[str]
    probs: np.ndarray
    score: float
    top_subtype: str | None
    flagged: bool


class FakePredictor:
    """Scores every slice with the same probability row; no torch needed."""

    name = "fake"
    top_k = 2

    def __init__(self, row: dict[str, float] | None = None, fail_on: int | None = None) -> None:
        self.thresholds = dict(THRESHOLDS)
        self.row = np.array([(row or {}).get(c, 0.1) for c in CLASSES], np.float32)
        self.fail_on = fail_on
        self.calls = 0

    def predict_series(self, series, progress=None):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated failure")
        probs = np.tile(self.row, (len(series), 1))
        if progress:
            progress(1.0)
        return FakePrediction(series.sop_uids, probs, float(probs[:, 0].max()), "subdural", bool(probs[0, 0] >= 0.5))


def uploads(n: int = 4) -> list[dicom.Upload]:
    study, series = generate_uid(), generate_uid()
    return [
        dicom.Upload(f"{i}.dcm", to_bytes(make_ct(z=5.0 * i, series_uid=series, study_uid=study, instance=i + 1)))
        for i in range(n)
    ]


def series_of(n: int = 4) -> dicom.Series:
    return dicom.load(uploads(n)).series[0]


def add(wl: Worklist, score: float, n: int = 4, labels: pd.DataFrame | None = None) -> tuple[int, dicom.Series]:
    series = series_of(n)
    probs = np.full((n, len(CLASSES)), 0.1, np.float32)
    probs[:, 0] = score
    pred = FakePrediction(series.sop_uids, probs, score, "subdural", score >= 0.5)
    return wl.add_study(series, pred, labels, thresholds=THRESHOLDS, model="fake"), series


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head(shape=(160, 200), centre=(70, 90), radius=(50, 40)) -> np.ndarray:
    """An elliptical "head" of brain with a bright blob, in air."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = ((yy - centre[0]) / radius[0]) ** 2 + ((xx - centre[1]) / radius[1]) ** 2 < 1
    hu = np.where(inside, 35.0, -1000.0).astype(np.float32)
    hu[centre[0] - 8 : centre[0] + 8, centre[1] : centre[1] + 12] = 70.0
    return hu


@contextlib.contextmanager
def streamlit_server(data: Path, weights: Path | None, log_path: Path, **env: str) -> Iterator[str]:
    """``streamlit run streamlit_app.py`` on a free localhost port over ``data``; yields its URL.

    ``weights`` None: the bundled checkpoint. Extra ``env`` (e.g. ``ICH_DEMO="0"``) goes to the server.
    """
    port = free_port()
    env = dict(os.environ, ICH_DATA_DIR=str(data), **env)
    if weights is not None:
        env["ICH_WEIGHTS"] = str(weights)
    command = [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port)]
    command += ["--server.address", "127.0.0.1"]
    url = f"http://127.0.0.1:{port}"
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"streamlit did not start:\n{log_path.read_text()}") from None
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


# One dashboard session in its own process (AppTest swaps global Streamlit state per run, so two cannot
# share a process): opens the Upload page, puts the folder's files in the uploader, says "ready", waits
# for a line on stdin, then clicks the button named on its command line and prints what the page said.
APP_SESSION = """
import pathlib, sys
from streamlit.testing.v1 import AppTest
at = AppTest.from_file(sys.argv[1], default_timeout=300).run()
next(b for b in at.button if b.label == "Upload studies").click().run()
files = [(p.name, p.read_bytes(), "application/dicom") for p in sorted(pathlib.Path(sys.argv[2]).iterdir())]
at.file_uploader[0].set_value(files).run()
print("ready", flush=True)
sys.stdin.readline()
next(b for b in at.button if b.label == sys.argv[3]).click().run()
assert not at.exception, at.exception
print("|".join(m.value for m in (*at.success, *at.warning, *at.error)), flush=True)
"""


def upload_session(files: Path, button: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """:data:`APP_SESSION` uploading the files in ``files`` with ``button``; its stderr (Streamlit's warnings, any
    traceback) in ``log_path``. Write a line to its stdin to click; its stdout says "ready", then the page."""
    with log_path.open("w") as log:
        return subprocess.Popen(
            [sys.executable, "-c", APP_SESSION, str(ROOT / "streamlit_app.py"), str(files), button],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    """A deflated zip archive of ``entries`` (member name -> bytes), in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def evaluate_image_folder(root: Path, tmp_path: Path) -> Path:
    """``ich evaluate`` of a labelled image folder with a tiny brain-window checkpoint; the report's folder."""
    weights = make_checkpoint(tmp_path / "w", windows=[["brain", 40, 80]] * 3, clip=True)
    out = tmp_path / "report"
    command = [sys.executable, "-m", "ich", "evaluate", str(root), "--weights", str(weights), "--out", str(out)]
    proc = subprocess.run(
        [*command, "--quiet", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return out
