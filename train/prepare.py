"""Turn labelled training folders into one training cache (see :mod:`train.data` for the layout).

    python -m train.prepare DATA [DATA ...] --out CACHE [--input brain] [--size 256] [--workers N]

Each ``DATA`` is one of the layouts :mod:`ich.datasets` reads (RSNA DICOM, RSNA PNG, PHE-SICH,
Roboflow boxes); the cache's ``source`` column says where each row came from. Every image is read
once (DICOM through :func:`ich.dicom.read_slice`, pre-windowed images through
:func:`ich.datasets.load_hu`), preprocessed with the
``--input`` definition straight into the shared ``images.npy`` memory map by a pool of processes,
and described by one metadata row. Finished chunks are recorded in ``CACHE/parts/`` as they
complete, so an interrupted run resumes where it stopped. Unreadable files and label mismatches are
listed in ``CACHE/problems.csv`` and printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
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
from ich.datasets import Source, load_hu, read_source
from ich.files import atomic_write
from ich.labels import CLASSES
from ich.windowing import (
    BRAIN,
    BRAIN_FRACTION_THRESHOLD,
    INPUTS,
    THREE_WINDOW_INPUT,
    InputSpec,
    Preprocess,
    brain_fraction,
)
from train.data import CACHE_FORMAT, IMAGES, INFO, METADATA, PROBLEMS, Cache, is_cache, kept_mask, write_info

__all__ = ["prepare", "read_sources", "get_args_parser", "main"]

PARTS = "parts"
SHOWN_PROBLEMS = 20
log = logging.getLogger(__name__)


def read_sources(folders: Sequence[str | os.PathLike], spec: InputSpec) -> tuple[pd.DataFrame, list[Source]]:
    """One manifest over ``folders`` (row order = cache row order) and the sources it came from."""
    read = [read_source(f) for f in folders]
    for source in read:
        if source.manifest["kind"].eq("image").any() and spec.windows != (BRAIN,) * len(spec.windows):
            raise SystemExit(
                f"{source.root} holds brain-window images only: prepare it with --input brain, not {spec.name}"
            )
    return pd.concat([s.manifest for s in read], ignore_index=True), read


# --------------------------------------------------------------------------- worker side
# Per-process state set once by the pool initializer: the image memmap and the preprocessor.
_worker: dict = {}


def _init_worker(images_path: str, size: int, spec_name: str) -> None:
    dicom.quiet_invalid_values()  # this process exists only to read training files
    _worker.update(
        images=np.load(images_path, mmap_mode="r+"), preprocess=Preprocess.from_spec(INPUTS[spec_name], size)
    )


def _header(s: dicom.Slice) -> dict:
    # Training needs the patient id for the patient-level split; the cache stays on the trainer's disk.
    return s.header_row() | {"patient_id": s.patient_id, "notes": "; ".join(s.notes)}


# Problem rows carry the columns that finishing reads (as nulls), even in an all-problem run.
_EMPTY = dict.fromkeys(("sop_uid", "patient_id", "study_uid", "series_uid", "instance_number", "bits_stored")) | {
    "location": np.nan,
    "thickness": np.nan,
    "brain_fraction": np.nan,
}


def _read_hu(path: str, kind: str, rotate: int) -> tuple[np.ndarray, dict]:
    """``(HU slice, header fields)`` of one manifest row."""
    if kind == "dicom":
        s = dicom.read_slice(path)
        return s.pixels, _header(s)
    return load_hu(path, rotate), {}


def _process(items: Sequence[tuple[int, str, str, int]]) -> list[dict]:
    """Read, preprocess and store each ``(row, path, kind, rotate)``; one metadata dict per item."""
    images, preprocess = _worker["images"], _worker["preprocess"]
    out = []
    for row, path, kind, rotate in items:
        record: dict = {"row": row, **_EMPTY, "problem": None}
        try:
            hu, header = _read_hu(path, kind, rotate)
            images[row] = preprocess(hu)
            record.update(header, brain_fraction=brain_fraction(hu))
        except (dicom.DicomError, ValueError) as exc:
            record["problem"] = getattr(exc, "reason", str(exc))
        except Exception as exc:  # one odd file must not end a many-hour run; it is reported instead
            log.exception("unexpected error preparing cache row %d", row)  # the row, not the path: names can identify
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


def _finish(
    out: Path, manifest: pd.DataFrame, source_problems: list, min_brain: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Merge parts with the manifest, mark ``kept``, number slices within series; ``(frame, problems)``."""
    frame = pd.concat([pd.read_parquet(p) for p in sorted((out / PARTS).glob("*.parquet"))], ignore_index=True)
    frame = frame.sort_values("row").reset_index(drop=True)
    for col in ("instance_number", "thickness", "bits_stored"):  # None in problem rows made them objects
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    frame["path"] = manifest["path"].to_numpy()
    frame["source"] = manifest["source"].to_numpy()
    frame["image_id"] = manifest["image_id"].to_numpy()
    frame["mask"] = manifest["mask"].to_numpy()
    # DICOM rows have their patient (and SOP UID) from the header; image rows from the manifest.
    frame["patient_id"] = frame["patient_id"].fillna(manifest["patient_id"])
    frame["sop_uid"] = frame["sop_uid"].fillna(manifest["image_id"])
    for c in CLASSES:
        frame[c] = manifest[c].to_numpy(np.int8)
    frame["brain_fraction"] = frame["brain_fraction"].astype(np.float32)
    frame["kept"] = kept_mask(frame, min_brain)
    order_key = frame["location"].fillna(frame["instance_number"].astype(float))
    frame["slice_index"] = order_key.groupby(frame["series_uid"]).rank(method="first").fillna(0).astype(np.int32) - 1
    problems = frame.loc[frame["problem"].notna(), ["path", "problem"]].rename(columns={"problem": "reason"})
    problems = pd.concat(
        [problems, pd.DataFrame([(p.path, p.reason) for p in source_problems], columns=["path", "reason"])]
    )
    return frame, problems.reset_index(drop=True)


