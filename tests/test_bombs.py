"""Decompression bombs are refused while they inflate, by name, and the rest of an upload still loads.

Every bomb is built here, in tmp_path: zips of zeros (thousands of 1 MiB members, one member past the file
limit), Deflated-syntax DICOM, a sender offering only the Deflated syntax. Small ones come from small limits
(monkeypatched where .sources reads them); the real-size ones are small on disk. Nothing is timed: the
limits are asserted by what was refused and how much was read.
"""

from __future__ import annotations

import io
import logging
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from ich import dicom
from ich.dicom import sources
from ich.listener import Inbox, Listener
from ich.worklist import Worklist, ingest
from tests.dicom_factory import MiB, deflated, make_ct, to_bytes
from tests.helpers import ROOT, FakePredictor, zip_bytes


def slices(n: int = 3) -> dict[str, bytes]:
    """A small CT series of noisy slices (they compress about 2x, as real ones do)."""
    rng, study, series = np.random.default_rng(0), generate_uid(), generate_uid()
    return {
        f"{i}.dcm": to_bytes(
            make_ct(rng.normal(30, 100, (32, 32)), z=5.0 * i, series_uid=series, study_uid=study, instance=i + 1)
        )
        for i in range(n)
    }


def reasons(problems: list[dicom.Problem]) -> dict[str, str]:
    return {p.path: p.reason for p in problems}


# ----------------------------------------------------------------------------- zip archives


@pytest.mark.slow  # building the zip deflates 3 GiB of zeros (a few seconds)
def test_thousands_of_one_mib_zero_members_are_refused_unread(tmp_path, monkeypatch):
    """The reviewer's 3.4 MB zip of 3,000 one-MiB members: one problem line, not one member inflated."""
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zero = bytes(MiB)
        for i in range(3000):
            zf.writestr(f"m{i:04d}.dcm", zero)
    assert path.stat().st_size < 4 * MiB
    opened: list[str] = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(
        zipfile.ZipFile, "open", lambda self, name, *a, **k: opened.append(name) or real_open(self, name, *a, **k)
    )
    result = dicom.load(path, pixels=False)
    assert result.series == [] and opened == []
    (problem,) = result.problems
    assert problem.path == str(path)
    assert problem.reason.startswith("zip bomb suspected: archive would inflate to 2.93 GiB (limit ")
    assert f"{sources.MAX_COMPRESSION_RATIO}x its" in problem.reason


def test_every_member_has_its_ratio_checked_whatever_its_size():
    """Small members of zeros (far under 1 MiB) are refused one by one; the slices beside them load."""
    archive = zip_bytes({f"zeros{i}.dcm": bytes(64 << 10) for i in range(3)} | slices(3))
    result = dicom.load([dicom.Upload("exam.zip", archive)])
    assert [len(s) for s in result.series] == [3]
    found = reasons(result.problems)
    assert sorted(found) == [f"exam.zip/zeros{i}.dcm" for i in range(3)]
    assert all(r.startswith("zip bomb suspected: compression ratio ") for r in found.values())
    assert all(r.endswith(f"(limit {sources.MAX_COMPRESSION_RATIO}:1)") for r in found.values())


def test_a_member_past_the_file_limit_is_refused_before_it_inflates(monkeypatch):
    """The reviewer's 2 GiB member at 104:1, scaled down: under the ratio, over the most one file may be."""
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 100_000)
    rng = np.random.default_rng(0)
    big = b"".join(rng.integers(0, 256, 1000, dtype=np.uint8).tobytes() + bytes(50_000) for _ in range(4))
    result = dicom.load([dicom.Upload("exam.zip", zip_bytes({"big.dcm": big} | slices(3)))])
    assert [len(s) for s in result.series] == [3]
    assert reasons(result.problems) == {
        "exam.zip/big.dcm": "zip bomb suspected: inflates past 97.7 KiB, the limit for one file"
    }
    alone = dicom.load([dicom.Upload("big.zip", zip_bytes({"big.dcm": big}))])
    assert [p.path for p in alone.problems] == ["big.zip/big.dcm"]  # refused, not "no DICOM files" as well


def test_the_archive_as_a_whole_is_limited_nested_archives_included(monkeypatch):
    """Each member within its own limits, the archive past its budget as the second inner zip inflates."""
    files = slices(3)
    inner = zip_bytes(files)
    limit = 2 * len(inner) + sum(map(len, files.values())) - 1  # all but the last byte of more.zip
    monkeypatch.setattr(sources, "MAX_ARCHIVE_BYTES", limit)
    outer = zip_bytes({"inner.zip": inner, "more.zip": inner})
    result = dicom.load([dicom.Upload("outer.zip", outer)])
    assert [len(s) for s in result.series] == [3]  # what inflated before the limit still loads
    assert reasons(result.problems) == {
        "outer.zip": f"zip bomb suspected: archive inflates past limit {sources.size_text(limit)}: "
        f"{sources.MAX_COMPRESSION_RATIO}x its {sources.size_text(len(outer))}, "
        f"at most {sources.size_text(limit)}; the rest of it refused"
    }


