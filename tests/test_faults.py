"""Nothing lost under load and faults: concurrent senders and uploads, a crash mid-write, a full disk."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage

import ich.worklist.store
from ich import dicom
from ich.listener import OUT_OF_RESOURCES, Inbox, Listener
from ich.worklist import Worklist, ingest
from tests.helpers import ROOT, FakePredictor, add, free_port, uploads
from tests.test_listener import QUIET, send, series, wait_for


def real_series(shared: object, n: int) -> list[list]:
    """``n`` real RSNA series as datasets (SOP Class added: RSNA's anonymised files lack it)."""
    found = [s for s in dicom.load(shared / "rsna-sample", pixels=False).series if len(s) <= 40][:n]  # type: ignore[operator]
    out = []
    for s in found:
        datasets = [dcmread(x.path) for x in s.slices]
        for ds in datasets:
            ds.SOPClassUID = ds.get("SOPClassUID") or CTImageStorage
        out.append(datasets)
    return out


def test_four_senders_and_two_uploaders_at_once(tmp_path, shared_data):
    pushed = real_series(shared_data, 4)
    assert len(pushed) == 4
    wl = Worklist(tmp_path)
    listener = Listener(wl, FakePredictor({"any": 0.7}), Inbox(tmp_path / "inbox", QUIET))
    port = listener.start("127.0.0.1", 0, poll_seconds=0.05)
    uploaded = [uploads(6), uploads(8)]

    def upload(files) -> None:  # a dashboard session: its own Worklist object, as in another process
        report = ingest(Worklist(tmp_path), FakePredictor(), files)
        assert len(report.added) == 1 and not report.problems, report.problems

    try:
        with ThreadPoolExecutor(6) as pool:
            jobs = [pool.submit(send, port, datasets, f"CT{i}") for i, datasets in enumerate(pushed)]
            jobs += [pool.submit(upload, files) for files in uploaded]
            statuses = [job.result() for job in jobs[:4]]  # re-raises what failed in a thread
            for job in jobs[4:]:
                job.result()
        assert all(set(s) == {0} for s in statuses)
        wait_for(lambda: len(wl) == 6, seconds=60)
    finally:
        listener.stop()
    got = sorted(int(n) for n in wl.studies()["n_slices"])
    assert got == sorted([len(d) for d in pushed] + [6, 8])  # every study once, with every slice


def test_a_crash_inside_the_database_write_leaves_no_half_study(tmp_path, monkeypatch):
    wl = Worklist(tmp_path)
    kept, _ = add(wl, 0.3)

    def killed(values):  # dies while the slice rows are written, after the study row was inserted
        raise KeyboardInterrupt

    monkeypatch.setattr(ich.worklist.store, "_nullable", killed)
    with pytest.raises(KeyboardInterrupt):
        add(wl, 0.9)
    monkeypatch.undo()
    assert list(wl.studies()["id"]) == [kept]  # the transaction rolled back: nothing half-written shows
    again, _ = add(wl, 0.9)
    assert wl.study(again).n_slices == 4 and len(wl) == 2


def test_a_full_disk_gives_a_clear_problem_and_keeps_earlier_studies(tmp_path, monkeypatch):
    wl = Worklist(tmp_path)
    earlier, _ = add(wl, 0.4)

    def disk_full(path, volume) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ich.worklist.store, "_write_npz", disk_full)
    report = ingest(wl, FakePredictor(), uploads(3))
    (problem,) = report.problems
    assert "No space left on device" in problem.reason and not report.added
    assert list(wl.studies()["id"]) == [earlier] and wl.volume(earlier).shape[0] == 4


def test_listener_answers_out_of_resources_when_its_disk_is_full(tmp_path, monkeypatch):
    wl = Worklist(tmp_path)
    inbox = Inbox(tmp_path / "inbox", QUIET)
    listener = Listener(wl, FakePredictor(), inbox)
    port = listener.start("127.0.0.1", 0, poll_seconds=0.05)

    def disk_full(*args) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(inbox, "store", disk_full)
    try:
        assert send(port, series(2)) == [OUT_OF_RESOURCES] * 2  # the sender keeps them and may retry
    finally:
        listener.stop()
    assert len(wl) == 0 and not np.any([p.is_file() for p in (tmp_path / "inbox").rglob("*.dcm")])


@pytest.mark.slow
def test_a_listener_killed_before_scoring_scores_on_restart(tmp_path, tiny_checkpoint):
    """SIGKILL after the instances arrived but before the quiet period ended: the restart scores them."""
    env = dict(os.environ, ICH_DATA_DIR=str(tmp_path), ICH_WEIGHTS=str(tiny_checkpoint), OMP_NUM_THREADS="1")

    def listener(port: int, quiet: float) -> subprocess.Popen:
        cmd = [
            sys.executable,
            "-m",
            "ich",
            "listen",
            "--port",
            str(port),
            "--quiet-seconds",
            str(quiet),
            "--device",
            "cpu",
        ]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:  # ready once it says where it listens
            if "listening as AE" in line:
                return proc
        raise AssertionError(f"listener did not start (exit {proc.wait()})")

    port = free_port()
    first = listener(port, quiet=600)  # would wait ten minutes before scoring
    try:
        assert send(port, series(3)) == [0, 0, 0]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert len(Worklist(tmp_path)) == 0  # killed before it scored anything
    second = listener(port, quiet=600)
    try:
        wait_for(lambda: len(Worklist(tmp_path)) == 1, seconds=120)
    finally:
        second.terminate()
        second.wait(30)
    assert Worklist(tmp_path).studies()["n_slices"].tolist() == [3]