def prepare(
    data: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    size: int = 256,
    spec: InputSpec = THREE_WINDOW_INPUT,
    min_brain: float = BRAIN_FRACTION_THRESHOLD,
    workers: int | None = None,
    progress: bool = True,
) -> Cache:
    """Build (or resume, or just reopen) the cache of the folder(s) ``data`` in ``out``; returns it opened.

    ``spec`` is the model input (:data:`ich.windowing.INPUTS`). ``workers`` defaults to every
    core; 0 or 1 works in this process.
    """
    folders = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    out = Path(out)
    if is_cache(out):
        return _refilter(Cache.open(out), min_brain)
    manifest, sources = read_sources(folders, spec)
    files_sha = hashlib.sha256("\n".join([spec.name, *manifest["path"]]).encode()).hexdigest()
    _open_images(out, len(manifest), size, files_sha)
    info = {
        "format": CACHE_FORMAT,
        "size": size,
        "input": spec.name,
        "windows": [[w.name, w.level, w.width] for w in spec.windows],
        "clip": spec.clip,
        "crop": True,  # Preprocess crops to the head
        "classes": list(CLASSES),
        "source": ", ".join(str(Path(f).resolve()) for f in folders),
        "sources": {
            s.layout: {"root": str(s.root.resolve()), "images": len(s.manifest), "with_hemorrhage": s.positives}
            for s in sources
        },
        "n": len(manifest),
        "files_sha256": files_sha,
        "min_brain": min_brain,
        "complete": False,
    }
    write_info(out, info)
    parts = out / PARTS
    parts.mkdir(exist_ok=True)
    done = _done_rows(parts)
    todo = [
        (i, path, kind, int(rot))
        for i, (path, kind, rot) in enumerate(manifest[["path", "kind", "rotate"]].itertuples(index=False))
        if i not in done
    ]
    workers = (os.cpu_count() or 1) if workers is None else workers
    init_args = (str(out / IMAGES), size, spec.name)
    # Chunks big enough to amortise task overhead, small enough that progress and resume are fine-grained.
    chunk = max(16, min(512, len(todo) // (max(workers, 1) * 8)))
    chunks = [todo[i : i + chunk] for i in range(0, len(todo), chunk)]
    bar = tqdm(total=len(manifest), initial=len(done), unit="slice", desc="prepare", disable=not progress)

    def record(records: list[dict]) -> None:
        # Written then renamed: a crash mid-write leaves no half part for the resume to trip on.
        part = parts / f"part-{records[0]['row']:09d}.parquet"
        atomic_write(part, pd.DataFrame(records).to_parquet)
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

    frame, problems = _finish(out, manifest, [p for s in sources for p in s.problems], min_brain)
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
    for source, group in frame.groupby("source", sort=False):
        print(
            f"  {source}: {len(group)} images, {int((group['any'] == 1).sum())} with hemorrhage, {int(group['kept'].sum())} kept"
        )
    for path, reason in problems.head(SHOWN_PROBLEMS).itertuples(index=False):
        print(f"  problem: {path}: {reason}")
    if len(problems) > SHOWN_PROBLEMS:
        print(f"  ... {len(problems) - SHOWN_PROBLEMS} more in {out / PROBLEMS}")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Prepare labelled training folders into one training cache", add_help=add_help
    )
    parser.add_argument(
        "data", nargs="+", help="training folders: RSNA DICOM or PNG layout, PHE-SICH, Roboflow boxes (ich.datasets)"
    )
    parser.add_argument(
        "--input",
        default=THREE_WINDOW_INPUT.name,
        choices=sorted(INPUTS),
        help="model input definition (brain: the brain window only, needed for PNG sets)",
    )
    parser.add_argument("--out", required=True, help="cache folder to create (or resume)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores; 0 = in this process)")
    parser.add_argument(
        "--min-brain",
        type=float,
        default=BRAIN_FRACTION_THRESHOLD,
        help="drop slices with a smaller brain-pixel fraction",
    )
    parser.add_argument("--size", type=int, default=256, help="square side of the cached slices")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    dicom.quiet_invalid_values()
    cache = prepare(
        args.data, args.out, size=args.size, spec=INPUTS[args.input], min_brain=args.min_brain, workers=args.workers
    )
    return 0 if cache.frame["kept"].any() else 2


if __name__ == "__main__":
    sys.exit(main())
