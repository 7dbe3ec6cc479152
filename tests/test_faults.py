"""Nothing lost under load and faults: concurrent senders and uploads, a crash mid-write, a full disk."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, generate_uid

import ich.worklist.store
from ich import dicom
from ich.listener import OUT_OF_RESOURCES, Inbox, Listener
from ich.worklist import Worklist, ingest
from tests.dicom_factory import make_ct
from tests.helpers import ROOT, FakePredictor, add, free_port, upload_session, uploads
from tests.test_listener import QUIET, send, send_as_pacs, series, wait_for


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
            jobs = [pool.submit(send_as_pacs, port, datasets, f"CT{i}") for i, datasets in enumerate(pushed)]
            jobs += [pool.submit(upload, files) for files in uploaded]
            statuses = [job.result()[0] for job in jobs[:4]]  # re-raises what failed in a thread
            for job in jobs[4:]:
                job.result()
        assert all(set(s) == {0} for s in statuses)
        expected = sorted([len(d) for d in pushed] + [6, 8])  # every study once, with every slice
        # (an exam of which a sender had to send part again is scored again once that part is in)
        wait_for(lambda: sorted(int(n) for n in wl.studies()["n_slices"]) == expected, seconds=60)
    finally:
        listener.stop()


def logs(folder: Path) -> str:
    return "".join(p.read_text() for p in sorted(folder.glob("session-*.log")))


@pytest.mark.slow
def test_four_senders_and_two_dashboard_sessions_at_once(tmp_path, shared_data, tiny_checkpoint, caplog):
    """The issue's load test: 4 associations push 4 real series while 2 dashboard sessions upload 2 others."""
    real = real_series(shared_data, 6)
    pushed, uploaded = real[:4], real[4:]
    assert len(uploaded) == 2
    env = dict(os.environ, ICH_DATA_DIR=str(tmp_path), ICH_WEIGHTS=str(tiny_checkpoint), ICH_DEMO="0")
    sessions: list[subprocess.Popen] = []
    wl = Worklist(tmp_path)
    listener = Listener(wl, FakePredictor({"any": 0.7}), Inbox(tmp_path / "inbox", QUIET))
    try:
        for i, datasets in enumerate(uploaded):
            folder = tmp_path / f"upload-{i}"
            folder.mkdir()
            for k, ds in enumerate(datasets):
                ds.save_as(folder / f"{k}.dcm", enforce_file_format=True)
            sessions.append(upload_session(folder, "Score and add to worklist", env, tmp_path / f"session-{i}.log"))
        for session in sessions:  # both on the Upload page with their files chosen
            assert session.stdout.readline().strip() == "ready", session.communicate()[0] + logs(tmp_path)
        port = listener.start("127.0.0.1", 0, poll_seconds=0.05)
        with caplog.at_level(logging.INFO), ThreadPoolExecutor(4) as pool:
            jobs = [pool.submit(send_as_pacs, port, datasets, f"CT{i}") for i, datasets in enumerate(pushed)]
            for session in sessions:  # "Score and add to worklist" while the senders connect
                session.stdin.write("go\n")
                session.stdin.flush()
            statuses = [job.result()[0] for job in jobs]
            pages = [session.communicate(timeout=300)[0] for session in sessions]
            expected = sorted(len(d) for d in real)  # every study once, with every slice
            wait_for(lambda: sorted(int(n) for n in wl.studies()["n_slices"]) == expected, seconds=120)
    finally:
        listener.stop()
        for session in sessions:
            if session.poll() is None:
                session.kill()
    assert all(set(s) == {0} for s in statuses)
    for page, session in zip(pages, sessions):
        assert session.returncode == 0 and "1 exam added" in page and "could not" not in page, page + logs(tmp_path)
    assert "database is locked" not in caplog.text + "".join(pages) + logs(tmp_path)
    assert sorted(wl.studies()["source"]) == ["dicom"] * 4 + ["upload"] * 2


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

    def disk_full(path, series) -> None:
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


class ListenerProcess:
    """``python -m ich -vv listen`` on ``port`` with the tiny checkpoint, started and ready; ``lines`` is its log.

    Started with a shell's usual umask (022), not this test process's (the store sets 077 in-process)."""

    def __init__(self, data: Path, weights: Path, port: int, quiet: float, *options: str) -> None:
        env = dict(os.environ, ICH_DATA_DIR=str(data), ICH_WEIGHTS=str(weights), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "ich", "-vv", "listen", "--port", str(port), "--quiet-seconds", str(quiet)]
        self.proc = subprocess.Popen(
            [*cmd, "--device", "cpu", *options], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True, umask=0o022
        )
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()  # also keeps a full pipe from blocking it
        wait_for(lambda: self.said("listening as AE") or self.proc.poll() is not None, seconds=120)
        assert self.proc.poll() is None, f"listener did not start (exit {self.proc.returncode})"

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def said(self, text: str, since: int = 0) -> bool:
        return any(text in line for line in self.lines[since:])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.mark.slow
def test_a_listener_killed_before_scoring_scores_on_restart(tmp_path, tiny_checkpoint):
    """SIGKILL after the instances arrived but before the quiet period ended: the restart scores them."""
    port = free_port()
    first = ListenerProcess(tmp_path, tiny_checkpoint, port, quiet=600)  # would wait ten minutes before scoring
    try:
        assert send(port, series(3)) == [0, 0, 0]
    finally:
        first.kill()
    assert len(Worklist(tmp_path)) == 0  # killed before it scored anything
    second = ListenerProcess(tmp_path, tiny_checkpoint, port, quiet=600)
    try:
        wait_for(lambda: len(Worklist(tmp_path)) == 1, seconds=120)
    finally:
        second.stop()
    assert Worklist(tmp_path).studies()["n_slices"].tolist() == [3]