class _Reader:
    """A zip member that yields more than it declares (zipfile itself stops at the declared size)."""

    def __init__(self, size: int) -> None:
        self.stream, self.reads = io.BytesIO(bytes(size)), 0

    def open(self, info: zipfile.ZipInfo) -> _Reader:
        return self

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read(self, n: int) -> bytes:
        self.reads += 1
        return self.stream.read(n)


def test_inflating_stops_at_the_first_chunk_past_a_limit(monkeypatch):
    monkeypatch.setattr(sources, "READ_CHUNK", 1000)
    info = zipfile.ZipInfo("lies.dcm")
    info.file_size, info.compress_size = 1, 1  # what the archive declares
    reader = _Reader(100 * MiB)
    budget = sources._Budget("exam.zip", MiB)
    with pytest.raises(dicom.DicomError, match="compression ratio 1000:1"):
        sources._inflate(reader, info, "exam.zip/lies.dcm", budget)
    assert reader.reads == 1 and budget.used == 1000
    with pytest.raises(dicom.DicomError, match="archive inflates past"):  # and the archive's budget the same way
        sources._inflate(_Reader(100 * MiB), zipfile.ZipInfo("x.dcm"), "exam.zip/x.dcm", sources._Budget("exam.zip", 4))


def test_a_member_larger_than_it_declares_is_refused_by_name():
    data = bytearray(zip_bytes({"liar.dcm": bytes(50_000)} | slices(3)))
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        central = zf.start_dir  # the central directory, liar.dcm's entry first
    data[central + 24 : central + 28] = struct.pack("<I", 100)  # its uncompressed size
    result = dicom.load([dicom.Upload("exam.zip", bytes(data))])
    assert [len(s) for s in result.series] == [3]
    assert reasons(result.problems)["exam.zip/liar.dcm"].startswith("cannot extract from zip")


def _zip_on_disk(tmp_path, n_series: int = 2) -> tuple:
    entries = {}
    for k in range(n_series):
        entries |= {f"s{k}/{name}": data for name, data in slices(3).items()}
    path = tmp_path / "exam.zip"
    path.write_bytes(zip_bytes(entries))
    return path, entries


@pytest.mark.parametrize("uploaded", [False, True])
def test_zip_members_are_read_again_from_their_archive_one_series_at_a_time(tmp_path, monkeypatch, uploaded):
    """No member is held between the header pass and the pixel pass: each is inflated again when its series is read."""
    path, entries = _zip_on_disk(tmp_path)
    source = dicom.Upload("exam.zip", path.read_bytes()) if uploaded else path
    reread: list[str] = []
    real = sources.Archives.read

    def spy(self, member):
        assert member.data == b""  # what the header pass kept of it: where it is, not its bytes
        reread.append(member.inner)
        return real(self, member)

    monkeypatch.setattr(sources.Archives, "read", spy)
    problems: list[dicom.Problem] = []
    stream = dicom.iter_series(source, problems)
    first = next(stream)
    assert len(first) == 3 and len(reread) == 3  # only the first series so far
    assert len(next(stream)) == 3 and next(stream, None) is None and not problems
    assert sorted(reread) == sorted(entries)


def test_a_nested_member_is_read_again_through_its_zips(tmp_path):
    outer, files = tmp_path / "outer.zip", slices(3)
    outer.write_bytes(zip_bytes({"inner.zip": zip_bytes(files)}))
    problems: list[dicom.Problem] = []
    (series,) = dicom.iter_series(outer, problems)
    assert len(series) == 3 and not problems
    assert series.slices[0].path.startswith(f"{outer}/inner.zip/")
    assert dicom.read_member(series.slices[0].path) == files[series.slices[0].path.rsplit("/", 1)[1]]


# ----------------------------------------------------------------------------- Deflated transfer syntax


def test_a_deflated_dicom_that_inflates_too_far_is_refused_unread():
    """The reviewer's 3.9 MB file inflating to 3.75 GiB, at its real size; counted in chunks, never held."""
    bomb = deflated(3840 * MiB)
    assert len(bomb) < 4 * MiB
    result = dicom.load([dicom.Upload("bomb.dcm", bomb)], pixels=False)
    assert result.series == []
    (problem,) = result.problems
    assert problem.path == "bomb.dcm"
    assert problem.reason.startswith("decompression bomb suspected: Deflated dataset inflates past ")
    assert f"(limit {sources.MAX_COMPRESSION_RATIO}x its 3." in problem.reason


