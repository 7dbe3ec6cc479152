"""Benchmark: what a decompression bomb costs `ich info` (the ingest code behind upload and listener).

    .venv/bin/python scripts/bench_bombs.py [--work DIR]

Builds the three bombs of issue 21 in a temporary folder (never in the repository; ~30 s, ~30 MB on disk):
a 3.4 MB zip of 3,000 one-MiB members of zeros, a ~21 MB zip holding one 2 GiB member at ~100:1, and a
3.9 MB Deflated-transfer-syntax DICOM whose pixel data inflates to 3.75 GiB. Then runs
``python -m ich info`` on each and prints wall time, the child's peak RSS and its refusal line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.dicom_factory import MiB, deflated  # noqa: E402  (pydicom and numpy only: a light parent)

LIMIT_S = 300  # a bomb that is not refused runs for minutes: stop it and say so


def many_members(path: Path) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zero = bytes(MiB)
        for i in range(3000):
            zf.writestr(f"m{i:04d}.dcm", zero)


def one_big_member(path: Path) -> None:
    """2 GiB, each MiB 8,300 random bytes then zeros: ~100:1, under the 200:1 ratio limit."""
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("big.dcm", "w", force_zip64=True) as member:
        for _ in range(2048):
            noise = rng.integers(0, 256, 8300, dtype=np.uint8).tobytes()
            member.write(noise + bytes(MiB - len(noise)))


def deflated_dicom(path: Path) -> None:
    path.write_bytes(deflated(3840 * MiB))


def measure(path: Path) -> str:
    """``ich info path`` in a child process: wall time, its own peak RSS (wait4) and its last stderr line."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "ich", "info", str(path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err
        )
        status = f"killed after {LIMIT_S} s"
        while time.perf_counter() - start < LIMIT_S:
            pid, code, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status = f"exit {os.waitstatus_to_exitcode(code)}"
                break
            time.sleep(0.02)
        else:
            proc.kill()
            _, _, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err.seek(0)
        lines = err.read().decode(errors="replace").strip().splitlines()
    return f"{wall:6.2f} s  {usage.ru_maxrss / 1024:6.0f} MiB  {status}  {lines[-1][:160] if lines else ''}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="folder for the bombs (default: a temporary one, removed after)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cases = [("many.zip", many_members), ("big.zip", one_big_member), ("deflated.dcm", deflated_dicom)]
        print(f"{'case':14s} {'size':>9s}   wall      peak RSS  outcome", flush=True)
        for name, build in cases:
            path = work / name
            if not path.exists():
                build(path)
            size = f"{os.path.getsize(path) / 1e6:.1f} MB"
            print(f"{name:14s} {size:>9s} {measure(path)}", flush=True)


if __name__ == "__main__":
    main()
