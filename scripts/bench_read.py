"""Benchmark: DICOM read -> HU -> crop -> 256x256 -> 3 windows, slices per second.

    .venv/bin/python scripts/bench_read.py [FOLDER] [--repeat 3]

Prints slices/s on one core and on all cores (one process per core). Default folder:
../shared/data/rsna-sample (uncompressed 512x512 slices).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ich import dicom
from ich.windowing import Preprocess

PREPROCESS = Preprocess(size=256)


def process(path: str) -> int:
    return PREPROCESS(dicom.read_slice(path).pixels).shape[0]


def chunk(paths: list[str]) -> int:
    # One thread per worker: the point is per-core throughput, not oversubscription.
    import cv2

    cv2.setNumThreads(1)
    return sum(process(p) for p in paths)


def main(argv: list[str] | None = None) -> None:
    dicom.quiet_invalid_values()  # an entry point: RSNA's invalid UIDs are expected
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default=str(root.parent / "shared/data/rsna-sample"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    paths = [str(p) for p in sorted(Path(args.folder).rglob("*.dcm"))]
    if not paths:
        parser.error(f"no .dcm files under {args.folder}")
    cores = os.cpu_count() or 1
    chunk(paths[:8])  # warm imports and caches

    def best(fn) -> float:
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    one = best(lambda: chunk(paths))
    print(f"{len(paths)} slices from {args.folder}")
    print(f"1 core : {len(paths) / one:8.1f} slices/s (median of {args.repeat})")
    with ProcessPoolExecutor(cores) as pool:
        parts = [paths[i::cores] for i in range(cores)]
        list(pool.map(chunk, parts))  # start the workers
        many = best(lambda: sum(pool.map(chunk, parts)))
    print(f"{cores} cores: {len(paths) / many:8.1f} slices/s ({len(paths) / many / cores:.1f} per core)")


if __name__ == "__main__":
    main()
