"""Turn an RSNA-layout folder into a training cache (see :mod:`train.data` for the layout).

    python -m train.prepare DATA --out CACHE [--workers N] [--min-brain 0.2] [--size 256]

``DATA`` holds ``stage_2_train.csv`` and ``stage_2_train/*.dcm``. Every file is read once with
:func:`ich.dicom.read_slice`, preprocessed with :class:`ich.windowing.Preprocess` straight into the
shared ``images.npy`` memory map by a pool of processes, and described by one metadata row.
Finished chunks are recorded in ``CACHE/parts/`` as they complete, so an interrupted run resumes
where it stopped. Unreadable files are listed in ``CACHE/problems.csv`` and printed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ich import dicom
from ich.labels import CLASSES, read_rsna_csv
from ich.windowing import BRAIN_FRACTION_THRESHOLD, MODEL_WINDOWS, Preprocess, brain_fraction
from train.data import CACHE_FORMAT, IMAGES, INFO, METADATA, PROBLEMS, Cache, is_cache, kept_mask, write_info

__all__ = ["prepare", "find_layout", "get_args_parser", "main"]

PARTS = "parts"
SHOWN_PROBLEMS = 20


def find_layout(data: str | os.PathLike) -> tuple[Path, list[str]]:
    """``(labels csv, image paths relative to data)`` of an RSNA-layout folder."""
    data = Path(data)
    csv = data / "stage_2_train.csv"
    images = data / "stage_2_train"
    if not csv.is_file() or not images.is_dir():
        raise FileNotFoundError(f"{data} is not an RSNA-layout folder: expected stage_2_train.csv and stage_2_train/*.dcm")
    files = sorted(p.relative_to(data).as_posix() for p in images.glob("*.dcm"))
    if not files:
        raise FileNotFoundError(f"no .dcm files in {images}")
    return csv, files


# --------------------------------------------------------------------------- worker side
# Per-process state set once by the pool initializer: the image memmap and the preprocessor.
_worker: dict = {}


def _init_worker(images_path: str, data: str, size: int) -> None:
    _worker.update(images=np.load(images_path, mmap_mode="r+"), data=Path(data), preprocess=Preprocess(size))


def _header(s: dicom.Slice) -> dict:
    # Training needs the patient id for the patient-level split; the cache stays on the trainer's disk.
    return s.header_row() | {"patient_id": s.patient_id, "notes": "; ".join(s.notes), "brain_fraction": brain_fraction(s.hu)}


# Problem rows carry the columns that finishing reads (as nulls), even in an all-problem run.
_EMPTY = dict.fromkeys(("sop_uid", "patient_id", "study_uid", "series_uid", "instance_number", "bits_stored")) | {
    "location": np.nan,
    "brain_fraction": np.nan,
}


def _process(items: Sequence[tuple[int, str]]) -> list[dict]:
    """Read, preprocess and store each ``(row, relative path)``; one metadata dict per item."""
    images, data, preprocess = _worker["images"], _worker["data"], _worker["preprocess"]
    out = []
    for row, rel in items:
        record: dict = {"row": row, "path": rel, **_EMPTY, "problem": None}
        try:
            s = dicom.read_slice(data / rel)
            images[row] = preprocess(s.hu)
            record.update(_header(s))
        except dicom.DicomError as exc:
            record["problem"] = exc.reason
        except Exception as exc:  # one odd file must not end a many-hour run; it is reported instead
            record["problem"] = f"unexpected {type(exc).__name__}: {exc}"
        out.append(record)
    images.flush()
    return out


# --------------------------------------------------------------------------- driver


def _open_images(out: Path, n: int, size: int, files_sha: str) -> None:
    """Create ``images.npy`` (or check that the one there belongs to these files and size)."""
    info_path = out / INFO
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if int(info["size"]) != size or info["files_sha256"] != files_sha:
            raise SystemExit(
                f"{out} holds a cache of other files or size {info['size']}: choose another --out or delete it"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    np.lib.format.open_memmap(out / IMAGES, mode="w+", dtype=np.uint8, shape=(n, 3, size, size)).flush()


def _done_rows(parts: Path) -> set[int]:
    done: set[int] = set()
    for part in parts.glob("*.parquet"):
        done.update(pd.read_parquet(part, columns=["row"])["row"].tolist())
    return done


def _finish(out: Path, data: Path, csv: Path, min_brain: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge parts, join labels, mark ``kept``, number slices within series; ``(frame, problems)``."""
    frame = pd.concat([pd.read_parquet(p) for p in sorted((out / PARTS).glob("*.parquet"))], ignore_index=True)
    frame = frame.sort_values("row").reset_index(drop=True)
    for col in ("instance_number", "thickness", "bits_stored"):  # None in problem rows made them objects
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    labels = read_rsna_csv(csv)
    key = frame["path"].map(lambda p: Path(p).stem)  # RSNA: file ID_xxx.dcm <-> CSV ID_xxx_<class>
    unlabelled = frame["problem"].isna() & ~key.isin(labels.index)
    frame.loc[unlabelled, "problem"] = f"no labels in {csv.name}"
    for c in CLASSES:
        frame[c] = key.map(labels[c]).fillna(0).astype(np.int8)
    frame["brain_fraction"] = frame["brain_fraction"].astype(np.float32)
    frame["kept"] = kept_mask(frame, min_brain)
    order_key = frame["location"].fillna(frame["instance_number"].astype(float))
    frame["slice_index"] = order_key.groupby(frame["series_uid"]).rank(method="first").fillna(0).astype(np.int32) - 1
    problems = frame.loc[frame["problem"].notna(), ["path", "problem"]].rename(columns={"problem": "reason"})
    problems = problems.assign(path=[str(data / p) for p in problems["path"]])
    return frame, problems


