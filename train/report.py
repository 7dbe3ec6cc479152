"""What a :mod:`train.fit` run shows and leaves behind: the epoch table, the checkpoint metadata, the validation predictions."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ich.models import IMAGENET_MEAN, IMAGENET_STD
from train.data import Cache, Compose, Split

__all__ = ["TABLE_COLUMNS", "table_row", "auc_line", "checkpoint_metadata", "write_valid"]

TABLE_COLUMNS = (
    "epoch",
    "train_loss",
    "valid_loss",
    "error_rate",
    "accuracy",
    "accuracy_multi",
    "wlogloss",
    "mean_auc",
    "img/s",
    "time",
)


def table_row(epoch: int, train: dict, valid_loss: float, summary: dict, seconds: float) -> str:
    """One epoch under :data:`TABLE_COLUMNS`: ``train`` as :func:`train.fit.train_one_epoch` returns it."""
    values = (
        f"{epoch:>5d}",
        f"{train['loss']:10.6f}",
        f"{valid_loss:10.6f}",
        f"{summary['error_rate']:10.6f}",
        f"{summary['accuracy']:8.6f}",
        f"{summary['accuracy_multi']:14.6f}",
        f"{summary['weighted_log_loss']:8.5f}",
        f"{summary['mean_auc']:8.4f}",
        f"{train['images_per_second']:5.0f}",
        time.strftime("%M:%S", time.gmtime(seconds)),
    )
    return "  ".join(values)


def auc_line(summary: dict) -> str:
    return "        AUC " + "  ".join(f"{c} {m['auc']:.4f}" for c, m in summary["per_class"].items())


def checkpoint_metadata(
    args: argparse.Namespace,
    cache: Cache,
    split: Split,
    classes: Sequence[str],
    y: np.ndarray,
    *,
    name: str,
    lr: float,
    world_size: int,
    augment: Compose | None,
    amp: bool,
    device: torch.device,
    steps: int,
    train_seconds: float,
    wall_seconds: float,
    images_seen: float,
    thresholds: np.ndarray,
    metrics: dict,
    history: list[dict],
) -> dict:
    """The ``.json`` beside the weights: what :class:`ich.inference.Predictor` needs, the metrics, and how it was made.

    ``args`` are :func:`train.fit.get_args_parser`'s; ``y`` the cache's targets in ``classes`` order.
    """
    frame = cache.frame
    training = {
        "data": str(args.data),
        "cache": str(cache.root),
        "source": cache.info.get("source"),
        "slices_used": len(split.used),
        "train_slices": len(split.train),
        "valid_slices": len(split.valid),
        "train_patients": int(frame["patient_id"].iloc[split.train].nunique()),
        "valid_patients": int(frame["patient_id"].iloc[split.valid].nunique()),
        "train_prevalence": dict(zip(classes, y[split.train].mean(0).tolist())),
        "bleed_only": args.bleed_only,
        "min_brain": args.min_brain if args.min_brain is not None else cache.info.get("min_brain"),
        "split": {
            "by": "patient_id",
            "val_frac": args.val_frac,
            "folds": args.folds,
            "fold": args.fold,
            "seed": args.seed,
        },
        "pretrained": args.pretrained,
        "init": str(args.init) if args.init else None,
        "epochs": args.epochs,
        "freeze_epochs": args.freeze_epochs,
        "lr": lr,
        "weight_decay": args.wd,
        "batch_size": args.batch_size,
        "world_size": world_size,
        "augment": repr(augment),
        "amp": "bf16" if amp else "off",
        "val_sources": args.val_sources,
        "sources": cache.info.get("sources"),
        # A cache unpacked from a lossy train.pack says so: the model saw WebP-compressed slices.
        "lossy_pack": {k: cache.info[k] for k in ("webp_quality", "webp_mean_abs_error") if k in cache.info} or None,
        "steps": steps,
        "device": str(device),
        "train_seconds": train_seconds,
        "wall_seconds": wall_seconds,
        "images_per_second": images_seen / train_seconds if train_seconds else math.nan,
        "resumed_from": str(args.resume) if args.resume else None,
    }
    return {
        "name": name,
        "arch": args.arch,
        "num_classes": len(classes),
        "classes": list(classes),
        "task": args.task,
        "input": cache.info.get("input"),
        "windows": cache.info["windows"],
        "clip": cache.info.get("clip", False),
        "input_size": cache.size,
        "crop": cache.info.get("crop", True),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "thresholds": dict(zip(classes, thresholds.tolist())),
        "threshold_policy": args.thresholds,
        "metrics": metrics,
        "tta_flip": args.tta_flip,
        "history": history,
        "training": training,
    }


def write_valid(path: Path, frame: pd.DataFrame, rows: np.ndarray, y_prob: np.ndarray, classes: Sequence[str]) -> None:
    """The validation predictions with their cache rows, ids, sources and labels (for calibration)."""
    keep = [c for c in ("sop_uid", "patient_id", "source") if c in frame]
    out = frame.iloc[rows][keep].reset_index(drop=True)
    out.insert(0, "row", rows)
    for i, c in enumerate(classes):
        out[c] = frame[c].to_numpy()[rows]
        out[f"p_{c}"] = y_prob[:, i].astype(np.float64)
    out.to_parquet(path)
