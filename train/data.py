"""The prepared slice cache, patient-level splits, batch loading and on-device augmentation.

A cache folder (written by :mod:`train.prepare`) holds:

- ``images.npy``: uint8 ``(N, 3, S, S)``, row ``i`` = :class:`ich.windowing.Preprocess` output for
  ``metadata.parquet`` row ``i``. One ``.npy`` opened as a memory map: a batch is one gather of
  contiguous 3*S*S-byte rows from the page cache straight into (pinned) memory, with no per-file
  open, decode or pickling, so data loading keeps up with a GPU.
- ``metadata.parquet``: one row per file (ids, header fields, labels per class, ``brain_fraction``,
  ``kept``, ``problem``).
- ``cache.json``: size, windows, classes, source and whether preparation finished.
- ``problems.csv``: files that could not be used, with the reason.

Batches stay uint8 until they are on the training device, where :class:`ich.models.ModelInput` converts,
augments and normalises them: 4x less host-to-device traffic and no CPU-side augmentation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple, cast

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import BatchSampler, Dataset, DistributedSampler

from ich.files import data_dir
from train.distributed import DistInfo

__all__ = [
    "IMAGES",
    "METADATA",
    "INFO",
    "PROBLEMS",
    "CACHE_FORMAT",
    "Cache",
    "is_cache",
    "write_info",
    "synthetic_cache",
    "default_cache_dir",
    "open_data",
    "patient_split",
    "kept_mask",
    "targets",
    "Split",
    "split_rows",
    "BatchReader",
    "BatchLoader",
    "RandomFlip",
    "RandomAffine",
    "RandomGaussianBlur",
    "Compose",
    "build_augment",
]

IMAGES = "images.npy"
METADATA = "metadata.parquet"
INFO = "cache.json"
PROBLEMS = "problems.csv"
CACHE_FORMAT = 1

# The three CT windows are mapped onto RGB channels, so ImageNet statistics are the natural
# normalisation for a pretrained backbone; from scratch they are as good as any.


# --------------------------------------------------------------------------- the cache


def is_cache(path: str | os.PathLike) -> bool:
    """True when ``path`` is a finished prepared cache."""
    info = Path(path) / INFO
    return info.is_file() and json.loads(info.read_text()).get("complete", False)


def write_info(root: Path, info: dict) -> None:
    (root / INFO).write_text(json.dumps(info, indent=2) + "\n")


@dataclass
class Cache:
    """An opened cache: ``frame`` (metadata rows) and the image memmap behind them."""

    root: Path
    frame: pd.DataFrame
    info: dict

    @classmethod
    def open(cls, root: str | os.PathLike) -> Cache:
        root = Path(root)
        if not is_cache(root):
            raise FileNotFoundError(f"{root} is not a finished cache (run: python -m train.prepare DATA --out {root})")
        frame = pd.read_parquet(root / METADATA)
        cache = cls(root, frame, json.loads((root / INFO).read_text()))
        if len(cache.images) != len(frame):
            raise ValueError(f"{root}: {len(cache.images)} images but {len(frame)} metadata rows")
        return cache

    @property
    def images_path(self) -> Path:
        return self.root / IMAGES

    @cached_property
    def images(self) -> np.ndarray:
        """Read-only memory map ``(N, 3, S, S)`` uint8."""
        return np.load(self.images_path, mmap_mode="r")

    @property
    def size(self) -> int:
        return int(self.info["size"])

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.info["classes"])


def synthetic_cache(
    root: str | os.PathLike,
    n: int = 64,
    size: int = 64,
    patients: int = 8,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> Cache:
    """A small random cache for tests and benchmarks.

    Positive slices carry a bright blob in the brain channel, so a model can learn something.
    """
    from ich.labels import CLASSES
    from ich.windowing import MODEL_WINDOWS

    classes = tuple(classes or CLASSES)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, len(classes)), dtype=np.int8)
    labels[:, 1:] = rng.random((n, len(classes) - 1)) < 0.25
    labels[:, 0] = labels[:, 1:].any(1) if len(classes) > 1 else rng.random(n) < 0.5
    images = np.lib.format.open_memmap(root / IMAGES, mode="w+", dtype=np.uint8, shape=(n, 3, size, size))
    images[:] = rng.integers(0, 64, size=images.shape, dtype=np.uint8)
    q = size // 4
    images[labels[:, 0] == 1, 0, q : 2 * q, q : 2 * q] = 230
    images.flush()
    patient = np.arange(n) % patients
    frame = pd.DataFrame(
        {
            "row": np.arange(n),
            "path": [f"synthetic/{i:06d}.dcm" for i in range(n)],
            "sop_uid": [f"ID_{i:09x}" for i in range(n)],
            "patient_id": [f"P{p:04d}" for p in patient],
            "study_uid": [f"S{p:04d}" for p in patient],
            "series_uid": [f"R{p:04d}" for p in patient],
            "bits_stored": np.where(rng.random(n) < 0.3, 12, 16),
            "brain_fraction": rng.random(n).astype(np.float32),
            "kept": True,
            "problem": None,
        }
    )
    for c, name in enumerate(classes):
        frame[name] = labels[:, c]
    frame.to_parquet(root / METADATA)
    write_info(
        root,
        {
            "format": CACHE_FORMAT,
            "size": size,
            "windows": [[w.name, w.level, w.width] for w in MODEL_WINDOWS],
            "classes": list(classes),
            "crop": True,
            "source": "synthetic",
            "n": n,
            "complete": True,
        },
    )
    return Cache.open(root)


def default_cache_dir(data: Path, size: int) -> Path:
    """Where a raw folder is prepared when ``--cache`` is not given (under :func:`ich.files.data_dir`)."""
    tag = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:8]
    return data_dir() / "cache" / f"{data.name}-{tag}-{size}"


def open_data(
    data: Path, cache_dir: Path | None, size: int | None, workers: int, dist_info: DistInfo, log: Callable[..., None]
) -> Cache:
    """Open a cache, or prepare ``data`` into one first (rank 0 only; the others wait)."""
    if not is_cache(data):
        from train.prepare import prepare  # train.prepare imports this module

        cache_dir = cache_dir or default_cache_dir(data, size or 256)
        if dist_info.is_main:
            log(f"preparing {data} into {cache_dir}")
            prepare(data, cache_dir, size=size or 256, workers=workers, progress=True)
        if dist_info.distributed:
            dist.barrier()
        data = cache_dir
    cache = Cache.open(data)
    if size is not None and size != cache.size:
        raise SystemExit(f"--size {size} but {data} was prepared at {cache.size}: prepare another cache")
    return cache


# --------------------------------------------------------------------------- splits and targets


def patient_split(
    patients: Sequence[str] | np.ndarray,
    val_frac: float = 0.2,
    seed: int = 0,
    folds: int | None = None,
    fold: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """``(train_positions, val_positions)`` with no patient on both sides.

    Patients are shuffled with ``seed``; the validation side is ``round(val_frac * patients)`` of
    them, or with ``folds=K`` the ``fold``-th of K near-equal patient groups (K-fold CV).
    """
    patients = np.asarray(patients)
    unique = np.unique(patients)
    if len(unique) < 2:
        raise ValueError(f"a patient-level split needs at least 2 patients, found {len(unique)}")
    order = np.random.default_rng(seed).permutation(unique)
    if folds is not None:
        if not 2 <= folds <= len(unique) or not 0 <= fold < folds:
            raise ValueError(f"need 2 <= folds <= {len(unique)} patients and 0 <= fold < folds (got {folds}, {fold})")
        val_patients = np.array_split(order, folds)[fold]
    else:
        if not 0 < val_frac < 1:
            raise ValueError(f"val_frac must be in (0, 1), got {val_frac}")
        n_val = min(max(1, round(val_frac * len(unique))), len(unique) - 1)
        val_patients = order[:n_val]
    is_val = np.isin(patients, val_patients)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def kept_mask(frame: pd.DataFrame, min_brain: float | None = None) -> pd.Series:
    """Rows used for training: readable files with at least ``min_brain`` brain pixels.

    ``None`` keeps the cache's own ``kept`` flag (the filter it was prepared with).
    """
    if min_brain is None:
        return frame["kept"].astype(bool)
    return frame["problem"].isna() & (frame["brain_fraction"] >= min_brain)


def targets(frame: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """float32 ``(N, C)`` 0/1 targets in ``classes`` order."""
    return frame[list(classes)].to_numpy(dtype=np.float32)


class Split(NamedTuple):
    """Cache rows: ``used`` (after the slice filters), divided by patient into ``train`` and ``valid``."""

    used: np.ndarray
    train: np.ndarray
    valid: np.ndarray


def split_rows(
    frame: pd.DataFrame,
    *,
    min_brain: float | None,
    bleed_only: bool,
    val_sources: Sequence[str] | None,
    val_frac: float,
    seed: int,
    folds: int | None,
    fold: int,
) -> Split:
    """The brain-pixel (and bleed-only) filter, then a :func:`patient_split` of the ``val_sources`` rows.

    Rows of other sources always train; ``val_frac == 0`` without ``folds`` trains on every row.
    """
    selected = kept_mask(frame, min_brain)
    if bleed_only:
        selected &= frame["any"] == 1
    used = np.flatnonzero(selected.to_numpy())
    pool = used
    if val_sources:
        known = set(frame["source"]) if "source" in frame else set()
        if not set(val_sources) <= known:
            raise SystemExit(
                f"--val-sources {','.join(val_sources)}: the cache holds sources {sorted(known) or 'none'}"
            )
        pool = used[np.isin(frame["source"].to_numpy()[used], val_sources)]
    if val_frac == 0 and folds is None:  # the final model of a cross-validated recipe
        return Split(used, used, used[:0])
    _train_pos, val_pos = patient_split(frame["patient_id"].to_numpy()[pool], val_frac, seed, folds, fold)
    valid = pool[val_pos]
    return Split(used, np.setdiff1d(used, valid), valid)


# --------------------------------------------------------------------------- batch loading


class BatchReader:
    """Reads whole batches: ``reader.read(positions) -> (uint8 images, float targets, rows)``.

    ``rows`` maps positions to cache rows; ``target`` holds one row per position.
    """

    def __init__(self, images_path: str | os.PathLike, rows: np.ndarray, target: np.ndarray) -> None:
        self.images = np.load(images_path, mmap_mode="r")
        self.rows = np.asarray(rows, dtype=np.int64)
        self.target = np.asarray(target, dtype=np.float32)
        # Checked once here, because read() uses mode="clip", which would quietly repeat the last image.
        outside = self.rows[(self.rows < 0) | (self.rows >= len(self.images))]
        if len(outside):
            raise ValueError(
                f"{images_path}: holds {len(self.images)} images; rows {outside[:5].tolist()} are outside it "
                "(a metadata table from another cache?)"
            )
        if len(self.target) != len(self.rows):
            raise ValueError(f"{len(self.rows)} rows but {len(self.target)} target rows")

    def __len__(self) -> int:
        return len(self.rows)

    def read(
        self, positions: Sequence[int], pin_memory: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Ascending rows read the file front to back; order inside a batch does not matter to SGD.
        pos = np.sort(np.asarray(positions, dtype=np.int64))
        rows = self.rows[pos]
        # Straight from the page cache into (pinned) memory: one copy. Pinned blocks come from
        # torch's caching host allocator, reused once their host-to-device copy is done, so no
        # page faults per batch. mode="clip" skips numpy's extra buffering of ``out``.
        images = torch.empty((len(rows), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=pin_memory)
        np.take(self.images, rows, axis=0, out=images.numpy(), mode="clip")
        return images, torch.from_numpy(self.target[pos]), torch.from_numpy(rows)


class BatchLoader:
    """Batches of ``(uint8 (B,3,S,S), float (B,C), int64 rows)`` for one process of a (DDP) job.

    A :class:`~torch.utils.data.DistributedSampler` shards positions across ``world_size`` ranks
    (one rank: a plain seeded shuffle); call :meth:`set_epoch` before each epoch. ``workers``
    threads read ``prefetch`` batches each ahead. Threads rather than DataLoader processes: the
    copy from the memory map releases the GIL, and a batch then crosses no process boundary
    (worker processes would copy every batch once more into fresh shared memory, about 5x
    slower per image).
    """

    def __init__(
        self,
        reader: BatchReader,
        batch_size: int,
        shuffle: bool,
        *,
        drop_last: bool = False,
        workers: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        prefetch: int = 2,
    ) -> None:
        self.reader = reader
        # DistributedSampler only needs len(): the indices it yields address the reader.
        self.sampler: DistributedSampler = DistributedSampler(
            cast(Dataset, range(len(reader))), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed
        )
        self.batches = BatchSampler(self.sampler, batch_size, drop_last)
        self.pin_memory = pin_memory
        self.ahead = workers * prefetch
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="batch-reader") if workers > 0 else None

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.pool is None:
            for positions in self.batches:
                yield self.reader.read(positions, self.pin_memory)
            return
        pending: deque[Future] = deque()
        try:
            for positions in self.batches:
                pending.append(self.pool.submit(self.reader.read, positions, self.pin_memory))
                if len(pending) > self.ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # the consumer stopped early (--max-steps): drop what was read ahead
            for future in pending:
                future.cancel()

    def forever(self, first_epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Batches across epochs without end (LR range test, benchmarks)."""
        epoch = first_epoch
        while True:
            self.set_epoch(epoch)
            yield from self
            epoch += 1


