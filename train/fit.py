"""Train a hemorrhage slice classifier, in the style of torchvision's classification reference.

    python -m train.fit --data DATA_OR_CACHE --arch resnet18 --task binary --epochs 5 --out runs
    python -m train.fit --data CACHE --arch resnet50 --task multilabel --bleed-only --lr-find
    torchrun --nproc_per_node 8 -m train.fit --data CACHE ...           # DDP, one GPU per process

``--data`` is a cache made by :mod:`train.prepare` or an RSNA-layout folder (prepared on first use
into ``--cache``). Validation is split by patient. Training follows fastai's recipe: AdamW,
one-cycle schedule, optionally a first phase training only the new head (``--freeze-epochs``) and
an LR range test (``--lr-find``, or ``--lr auto``). Writes ``<out>/<name>.safetensors`` + ``.json``
through :mod:`ich.checkpoint`, and ``<name>.state.pt`` after each epoch for ``--resume``.

Tasks: ``binary`` has one output (``any``: bleed or not) trained with a sigmoid, the same decision
as the paper's two-way softmax; ``multilabel`` has six (``any`` + the five subtypes).

Decision thresholds: 0.5 per class (``--thresholds fixed``, the paper's), or per class the one
maximising Youden's J on the validation set (``--thresholds youden``); the latter are chosen on the
same patients the reported metrics come from, so those metrics are optimistic.

Labels a source does not give (``ich.datasets.UNKNOWN``, -1) are left out of the loss and the
metrics. ``--val-sources`` keeps validation (and ``--folds``) to some sources: the others always
train. The validation predictions (logits, flip-averaged with ``--tta-flip``) are written to
``<name>.valid.parquet`` for calibration and out-of-fold reports.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR

from ich import checkpoint
from ich.files import atomic_write
from ich.labels import DEFAULT_THRESHOLD
from ich.metrics import summarize, youden_thresholds
from ich.models import (
    ARCHITECTURES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelInput,
    build_model,
    flip_averaged_logits,
    freeze_backbone,
    unwrap,
)
from train import lr_finder, report
from train.data import BatchLoader, BatchReader, build_augment, open_data, split_rows, targets
from train.distributed import DistInfo, concat_across, init_distributed, sum_across, wrap

__all__ = [
    "Phase",
    "get_args_parser",
    "task_classes",
    "plan_phases",
    "one_cycle",
    "train_step",
    "train_one_epoch",
    "evaluate",
    "main",
]


# --------------------------------------------------------------------------- task and schedule


def task_classes(task: str, all_classes: Sequence[str]) -> tuple[str, ...]:
    """Output order of the network: ``("any",)`` for binary, every class for multilabel."""
    return ("any",) if task == "binary" else tuple(all_classes)


@dataclass(frozen=True)
class Phase:
    """One one-cycle run: ``epochs`` at peak rate ``lr``, backbone frozen or not."""

    name: str
    epochs: int
    frozen: bool
    lr: float
    pct_start: float


def plan_phases(epochs: int, freeze_epochs: int, lr: float) -> list[Phase]:
    """fastai's ``fine_tune``: head-only epochs at ``lr`` (warm-up 99 %), then all at ``lr / 2``."""
    if not freeze_epochs:
        return [Phase("full", epochs, False, lr, 0.25)]
    return [Phase("head", freeze_epochs, True, lr, 0.99), Phase("full", epochs, False, lr / 2, 0.25)]


def one_cycle(optimizer: torch.optim.Optimizer, max_lr: float, total_steps: int, pct_start: float = 0.25) -> OneCycleLR:
    """fastai's ``fit_one_cycle`` defaults: div 25, final div 1e5, cosine, momentum 0.95 -> 0.85.

    torch divides the *starting* rate by ``final_div_factor``, fastai the peak by ``div_final``,
    hence 1e5 / 25. With AdamW, "momentum" is beta1. Tiny (smoke) runs get a warm-up of at least
    two steps, as torch's schedule divides by zero on a shorter one.
    """
    total_steps = max(total_steps, 3)
    return OneCycleLR(
        optimizer,
        max_lr=max_lr,
        total_steps=total_steps,
        pct_start=min(max(pct_start, 2 / total_steps), 0.99),
        anneal_strategy="cos",
        div_factor=25.0,
        final_div_factor=1e5 / 25.0,
        cycle_momentum=True,
        base_momentum=0.85,
        max_momentum=0.95,
    )