def test_a_deflated_dicom_past_the_file_limit_is_refused(monkeypatch):
    monkeypatch.setattr(sources, "MAX_FILE_BYTES", 1000)
    monkeypatch.setattr(dicom.reader, "MAX_FILE_BYTES", 1000)  # read there as well, by name
    noisy = deflated(0, np.random.default_rng(0).normal(30, 100, (32, 32)))
    (problem,) = dicom.load([dicom.Upload("a.dcm", noisy)]).problems
    assert "at most 1000 bytes" in problem.reason


def test_a_deflated_dicom_within_the_limits_reads():
    hu = np.random.default_rng(0).normal(30, 100, (32, 32)).round()
    result = dicom.load([dicom.Upload("a.dcm", deflated(0, hu))])
    assert not result.problems
    np.testing.assert_allclose(result.series[0].volume()[0], hu)
    assert result.series[0].slices[0].transfer_syntax == "Deflated Explicit VR Little Endian"


def test_a_corrupt_deflated_dataset_is_named():
    data = deflated(0, np.zeros((32, 32)))
    start = dicom.reader._deflated_start(io.BytesIO(data))
    assert start is not None
    corrupt = data[:start] + b"\xff" + data[start + 1 :]  # a deflate block of the reserved type
    (problem,) = dicom.load([dicom.Upload("a.dcm", corrupt)]).problems
    assert (problem.path, problem.reason) == (
        "a.dcm",
        "corrupt Deflated dataset (Error -3 while decompressing data: invalid block type)",
    )


# ----------------------------------------------------------------------------- info, upload, listener


def run_info(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ich", "info", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_info_names_each_bomb_and_lists_the_rest(tmp_path):
    (tmp_path / "bomb.dcm").write_bytes(deflated(512 * MiB))
    (tmp_path / "zeros.zip").write_bytes(zip_bytes({f"z{i}.dcm": bytes(4 * MiB) for i in range(4)}))
    for name, data in slices(3).items():
        (tmp_path / name).write_bytes(data)
    out = run_info(str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "3 slices" in out.stdout and "2 problem(s)" in out.stdout
    assert f"{tmp_path / 'bomb.dcm'}: decompression bomb suspected" in out.stderr
    assert f"{tmp_path / 'zeros.zip'}: zip bomb suspected" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_upload_keeps_everything_but_its_bombs(tmp_path):
    wl = Worklist(tmp_path)
    uploads = [
        dicom.Upload("exam.zip", zip_bytes(slices(4) | {"zeros.dcm": bytes(64 << 10)})),
        dicom.Upload("bomb.dcm", deflated(512 * MiB)),
    ]
    report = ingest(wl, FakePredictor(), uploads)
    assert len(report.added) == 1 and wl.study(report.added[0]).n_slices == 4
    found = reasons(report.problems)
    assert sorted(found) == ["bomb.dcm", "exam.zip/zeros.dcm"]
    assert found["bomb.dcm"].startswith("decompression bomb suspected: Deflated dataset inflates past")
    assert found["exam.zip/zeros.dcm"].startswith("zip bomb suspected: compression ratio")


def _send(port: int, datasets: list, syntaxes: list[str]) -> tuple[bool, list[int]]:
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(CTImageStorage, syntaxes)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICH")
    if not assoc.is_established:
        return False, []
    try:
        return True, [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_the_listener_refuses_the_deflated_syntax_by_name(tmp_path, caplog):
    """pynetdicom would inflate a deflated dataset whole on receipt: the syntax is refused, the sender falls back."""
    listener = Listener(Worklist(tmp_path), FakePredictor(), Inbox(tmp_path / "inbox", 60.0), allow=["SENDER"])
    port = listener.start("127.0.0.1", 0, poll_seconds=0.05)
    ds = make_ct()
    try:
        with caplog.at_level(logging.INFO, logger="ich"):
            assert _send(port, [ds], [DeflatedExplicitVRLittleEndian]) == (False, [])
            assert _send(port, [ds], [DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian]) == (True, [0])
            end = time.monotonic() + 20
            while "Deflated is refused" not in caplog.text and time.monotonic() < end:  # logged by the server's thread
                time.sleep(0.05)
    finally:
        listener.stop()
    assert "'SENDER' offered CT Image Storage only in Deflated Explicit VR Little Endian" in caplog.text
    assert "Deflated is refused" in caplog.text
    (stored,) = (tmp_path / "inbox").rglob("*.dcm")
    assert dicom.read_slice(str(stored)).transfer_syntax == "Explicit VR Little Endian"
