"""``python -m ich <command>``: the command-line entry points.

Each command imports what it needs when it runs, so ``ich info`` stays free of torch.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_NOTHING_USABLE = 2


def _info(args: argparse.Namespace) -> int:
    from ich import dicom

    result = dicom.load(args.paths, pixels=False)
    if args.json:
        print(
            json.dumps(
                {
                    "series": [s.summary() for s in result.series],
                    "problems": [{"path": p.path, "reason": p.reason} for p in result.problems],
                },
                indent=2,
            )
        )
    else:
        for s in result.series:
            info = s.summary()
            spacing = "?" if info["spacing"] is None else f"{info['spacing']:.2f} mm"
            print(f"study {info['study_uid']}  series {info['series_uid']}")
            print(
                f"  {info['modality']}  {info['slices']} slices  {info['rows']}x{info['columns']}  "
                f"spacing {spacing}  thickness {info['thickness']}  bits {info['bits_stored']}  "
                f"ordered by {info['ordered_by']}"
            )
            for note in info["notes"]:
                print(f"  note: {note}")
        if result.problems:
            print(f"{len(result.problems)} problem(s):", file=sys.stderr)
            for p in result.problems:
                print(f"  {p}", file=sys.stderr)
        print(f"{len(result.series)} series, {sum(len(s) for s in result.series)} slices, {len(result.problems)} problem(s)")
    return EXIT_OK if result.series else EXIT_NOTHING_USABLE


def _phantom(args: argparse.Namespace) -> int:
    from ich import phantom

    frame = phantom.write_dataset(
        Path(args.out),
        args.studies,
        args.seed,
        thickness=args.thickness,
        bits=args.bits,
        jpeg=args.jpeg,
        masks=args.masks,
    )
    positives = int(frame.groupby("study_uid")["any"].max().sum())
    print(f"wrote {frame['study_uid'].nunique()} studies ({positives} with hemorrhage), {len(frame)} slices to {args.out}")
    return EXIT_OK


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ich", description="Intracranial hemorrhage triage on head CT (not a medical device).")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="list the series found in files, folders or zips, and every problem")
    info.add_argument("paths", nargs="+", help="DICOM files, folders (recursive) or .zip archives")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_info)

    ph = sub.add_parser("phantom", help="write synthetic head-CT studies in the RSNA layout")
    ph.add_argument("--studies", type=int, default=10)
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--out", required=True)
    ph.add_argument("--thickness", type=float, default=5.0, help="slice thickness and spacing in mm")
    ph.add_argument("--bits", choices=["mixed", "12", "16", "wrapped"], default="mixed", help="pixel storage")
    ph.add_argument("--jpeg", action="store_true", help="write a lossless JPEG transfer syntax")
    ph.add_argument("--masks", action="store_true", help="also write hemorrhage pixel masks")
    ph.set_defaults(func=_phantom)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    return args.func(args)