# --------------------------------------------------------------------------- on-device augmentation
# Each transform takes and returns a float batch (B, C, H, W) on any device and draws one random
# decision per image, so a whole batch is augmented in a few kernel launches. Draws come from the
# transform's own generator (MONAI's set_random_state), so a seeded run repeats bit for bit
# whatever else in the process uses torch's global generator.


class Randomizable:
    generator: torch.Generator | None = None  # None: torch's global generator

    def set_random_state(self, seed: int, device: torch.device | str = "cpu") -> Randomizable:
        self.generator = torch.Generator(device=device).manual_seed(seed)
        return self

    def rand(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.rand(n, device=device, generator=self.generator)

    def chosen(self, x: torch.Tensor, p: float) -> torch.Tensor:
        return self.rand(x.shape[0], x.device) < p


class RandomFlip(Randomizable):
    """Left-right flip with probability ``p`` (heads are roughly symmetric; up-down is not)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.chosen(x, self.p)[:, None, None, None], x.flip(-1), x)


class RandomAffine(Randomizable):
    """Rotate by U(-``degrees``, ``degrees``) and zoom in by U(1, ``max_zoom``), with probability ``p``.

    Pixels brought in from outside are 0: air in every CT window.
    """

    def __init__(self, degrees: float = 15.0, max_zoom: float = 1.0, p: float = 0.75) -> None:
        self.degrees, self.max_zoom, self.p = degrees, max_zoom, p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.nonzero(self.chosen(x, self.p)).squeeze(1)
        if idx.numel() == 0:
            return x
        n, dev = idx.numel(), x.device
        angle = (self.rand(n, dev) * 2 - 1) * math.radians(self.degrees)
        scale = 1 / (1 + self.rand(n, dev) * (self.max_zoom - 1))
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        theta = torch.stack(
            [torch.stack([cos, -sin, torch.zeros_like(cos)], 1), torch.stack([sin, cos, torch.zeros_like(cos)], 1)], 1
        )
        sub = x[idx]
        grid = F.affine_grid(theta.to(sub.dtype), list(sub.shape), align_corners=False)
        out = x.clone()
        out[idx] = F.grid_sample(sub, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out


class RandomGaussianBlur(Randomizable):
    """Gaussian blur with sigma U(``sigma[0]``, ``sigma[1]``) px, with probability ``p``.

    A separable depthwise convolution whose kernel differs per image; unchosen images get a
    unit impulse, i.e. pass through unchanged.
    """

    def __init__(self, p: float = 0.25, sigma: tuple[float, float] = (0.5, 1.5)) -> None:
        self.p, self.sigma = p, sigma
        self.radius = max(1, math.ceil(3 * sigma[1]))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        chosen = self.chosen(x, self.p)
        if not chosen.any():
            return x
        sigma = self.sigma[0] + self.rand(b, x.device) * (self.sigma[1] - self.sigma[0])
        offsets = torch.arange(-self.radius, self.radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
        kernel = kernel / kernel.sum(1, keepdim=True)
        impulse = (offsets == 0).to(x.dtype).expand(b, -1)
        kernel = torch.where(chosen[:, None], kernel, impulse).repeat_interleave(c, 0)  # (B*C, K)
        r = self.radius
        y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
        y = F.conv2d(y, kernel[:, None, None, :], groups=b * c)  # along width
        y = F.conv2d(y, kernel[:, None, :, None], groups=b * c)  # along height
        return y.reshape(b, c, h, w)


class Compose(Randomizable):
    def __init__(self, transforms: Sequence) -> None:
        self.transforms = list(transforms)

    def set_random_state(self, seed: int, device: torch.device | str = "cpu") -> Compose:
        """One seeded generator on ``device`` (where the batches are augmented), shared by every transform."""
        super().set_random_state(seed, device)
        for t in self.transforms:
            if isinstance(t, Randomizable):
                t.generator = self.generator
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({', '.join(type(t).__name__ for t in self.transforms)})"


def build_augment(flip: float = 0.5, rotate: float = 15.0, zoom: float = 1.0, blur: float = 0.25) -> Compose:
    """The paper's augmentation: flip, +-``rotate`` degrees (optional zoom), Gaussian blur.

    Each argument is a probability (``flip``, ``blur``) or a magnitude; 0 turns it off.
    """
    transforms: list = []
    if flip > 0:
        transforms.append(RandomFlip(flip))
    if rotate > 0 or zoom > 1:
        transforms.append(RandomAffine(rotate, zoom))
    if blur > 0:
        transforms.append(RandomGaussianBlur(blur))
    return Compose(transforms)
