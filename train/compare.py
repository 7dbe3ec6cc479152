"""Train several architectures on the same patient split and tabulate them (the paper's comparison).

    python -m train.compare --archs resnet18,resnet50,resnet101,densenet121,alexnet \\
        --out runs/compare -- --data CACHE --task multilabel --bleed-only --epochs 5

Everything after the compare options is passed to :mod:`train.fit` unchanged (the ``--`` is
optional), with ``--arch`` and ``--out`` set per run; the same ``--seed`` gives every architecture
the same split. Writes ``<out>/compare.md`` and prints it.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

from ich.models import ARCHITECTURES
from train import fit

__all__ = ["COLUMNS", "markdown_table", "get_args_parser", "main"]

COLUMNS = (
    "architecture",
    "accuracy",
    "accuracy_multi",
    "mean AUC",
    "weighted log loss",
    "valid loss",
    "train time",
    "img/s",
)


def _row(meta: dict) -> list[str]:
    m, t = meta["metrics"], meta["training"]
    return [
        meta["arch"],
        f"{m['accuracy']:.4f}",
        f"{m['accuracy_multi']:.4f}",
        "n/a" if m["mean_auc"] != m["mean_auc"] else f"{m['mean_auc']:.4f}",  # NaN when no class varies
        f"{m['weighted_log_loss']:.4f}",
        f"{m['valid_loss']:.4f}",
        time.strftime("%H:%M:%S", time.gmtime(t["train_seconds"])),
        f"{t['images_per_second']:.0f}",
    ]


def markdown_table(results: Sequence[dict]) -> str:
    """A markdown table of checkpoint metadata as :func:`train.fit.main` returns it."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_row(meta)) + " |" for meta in results]
    return "\n".join(lines) + "\n"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Compare architectures on one split; other options go to train.fit", add_help=add_help
    )
    parser.add_argument("--archs", default="resnet18,resnet50,resnet101,densenet121,alexnet", help="comma-separated")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    args, fit_args = get_args_parser().parse_known_args(argv)
    fit_args = [a for a in fit_args if a != "--"]
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = sorted(set(archs) - set(ARCHITECTURES))
    if unknown:
        raise SystemExit(f"unknown architectures {unknown}; choose from {', '.join(ARCHITECTURES)}")
    results = []
    for arch in archs:
        print(f"=== {arch}")
        results.append(fit.main([*fit_args, "--arch", arch, "--out", str(args.out)]))
    table = markdown_table(results)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one process writes
        title = f"# {results[0]['task']} task, {results[0]['training']['valid_slices']} validation slices\n\n"
        (args.out / "compare.md").write_text(title + table)
        print(table)
    return table


if __name__ == "__main__":
    main()
