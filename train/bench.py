"""Training throughput in images per second, with and without data loading.

    python -m train.bench [--archs resnet18,densenet121] [--devices cpu,cuda] [--cache CACHE]

For each device and architecture it times :func:`train.fit.train_one_epoch` (augmentation,
forward, backward, AdamW step; bf16 + channels_last on CUDA) fed

- ``model``: one uint8 batch already on the device (the network's ceiling),
- ``end to end``: batches from a cache through :class:`train.data.BatchLoader`,

and ``loader`` alone (read, pin, copy, normalise) per device. Without ``--cache`` a synthetic
cache is written to a temporary folder; either way it is read hot from the page cache.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from ich.models import ModelInput, build_model
from train.data import BatchLoader, BatchReader, Cache, build_augment, synthetic_cache, targets
from train.distributed import resolve_device
from train.fit import train_one_epoch

__all__ = ["bench_model", "bench_loader", "bench_end_to_end", "get_args_parser", "main"]


def _loader(cache: Cache, batch_size: int, workers: int, device: torch.device) -> BatchLoader:
    reader = BatchReader(cache.images_path, np.arange(len(cache.frame)), targets(cache.frame, ("any",)))
    return BatchLoader(reader, batch_size, True, drop_last=True, workers=workers, pin_memory=device.type == "cuda")


def _timed_training(
    arch: str, device: torch.device, batches: Iterator, steps: int, warmup: int, compile_model: bool
) -> float:
    cuda = device.type == "cuda"
    net = build_model(arch, 1).to(device)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    model = cast(nn.Module, torch.compile(net)) if compile_model else net
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    to_input = ModelInput(device, augment=build_augment(), channels_last=cuda)
    loss = nn.BCEWithLogitsLoss()

    def quiet(*_: object) -> None:
        pass

    train_one_epoch(model, loss, optimizer, None, batches, to_input, 0, max_steps=warmup, amp=cuda, log=quiet)
    stats = train_one_epoch(model, loss, optimizer, None, batches, to_input, 1, max_steps=steps, amp=cuda, log=quiet)
    return stats["images_per_second"]


def bench_model(
    arch: str,
    device: torch.device,
    batch_size: int,
    size: int,
    steps: int,
    warmup: int = 2,
    compile_model: bool = False,
) -> float:
    """img/s training on one resident synthetic batch (no data loading)."""
    images = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, device=device)
    target = torch.randint(0, 2, (batch_size, 1), device=device).float()
    batch = (images, target, torch.arange(batch_size))
    return _timed_training(arch, device, iter(lambda: batch, None), steps, warmup, compile_model)


def bench_end_to_end(
    arch: str,
    cache: Cache,
    device: torch.device,
    batch_size: int,
    steps: int,
    warmup: int = 2,
    workers: int = 4,
    compile_model: bool = False,
) -> float:
    """img/s training on batches loaded from ``cache``."""
    return _timed_training(
        arch, device, _loader(cache, batch_size, workers, device).forever(), steps, warmup, compile_model
    )


def bench_loader(cache: Cache, device: torch.device, batch_size: int, steps: int, workers: int = 4) -> float:
    """img/s of loading alone: memmap read -> (pinned) uint8 -> device -> normalised float."""
    batches = _loader(cache, batch_size, workers, device).forever()
    to_input = ModelInput(device, channels_last=device.type == "cuda")
    next(batches)  # workers started
    start = time.perf_counter()
    for _ in range(steps):
        x = to_input(next(batches)[0])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * x.shape[0] / (time.perf_counter() - start)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Training throughput (img/s)", add_help=add_help)
    p.add_argument("--archs", default="resnet18,densenet121")
    p.add_argument("--devices", default="auto", help="comma-separated cpu,cuda; auto = cpu plus cuda when present")
    p.add_argument("--cache", type=Path, default=None, help="a prepared cache (default: a synthetic one)")
    p.add_argument("--size", type=int, default=256, help="image side for the model-only and synthetic runs")
    p.add_argument("--batch-size", type=int, default=None, help="default 256 on CUDA, 16 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 50 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--compile", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    names = (
        ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" else args.devices.split(",")
    )
    results: list[dict] = []

    def report(arch: str, device: torch.device, mode: str, batch: int, size: int, rate: float) -> None:
        results.append({"arch": arch, "device": str(device), "mode": mode, "batch": batch, "size": size, "img/s": rate})
        print(f"{arch:>16}  {device!s:>6}  {mode:>10}  batch {batch:>4}  {size}px  {rate:9.1f} img/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for device in map(resolve_device, names):
            cuda = device.type == "cuda"
            batch = args.batch_size or (256 if cuda else 16)
            steps = args.steps or (50 if cuda else 3)
            cache = (
                Cache.open(args.cache)
                if args.cache
                else synthetic_cache(Path(tmp) / device.type, n=batch * 8, size=args.size)
            )
            size = cache.size
            report(
                "(loading only)",
                device,
                "loader",
                batch,
                size,
                bench_loader(cache, device, batch, steps * 4, args.workers),
            )
            for arch in args.archs.split(","):
                rate = bench_model(arch, device, batch, size, steps, args.warmup, args.compile)
                report(arch, device, "model", batch, size, rate)
                rate = bench_end_to_end(arch, cache, device, batch, steps, args.warmup, args.workers, args.compile)
                report(arch, device, "end to end", batch, size, rate)
    print("\n| arch | device | mode | batch | size | img/s |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['arch']} | {r['device']} | {r['mode']} | {r['batch']} | {r['size']} | {r['img/s']:.1f} |")
    return results


if __name__ == "__main__":
    main()