# --------------------------------------------------------------------------- steps


class MaskedBCEWithLogits(nn.Module):
    """Binary cross-entropy over the known cells only: targets below 0 (unknown) add nothing."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        known = target >= 0
        loss = F.binary_cross_entropy_with_logits(logits, target.clamp(min=0), reduction="none")
        return (loss * known).sum() / known.sum().clamp(min=1)


def use_bf16(device: torch.device, mode: str) -> bool:
    """bf16 autocast: always on CUDA under ``auto``; on a CPU only with native bf16 (AVX512-BF16/AMX).

    Measured on a 2-core AVX512-BF16 CPU: resnet18 at 128 px trains 2.6x faster than fp32
    (with channels_last); on CPUs without it bf16 is emulated and slower.
    """
    if mode != "auto":
        return mode == "bf16"
    if device.type == "cuda":
        return True
    native = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return device.type == "cpu" and bool(native)


def forward_logits(model: nn.Module, inputs: torch.Tensor, amp: bool, flip: bool = False) -> torch.Tensor:
    """float32 logits; with ``flip`` the mean of the image's and its left-right mirror's (test-time flip)."""
    with torch.autocast(device_type=inputs.device.type, dtype=torch.bfloat16, enabled=amp):
        return flip_averaged_logits(model, inputs, flip)


def train_step(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    target: torch.Tensor,
    amp: bool,
) -> torch.Tensor:
    """One optimiser step; returns the (detached) batch loss without synchronising the device."""
    with torch.autocast(device_type=inputs.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(inputs)
    loss = criterion(logits.float(), target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: OneCycleLR | None,
    loader: Iterable,
    to_input: ModelInput,
    epoch: int,
    *,
    max_steps: int | None = None,
    amp: bool = False,
    print_freq: int = 0,
    log: Callable[..., None] = print,
) -> dict:
    """Train over ``loader`` (at most ``max_steps`` batches); losses and img/s summed over ranks."""
    model.train()
    device = to_input.device
    loss_sum = torch.zeros((), device=device)
    seen = steps = 0
    start = time.perf_counter()
    for images, target, _ in loader:
        if max_steps is not None and steps >= max_steps:
            break
        loss = train_step(
            model, criterion, optimizer, to_input(images, train=True), target.to(device, non_blocking=True), amp
        )
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss * len(target)  # stays on the device: no sync per step
        seen += len(target)
        steps += 1
        if print_freq and steps % print_freq == 0:
            rate = seen / (time.perf_counter() - start)
            lr = optimizer.param_groups[0]["lr"]
            log(f"  epoch {epoch} step {steps}: loss {loss.item():.4f}  lr {lr:.2e}  {rate:.0f} img/s per process")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    total_loss, total_seen = sum_across(loss_sum, torch.tensor(float(seen), device=device))
    n = int(total_seen.item())
    return {
        "loss": total_loss.item() / max(n, 1),
        "images": n,
        "steps": steps,
        "seconds": seconds,
        "images_per_second": n / seconds,
    }


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: Iterable, to_input: ModelInput, amp: bool = False, flip: bool = False
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """``(mean BCE, y_true, y_prob, rows)`` over the whole validation set, gathered from every rank.

    Rows a DistributedSampler repeated to even out shards are counted once; ``rows`` are their
    cache rows. ``flip``: test-time flip (logits averaged with the mirror image's).
    """
    net = unwrap(model).eval()  # the ranks hold identical weights: no DDP collectives needed
    device = to_input.device
    rows, losses, trues, probs = [], [], [], []
    for images, target, row in loader:
        logits = forward_logits(net, to_input(images), amp, flip)
        target = target.to(device, non_blocking=True)
        known = target >= 0
        bce = F.binary_cross_entropy_with_logits(logits, target.clamp(min=0), reduction="none")
        losses.append((bce * known).sum(1) / known.sum(1).clamp(min=1))
        trues.append(target)
        probs.append(logits)
        rows.append(row)
    row, loss, y_true, raw = concat_across([torch.cat(x).cpu().numpy() for x in (rows, losses, trues, probs)])
    _, first = np.unique(row, return_index=True)
    return float(loss[first].mean()), y_true[first], 1 / (1 + np.exp(-raw[first])), row[first]


# --------------------------------------------------------------------------- main


def _lr_value(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lr takes a number or 'auto', not {text!r}") from None


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Train an ICH slice classifier", add_help=add_help)
    p.add_argument(
        "--data", required=True, type=Path, help="prepared cache, or RSNA-layout folder (prepared on first use)"
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="where to prepare a raw --data folder (default $ICH_DATA_DIR/cache/...)",
    )
    p.add_argument("--size", type=int, default=None, help="slice size when preparing (default 256; must match a cache)")
    p.add_argument(
        "--min-brain", type=float, default=None, help="brain-pixel filter (default: the cache's 'kept' flag)"
    )
    p.add_argument("--arch", default="resnet18", choices=ARCHITECTURES)
    p.add_argument("--pretrained", action="store_true", help="start from torchvision ImageNet weights")
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this checkpoint's weights (fine-tuning); arch and classes must match",
    )
    p.add_argument("--task", default="binary", choices=("binary", "multilabel"))
    p.add_argument(
        "--bleed-only",
        action="store_true",
        help="train and validate on slices with a bleed only (paper's subtype model)",
    )
    p.add_argument("--epochs", type=int, default=5, help="epochs with the whole network trained")
    p.add_argument("--freeze-epochs", type=int, default=0, help="epochs training only the new head first")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument(
        "--lr", type=_lr_value, default=1e-3, help="peak one-cycle rate, or 'auto' (LR range test's suggestion)"
    )
    p.add_argument("--wd", type=float, default=0.01, help="AdamW weight decay (fastai default)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop after this many optimiser steps in all (smoke runs)"
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--amp",
        default="auto",
        choices=("auto", "bf16", "off"),
        help="bf16 autocast (auto: CUDA, or a CPU with native bf16)",
    )
    p.add_argument("--workers", type=int, default=4, help="data-reading threads per training process (0 = inline)")
    p.add_argument("--out", type=Path, default=Path("runs"))
    p.add_argument("--name", default=None, help="checkpoint name (default <arch>-<task>[-fold<i>])")
    p.add_argument("--resume", type=Path, default=None, help="a <name>.state.pt to continue from")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--val-frac", type=float, default=0.2, help="fraction of patients held out (0: train on all, no validation)"
    )
    p.add_argument("--folds", type=int, default=None, help="K-fold by patient: validate on fold --fold of K")
    p.add_argument(
        "--val-sources",
        default=None,
        help="comma-separated cache sources validation draws from (default: all); the rest always train",
    )
    p.add_argument(
        "--tta-flip", action="store_true", help="validate (and later predict) on the mean of each slice and its mirror"
    )
    p.add_argument("--fold", type=int, default=0)
    p.add_argument(
        "--lr-find", action="store_true", help="run the LR range test, write its plot, print the suggestion, exit"
    )
    p.add_argument("--lr-find-iters", type=int, default=100)
    p.add_argument(
        "--thresholds", default="fixed", choices=("fixed", "youden"), help="0.5 per class, or chosen on validation"
    )
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--aug-flip", type=float, default=0.5, help="left-right flip probability")
    p.add_argument("--aug-rotate", type=float, default=15.0, help="max rotation, degrees")
    p.add_argument("--aug-zoom", type=float, default=1.0, help="max zoom-in factor (1 = none)")
    p.add_argument("--aug-blur", type=float, default=0.25, help="Gaussian blur probability")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--print-freq", type=int, default=50, help="log every N steps (0 = per epoch only)")
    return p


def _budgets(phases: list[Phase], steps_per_epoch: int, max_steps: int | None) -> list[int]:
    """Optimiser steps per phase: its epochs' worth, cut so that all phases total at most ``max_steps``."""
    left = math.inf if max_steps is None else max_steps
    out = []
    for phase in phases:
        out.append(int(min(phase.epochs * steps_per_epoch, left)))
        left -= out[-1]
    return out


def _train(args: argparse.Namespace, dist_info: DistInfo, device: torch.device) -> dict:
    log: Callable[..., None] = print if dist_info.is_main else (lambda *a, **k: None)
    torch.manual_seed(args.seed + dist_info.rank)  # same init everywhere is DDP's job; augmentation differs per rank
    cuda = device.type == "cuda"
    amp = use_bf16(device, args.amp)
    name = args.name or f"{args.arch}-{args.task}" + (f"-fold{args.fold}" if args.folds else "")
    args.out.mkdir(parents=True, exist_ok=True)

    cache = open_data(args.data, args.cache, args.size, args.workers, dist_info, log)
    classes = task_classes(args.task, cache.classes)
    split = split_rows(
        cache.frame, min_brain=args.min_brain, bleed_only=args.bleed_only,
        val_sources=args.val_sources.split(",") if args.val_sources else None,
        val_frac=args.val_frac, seed=args.seed, folds=args.folds, fold=args.fold,
    )  # fmt: skip
    used, train_rows, val_rows = split
    y = targets(cache.frame, classes)
    log(
        f"{cache.root}: {len(used)} of {len(cache.frame)} slices used; train {len(train_rows)}, valid {len(val_rows)} (split by patient)"
    )

    loader_kw = dict(
        workers=args.workers, seed=args.seed, rank=dist_info.rank, world_size=dist_info.world_size, pin_memory=cuda
    )
    # Dropping the ragged last batch keeps BatchNorm away from 1-image batches, when there is more than one batch.
    drop_last = len(train_rows) // dist_info.world_size > args.batch_size
    train_reader = BatchReader(cache.images_path, train_rows, y[train_rows])
    train_loader = BatchLoader(train_reader, args.batch_size, True, drop_last=drop_last, **loader_kw)
    val_loader = BatchLoader(BatchReader(cache.images_path, val_rows, y[val_rows]), args.batch_size, False, **loader_kw)

    def validate(model: nn.Module) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        if len(val_rows):
            return evaluate(model, val_loader, to_input, amp, args.tta_flip)
        empty = np.zeros((0, len(classes)), np.float32)
        return math.nan, empty, empty, np.zeros(0, np.int64)

    augment = None
    if not args.no_augment:
        augment = build_augment(args.aug_flip, args.aug_rotate, args.aug_zoom, args.aug_blur)
        augment.set_random_state(args.seed + dist_info.rank, device)
    to_input = ModelInput(device, IMAGENET_MEAN, IMAGENET_STD, augment, channels_last=cuda or amp)

    net = build_model(args.arch, len(classes), args.pretrained)
    if args.init:
        state, init_meta = checkpoint.load(args.init)
        if init_meta["arch"] != args.arch or list(init_meta["classes"]) != list(classes):
            raise SystemExit(
                f"--init {args.init} is {init_meta['arch']} predicting {init_meta['classes']}; "
                f"this run is {args.arch} predicting {list(classes)}"
            )
        net.load_state_dict(state)
    net = net.to(device)
    if cuda or amp:
        net = net.to(memory_format=torch.channels_last)
    criterion = MaskedBCEWithLogits()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=args.wd)

    start_phase = start_epoch = step = 0
    # Time and images of an interrupted run's finished epochs, so a resumed run reports its whole cost.
    earlier = {"train_seconds": 0.0, "wall_seconds": 0.0, "images_seen": 0.0}
    history: list[dict] = []
    resume_state: dict = {}
    lr = args.lr
    if args.resume:
        # Optimiser state is tensors and plain values: the weights-only unpickler suffices (no code runs).
        resume_state = torch.load(args.resume, map_location="cpu", weights_only=True)
        net.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        start_phase, start_epoch, step = resume_state["phase"], resume_state["epoch"], resume_state["step"]
        history, lr = resume_state["history"], resume_state["lr"]
        earlier = {k: float(resume_state.get(k, 0.0)) for k in earlier}
        # The augmentation continues its random stream (one process: the saved stream is rank 0's).
        saved_rng = resume_state.get("augment_rng")
        if (
            augment is not None
            and augment.generator is not None
            and saved_rng is not None
            and not dist_info.distributed
        ):
            augment.generator.set_state(saved_rng)
        log(f"resumed from {args.resume}: phase {start_phase}, epoch {start_epoch}, step {step}, lr {lr:.2e}")
    elif args.lr_find or lr == "auto":
        freeze_backbone(net, args.freeze_epochs > 0)
        probe = wrap(net, dist_info, device, False)

        def train_batch(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return train_step(probe, criterion, optimizer, to_input(images, train=True), target.to(device), amp)

        result = lr_finder.run(probe, optimizer, train_loader, train_batch, args.lr_find_iters)
        plot_path = args.out / f"{name}_lr_find.html"
        if dist_info.is_main:
            lr_finder.plot(result, plot_path, f"LR range test: {args.arch}, {args.task}")
        log(f"LR range test: valley {result.valley:.2e}, steep {result.steep:.2e} (plot: {plot_path})")
        if args.lr_find:
            return {"lr_find": {"valley": result.valley, "steep": result.steep, "plot": str(plot_path)}}
        lr = result.suggestion
    phases = plan_phases(args.epochs, args.freeze_epochs, lr)
    budgets = _budgets(phases, len(train_loader), args.max_steps)
    state_path = args.out / f"{name}.state.pt"

    log("  ".join(report.TABLE_COLUMNS))
    last = None
    started = time.perf_counter()
    train_seconds, images_seen = earlier["train_seconds"], earlier["images_seen"]
    epoch_index = sum(p.epochs for p in phases[:start_phase]) + start_epoch
    for phase_index in range(start_phase, len(phases)):
        phase, budget = phases[phase_index], budgets[phase_index]
        if budget <= 0:
            break
        freeze_backbone(net, phase.frozen)
        model = wrap(net, dist_info, device, args.compile)
        scheduler = one_cycle(optimizer, phase.lr, budget, phase.pct_start)
        first = 0
        if resume_state and phase_index == start_phase:
            planned = scheduler.total_steps
            scheduler.load_state_dict(resume_state["scheduler"])
            if scheduler.total_steps != planned:
                raise SystemExit(
                    "--resume needs the interrupted run's --epochs, --freeze-epochs, --batch-size and --max-steps"
                )
            first = start_epoch
        for epoch in range(first, phase.epochs):
            if scheduler.last_epoch >= budget:
                break
            epoch_start = time.perf_counter()
            train_loader.set_epoch(epoch_index)
            stats = train_one_epoch(
                model, criterion, optimizer, scheduler, train_loader, to_input, epoch_index,
                max_steps=budget - scheduler.last_epoch, amp=amp, print_freq=args.print_freq, log=log,
            )  # fmt: skip
            step += stats["steps"]
            train_seconds += stats["seconds"]
            images_seen += stats["images"]
            last = validate(model)
            summary = summarize(last[1], last[2], classes)
            seconds = time.perf_counter() - epoch_start
            log(report.table_row(epoch_index, stats, last[0], summary, seconds))
            log(report.auc_line(summary))
            history.append(
                {"epoch": epoch_index, "phase": phase.name, "train_loss": stats["loss"], "valid_loss": last[0],
                 "images_per_second": stats["images_per_second"], "seconds": seconds}
                | {k: summary[k] for k in ("accuracy", "error_rate", "accuracy_multi", "weighted_log_loss", "mean_auc")}
            )  # fmt: skip
            epoch_index += 1
            if dist_info.is_main:  # written then renamed: an interrupted save keeps the previous state
                snapshot: dict[str, Any] = {
                    "model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "phase": phase_index, "epoch": epoch + 1, "step": step, "lr": lr, "history": history,
                    "train_seconds": train_seconds, "images_seen": images_seen,
                    "wall_seconds": earlier["wall_seconds"] + time.perf_counter() - started,
                    "augment_rng": augment.generator.get_state() if augment and augment.generator else None}  # fmt: skip
                atomic_write(state_path, partial(torch.save, snapshot))

    if last is None:  # nothing left to train (a finished run resumed, or --max-steps 0): still report
        last = validate(net)
    valid_loss, y_true, y_prob, valid_rows = last
    thresholds = (
        youden_thresholds(y_true, y_prob) if args.thresholds == "youden" else np.full(len(classes), DEFAULT_THRESHOLD)
    )
    metrics = summarize(y_true, y_prob, classes, thresholds) | {"valid_loss": valid_loss}
    metadata = report.checkpoint_metadata(
        args, cache, split, classes, y, name=name, lr=lr, world_size=dist_info.world_size, augment=augment, amp=amp,
        device=device, steps=step, train_seconds=train_seconds,
        wall_seconds=earlier["wall_seconds"] + time.perf_counter() - started,
        images_seen=images_seen, thresholds=thresholds, metrics=metrics, history=history,
    )  # fmt: skip
    if dist_info.is_main:
        weights, meta_path = checkpoint.save(net, args.out / name, metadata)
        report.write_valid(args.out / f"{name}.valid.parquet", cache.frame, valid_rows, y_prob, classes)
        log(f"saved {weights} and {meta_path}")
    return metadata


def main(argv: Sequence[str] | None = None) -> dict:
    """Train as ``argv`` says; returns the checkpoint metadata (``{"lr_find": ...}`` with ``--lr-find``)."""
    args = get_args_parser().parse_args(argv)
    dist_info, device = init_distributed(args.device)
    try:
        return _train(args, dist_info, device)
    finally:
        if dist_info.distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