def no_half_study(data: Path) -> list[int]:
    """Every listed study has all its slice rows and a readable volume of that many slices; their sizes."""
    wl = Worklist(data)
    sizes = []
    for study_id in wl.studies()["id"]:
        n = wl.study(int(study_id)).n_slices
        assert len(wl.slices(int(study_id))) == n and wl.volume(int(study_id)).shape[0] == n
        assert wl.header(int(study_id)) is not None
        sizes.append(n)
    return sorted(sizes)


def noisy_series(n: int) -> list:
    """``n`` 512x512 slices of noise: a volume that takes a while to compress, so a kill can land in its write."""
    rng, study, uid = np.random.default_rng(n), generate_uid(), generate_uid()
    return [
        make_ct(rng.normal(30, 300, (512, 512)).round(), z=5.0 * i, series_uid=uid, study_uid=study, instance=i + 1)
        for i in range(n)
    ]


@pytest.mark.slow
def test_a_listener_killed_while_it_scores_or_writes_loses_nothing(tmp_path, tiny_checkpoint):
    """SIGKILL of a real listener process while it scores a series, and while it writes the series' volume.

    Each round restarts the listener (which first rescores what the last kill interrupted), sends a new
    series and kills the process as it starts scoring (its log says the slices were read) or once the
    volume's temporary file appears. A round counts where the disk shows the kill landed there (the
    series not stored; a temporary file left or not); one that finished first is repeated. After every
    kill no half study is listed, and every series killed earlier is complete.
    """
    port, volumes, sent = free_port(), tmp_path / "volumes", []
    landed: set[str] = set()
    deadline = time.monotonic() + 300
    while landed != {"scoring", "volume write"}:
        assert time.monotonic() < deadline, f"kills landed only in {landed}"
        target = "volume write" if "volume write" not in landed else "scoring"
        listener = ListenerProcess(tmp_path, tiny_checkpoint, port, quiet=QUIET)
        try:
            wait_for(lambda: no_half_study(tmp_path) == sorted(sent), seconds=120)  # the interrupted one rescored
            before, mark = set(volumes.glob(".*.tmp")), len(listener.lines)
            datasets = noisy_series(30 + len(sent))
            assert set(send(port, datasets)) == {0}
            if target == "scoring":  # ich.dicom.iter_series logs this as it hands the series to the model
                wait_for(lambda at=listener, mark=mark: at.said("slices read", since=mark), seconds=60)
            else:
                wait_for(lambda before=before: bool(set(volumes.glob(".*.tmp")) - before), seconds=60)
        finally:
            listener.kill()
        sent.append(len(datasets))
        if len(datasets) not in no_half_study(tmp_path):  # else it finished before the kill: another round
            landed.add("volume write" if set(volumes.glob(".*.tmp")) - before else "scoring")
    last = ListenerProcess(tmp_path, tiny_checkpoint, port, quiet=QUIET)
    try:
        wait_for(lambda: no_half_study(tmp_path) == sorted(sent), seconds=120)
        wait_for(lambda: not Inbox(tmp_path / "inbox").unscored(), seconds=30)
    finally:
        last.stop()


@pytest.mark.slow
def test_what_a_listener_process_stores_is_owner_only(tmp_path, tiny_checkpoint):
    """Issue 21: the inbox, volumes, headers and database a listener writes are 700/600, though it was
    started with umask 022: other accounts on the machine read no pixel and no header."""
    data, port = tmp_path / "data", free_port()
    listener = ListenerProcess(data, tiny_checkpoint, port, 0.3)
    try:
        assert send(port, series(3)) == [0, 0, 0]
        wait_for(lambda: len(Worklist(data)) == 1, seconds=60)
    finally:
        listener.stop()
    written = [data, *data.rglob("*")]
    assert {"inbox", "volumes", "headers", "worklist.sqlite3"} <= {p.name for p in written}
    assert [p for p in (data / "inbox").rglob("*") if p.is_file()], "the received instances are kept in the inbox"
    loose = {str(p.relative_to(data)): oct(p.stat().st_mode & 0o777) for p in written if p.stat().st_mode & 0o077}
    assert not loose


@pytest.mark.slow
def test_a_listener_refuses_associations_beyond_its_limit_and_takes_them_again_after(tmp_path, tiny_checkpoint):
    """``--max-associations 2``: a third sender at once is refused (it retries later, as PACS do), not left
    hanging; once one closes, the next is accepted."""
    from pynetdicom import AE

    port = free_port()
    listener = ListenerProcess(tmp_path, tiny_checkpoint, port, 0.3, "--max-associations", "2")
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    try:
        held = [ae.associate("127.0.0.1", port, ae_title="ICH") for _ in range(2)]
        assert all(a.is_established for a in held)
        third = ae.associate("127.0.0.1", port, ae_title="ICH")
        assert third.is_rejected
        wait_for(lambda: listener.said("too many associations at once"))
        held.pop().release()
        accepted: list = []  # once the listener counts it closed, the next sender is let in

        def let_in() -> bool:
            assoc = ae.associate("127.0.0.1", port, ae_title="ICH")
            accepted.append(assoc)
            return assoc.is_established

        wait_for(let_in, seconds=10)
        accepted[-1].release()
        held[0].release()
    finally:
        listener.stop()
