"""Decode -> scores per inference engine (torch, onnxruntime), timed by ``ich predict --timings --repeat``.

    .venv/bin/python scripts/bench_engines.py [--engines torch,onnxruntime] [--runs 3] [--repeat 6]

Series: the first 36-slice series of ../shared/data/rsna-sample (else a 36-slice phantom) and the thin
238-slice CQ500 series ../shared/data/cq500/CQ500-CT-0 (scored on ~5 mm slabs; skipped when absent). Each
run is one ``python -m ich predict SERIES --timings --repeat N --engine E`` process; runs alternate the
engines, so a shared machine's load falls on each alike. Prints, per series and engine, the medians over
runs of ``total_s`` (the first call: read, decode, preprocess, infer, with the model loaded), of the warm
calls' medians (``warm_total_s``, ``warm_infer_s``: a listener's steady state) and of ``load_s``, with the
load average. Targets (issue 25): 36 slices <= 1.0 s (goal 0.5 s), the CQ500 series <= 20 s. Prints
numbers; not a test. The first onnxruntime run on a machine exports the model (``ich.engine``): its
``load_s`` is the export's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ich import dicom  # noqa: E402
from scripts.bench_app import series_files  # noqa: E402

CQ500_SERIES = ROOT.parent / "shared" / "data" / "cq500" / "CQ500-CT-0"
REPORTED = ("total_s", "warm_total_s", "warm_infer_s", "load_s")


def predict_timings(paths: list[str], engine: str, repeat: int, out: Path) -> dict[str, float]:
    """The JSON line ``ich predict --timings`` prints last."""
    command = [sys.executable, "-m", "ich", "predict", *paths, "--out", str(out), "--quiet", "--timings"]
    command += ["--repeat", str(repeat), "--engine", engine]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or f", {engine})" not in proc.stderr:  # the engine asked for, not a fallback
        raise SystemExit(f"{' '.join(command[:4])} ... --engine {engine} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(name: str, paths: list[str], engines: list[str], runs: int, repeat: int, tmp: Path) -> None:
    results: dict[str, list[dict[str, float]]] = {e: [] for e in engines}
    loads = []
    for _ in range(runs):
        for engine in engines:
            results[engine].append(predict_timings(paths, engine, repeat, tmp / "sub.csv"))
            loads.append(os.getloadavg()[0])
    for engine, timings in results.items():
        medians = {k: statistics.median(t[k] for t in timings) for k in REPORTED}
        print(
            f"{name:16s} {engine:12s} " + "  ".join(f"{k} {v:6.2f}" for k, v in medians.items()),
            f"(median of {runs} runs, {repeat - 1} warm calls each; load average {min(loads):.1f}-{max(loads):.1f})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default="torch,onnxruntime", help="comma-separated ich.engine names")
    parser.add_argument("--runs", type=int, default=3, help="processes per series and engine")
    parser.add_argument("--repeat", type=int, default=6, help="ich predict --repeat (>= 2: warm calls are timed)")
    args = parser.parse_args()
    dicom.quiet_invalid_values()  # an entry point: RSNA's invalid UIDs are expected
    engines = args.engines.split(",")
    print(f"{os.cpu_count()} CPU(s); seconds")
    with tempfile.TemporaryDirectory(prefix="ich-bench-") as tmp_name:
        tmp = Path(tmp_name)
        bench("36-slice RSNA", [str(p) for p in series_files(tmp)], engines, args.runs, args.repeat, tmp)
        if CQ500_SERIES.is_dir():
            bench("238-slice CQ500", [str(CQ500_SERIES)], engines, args.runs, args.repeat, tmp)


if __name__ == "__main__":
    main()
