"""One rule for a series whose slices differ in size, pixel spacing or orientation.

The largest consistent group of slices is the series; every other slice is a problem line saying how it
differs (never a raw exception, never scored with the rest). The same line comes out of ``info``,
``predict``, an upload and the listener, which all read through :func:`ich.dicom.load` / ``iter_series``.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import numpy as np
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from ich import dicom, evaluate
from ich.inference import Predictor
from ich.listener import Inbox, Listener
from ich.worklist import Worklist, ingest
from tests.dicom_factory import make_ct
from tests.dicom_factory import to_bytes as encoded
from tests.helpers import ROOT, FakePredictor

TILT = np.radians(10.0)
ODD = {  # the odd slice's overrides, and the problem line it gets
    "size": ({"hu": np.full((16, 16), 30.0)}, "16x16 vs 32x32"),
    "spacing": ({"PixelSpacing": [0.7, 0.7]}, "pixel spacing 0.7x0.7 mm vs 0.5x0.5 mm"),
    "orientation": (
        {"ImageOrientationPatient": [1, 0, 0, 0, np.cos(TILT), -np.sin(TILT)]},
        "orientation (1, 0, 0, 0, 0.9848, -0.1736) vs (1, 0, 0, 0, 1, 0)",
    ),
}
PREFIX = "slice differs from the rest of its series: "


def series_with_odd_slices(n: int = 4, odd: int = 1, side: int = 32, **overrides) -> list:
    """``n`` alike slices of one series, then ``odd`` more with ``overrides`` (``hu`` replaces the image)."""
    study, series = generate_uid(), generate_uid()
    hu = overrides.pop("hu", np.full((side, side), 30.0))

    def ct(i: int, image: np.ndarray, **kw) -> object:
        return make_ct(image, z=5.0 * i, series_uid=series, study_uid=study, instance=i + 1, **kw)

    alike = [ct(i, np.full((side, side), 30.0)) for i in range(n)]
    return alike + [ct(n + i, hu, **overrides) for i in range(odd)]


def write(folder, datasets: list) -> list:
    folder.mkdir(exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        paths.append(folder / f"{i:02d}.dcm")
        paths[-1].write_bytes(encoded(ds))
    return paths


@pytest.mark.parametrize("kind", list(ODD))
def test_the_odd_slice_is_a_problem_line_and_the_rest_is_the_series(tmp_path, kind):
    overrides, difference = ODD[kind]
    paths = write(tmp_path / "s", series_with_odd_slices(**overrides))
    result = dicom.load(tmp_path / "s", pixels=False)
    assert [len(s) for s in result.series] == [4]
    assert [(p.path, p.reason) for p in result.problems] == [(str(paths[-1]), PREFIX + difference)]
    assert result.series[0].notes == []


def test_every_slice_outside_the_largest_group_is_named(tmp_path):
    write(tmp_path / "s", series_with_odd_slices(n=3, odd=2, PixelSpacing=[0.7, 0.7]))
    result = dicom.load(tmp_path / "s")
    assert [len(s) for s in result.series] == [3]
    assert [p.path.rsplit("/", 1)[1] for p in result.problems] == ["03.dcm", "04.dcm"]
    assert result.series[0].volume().shape == (3, 32, 32)


def test_spacing_written_to_another_precision_is_the_same(tmp_path):
    write(tmp_path / "s", series_with_odd_slices(PixelSpacing=[0.5000001, 0.4999999]))
    result = dicom.load(tmp_path / "s")
    assert [len(s) for s in result.series] == [5] and result.problems == []


def test_iter_series_reads_only_the_consistent_slices(tmp_path):
    write(tmp_path / "s", series_with_odd_slices(hu=np.full((16, 16), 30.0)))
    problems: list[dicom.Problem] = []
    (series,) = dicom.iter_series(tmp_path / "s", problems)
    assert series.volume().shape == (4, 32, 32)
    assert [p.reason for p in problems] == [PREFIX + "16x16 vs 32x32"]


def test_info_512_and_256_slices(tmp_path):
    """The reviewer's case: a series mixing 512x512 and 256x256 images used to pass info silently."""
    paths = write(tmp_path / "s", series_with_odd_slices(n=3, side=512, hu=np.full((256, 256), 30.0)))
    out = subprocess.run(
        [sys.executable, "-m", "ich", "info", str(tmp_path / "s")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "3 slices  512x512" in out.stdout and "1 problem(s)" in out.stdout
    assert f"{paths[-1]}: {PREFIX}256x256 vs 512x512" in out.stderr
    assert "Traceback" not in out.stderr


def test_predict_scores_the_series_without_the_odd_slice(tmp_path, tiny_checkpoint):
    datasets = series_with_odd_slices(hu=np.full((16, 16), 30.0))
    write(tmp_path / "s", datasets)
    result = evaluate.predict(Predictor.from_checkpoint(tiny_checkpoint, device="cpu"), [tmp_path / "s"], False)
    assert sorted(result.frame.index) == sorted(str(ds.SOPInstanceUID) for ds in datasets[:4])
    assert [p.reason for p in result.problems] == [PREFIX + "16x16 vs 32x32"]


def test_an_upload_scores_the_series_and_names_the_odd_slice(tmp_path):
    datasets = series_with_odd_slices(hu=np.full((16, 16), 30.0))
    uploads = [dicom.Upload(f"{i}.dcm", encoded(ds)) for i, ds in enumerate(datasets)]
    wl = Worklist(tmp_path)
    report = ingest(wl, FakePredictor(), uploads)
    assert len(report.added) == 1 and wl.study(report.added[0]).n_slices == 4
    assert [(p.path, p.reason) for p in report.problems] == [("4.dcm", PREFIX + "16x16 vs 32x32")]
    assert not report.failed


def test_the_listener_scores_the_series_and_logs_the_odd_slice(tmp_path, caplog):
    wl = Worklist(tmp_path)
    listener = Listener(wl, FakePredictor(), Inbox(tmp_path / "inbox", 0.3), allow=["SENDER"])
    port = listener.start("127.0.0.1", 0, poll_seconds=0.05)
    try:
        with caplog.at_level(logging.INFO, logger="ich"):
            ae = AE(ae_title="SENDER")
            ae.add_requested_context(CTImageStorage)
            assoc = ae.associate("127.0.0.1", port, ae_title="ICH")
            assert assoc.is_established
            statuses = [int(assoc.send_c_store(ds).Status) for ds in series_with_odd_slices(hu=np.full((16, 16), 30.0))]
            assoc.release()
            assert statuses == [0] * 5
            end = time.monotonic() + 20
            while not len(wl) and time.monotonic() < end:
                time.sleep(0.05)
    finally:
        listener.stop()
    assert len(wl) == 1 and wl.study(int(wl.studies()["id"].iloc[0])).n_slices == 4
    assert PREFIX + "16x16 vs 32x32" in caplog.text