def prepare(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    size: int = 256,
    min_brain: float = BRAIN_FRACTION_THRESHOLD,
    workers: int | None = None,
    progress: bool = True,
) -> Cache:
    """Build (or resume, or just reopen) the cache of ``data`` in ``out``; returns it opened.

    ``workers`` defaults to every core; 0 or 1 works in this process.
    """
    data, out = Path(data), Path(out)
    if is_cache(out):
        return _refilter(Cache.open(out), min_brain)
    csv, files = find_layout(data)
    files_sha = hashlib.sha256("\n".join(files).encode()).hexdigest()
    _open_images(out, len(files), size, files_sha)
    info = {
        "format": CACHE_FORMAT,
        "size": size,
        "windows": [[w.name, w.level, w.width] for w in MODEL_WINDOWS],
        "crop": True,  # Preprocess(size) crops to the head
        "classes": list(CLASSES),
        "source": str(data.resolve()),
        "n": len(files),
        "files_sha256": files_sha,
        "min_brain": min_brain,
        "complete": False,
    }
    write_info(out, info)
    parts = out / PARTS
    parts.mkdir(exist_ok=True)
    done = _done_rows(parts)
    todo = [(i, f) for i, f in enumerate(files) if i not in done]
    workers = (os.cpu_count() or 1) if workers is None else workers
    init_args = (str(out / IMAGES), str(data), size)
    # Chunks big enough to amortise task overhead, small enough that progress and resume are fine-grained.
    chunk = max(16, min(512, len(todo) // (max(workers, 1) * 8)))
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    bar = tqdm(total=len(files), initial=len(done), unit="slice", desc="prepare", disable=not progress)

    def record(records: list[dict]) -> None:
        # Written then renamed: a crash mid-write leaves no half part for the resume to trip on.
        part = parts / f"part-{records[0]['row']:09d}.parquet"
        pd.DataFrame(records).to_parquet(part.with_suffix(".tmp"))
        os.replace(part.with_suffix(".tmp"), part)
        bar.update(len(records))

    if workers <= 1:
        _init_worker(*init_args)
        for items in chunks:
            record(_process(items))
        _worker.clear()
    else:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=init_args) as pool:
            for future in as_completed([pool.submit(_process, items) for items in chunks]):
                record(future.result())
    bar.close()

    frame, problems = _finish(out, data, csv, min_brain)
    frame.to_parquet(out / METADATA)
    problems.to_csv(out / PROBLEMS, index=False)
    write_info(out, {**info, "complete": True, "kept": int(frame["kept"].sum()), "problems": len(problems)})
    shutil.rmtree(parts)
    _report(out, frame, problems, min_brain)
    return Cache.open(out)


def _refilter(cache: Cache, min_brain: float) -> Cache:
    """Reapply the blank-slice filter of a finished cache when ``min_brain`` changed (no re-reading)."""
    if cache.info.get("min_brain") == min_brain:
        return cache
    frame = cache.frame
    frame["kept"] = kept_mask(frame, min_brain)
    frame.to_parquet(cache.root / METADATA)
    write_info(cache.root, {**cache.info, "min_brain": min_brain, "kept": int(frame["kept"].sum())})
    return Cache.open(cache.root)


def _report(out: Path, frame: pd.DataFrame, problems: pd.DataFrame, min_brain: float) -> None:
    usable = frame["problem"].isna()
    dropped = int((usable & ~frame["kept"]).sum())
    print(
        f"{out}: {len(frame)} files, {int(frame['kept'].sum())} kept, {dropped} below {min_brain:.0%} brain pixels, "
        f"{len(problems)} problem(s)"
    )
    for path, reason in problems.head(SHOWN_PROBLEMS).itertuples(index=False):
        print(f"  problem: {path}: {reason}")
    if len(problems) > SHOWN_PROBLEMS:
        print(f"  ... {len(problems) - SHOWN_PROBLEMS} more in {out / PROBLEMS}")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Prepare an RSNA-layout folder into a training cache", add_help=add_help)
    parser.add_argument("data", help="folder with stage_2_train.csv and stage_2_train/*.dcm")
    parser.add_argument("--out", required=True, help="cache folder to create (or resume)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores; 0 = in this process)")
    parser.add_argument("--min-brain", type=float, default=BRAIN_FRACTION_THRESHOLD, help="drop slices with a smaller brain-pixel fraction")
    parser.add_argument("--size", type=int, default=256, help="square side of the cached slices")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    cache = prepare(args.data, args.out, size=args.size, min_brain=args.min_brain, workers=args.workers)
    return 0 if cache.frame["kept"].any() else 2


if __name__ == "__main__":
    sys.exit(main())
