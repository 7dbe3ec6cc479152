"""Build the checkpoint bundled in ``weights/`` and its model card, in one command.

    python -m train.bundle                      # defaults below; about 30 min on a 2-core CPU
    python -m train.bundle --studies 400 --epochs 20 --size 256 --device cuda   # a GPU budget

1. Synthetic studies from :mod:`ich.phantom`: a training set and a separate test set (other seeds).
2. Stage 1: ``train.fit`` (multilabel resnet18 from scratch, validation split by patient) on the
   phantoms plus the real labelled slices beside the project (``../shared/data``) that are not
   RSNA series: PhysioNet CT-ICH (26 bleed slices, 8 epidural), the 5 RSNA single samples and every
   4th slice of the CQ500 no-bleed thin series. Real files are linked, never copied, into
   RSNA-layout work folders outside git.
3. Stage 2 (when the real data is there): fine-tune on those slices, the 7 real series of
   ``rsna-sample`` and a few more phantoms. Leave-one-series-out gives the real-data estimate:
   each series is scored by a model fine-tuned without it. The bundled model uses all seven.
4. Evaluation on the held-out phantoms and the leave-one-series-out predictions goes into
   ``weights/MODEL_CARD.md`` and ``weights/evaluation.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ich import dicom, evaluate, phantom
from ich.checkpoint import json_ready
from ich.inference import STUDY_AGGREGATION, Predictor
from ich.labels import CLASSES, INDEX_NAME, read_rsna_csv, write_rsna_csv
from train import fit

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
NAME = "ich-resnet18-multilabel"
# CQ500-CT-0 is 238 thin no-bleed slices; every 4th keeps it from swamping the 31 real bleeds.
CQ500_STRIDE = 4


def _link_layout(folder: Path, files: dict[str, Path], labels: pd.DataFrame) -> Path:
    """An RSNA-layout folder of symbolic links (``<sop>.dcm``) plus ``stage_2_train.csv``."""
    images = folder / "stage_2_train"
    if folder.exists():
        shutil.rmtree(folder)
    images.mkdir(parents=True)
    for sop, path in files.items():
        (images / f"{sop}.dcm").symlink_to(path.resolve())
    write_rsna_csv(labels.loc[list(files)], folder / "stage_2_train.csv")
    return folder


def real_training_slices(shared: Path) -> tuple[dict[str, Path], pd.DataFrame]:
    """Real slices with per-slice labels, none from the rsna-sample test series."""
    files: dict[str, Path] = {}
    rows = []
    physionet = pd.read_csv(shared / "physionet-ctich/labels_raw_ct_numbering.csv", dtype={"file": str})
    names = {"Epidural": "epidural", "Intraparenchymal": "intraparenchymal", "Intraventricular": "intraventricular",
             "Subarachnoid": "subarachnoid", "Subdural": "subdural"}
    for rec in physionet.itertuples(index=False):
        path = shared / "physionet-ctich/hemo_subset" / f"{rec.file}.dcm"
        sop = dicom.read_slice(path, pixels=False).sop_uid
        row = {c: int(getattr(rec, k)) for k, c in names.items()}
        files[sop] = path
        rows.append({INDEX_NAME: sop, **row})
    samples = pd.read_csv(shared / "rsna-5-samples/labels_from_filenames.csv")
    for rec in samples.to_dict(orient="records"):
        files[rec["img"]] = shared / "rsna-5-samples" / rec["file"]
        rows.append({INDEX_NAME: rec["img"], **{c: int(rec[c]) for c in CLASSES[1:]}})
    cq = dicom.load(shared / "cq500/CQ500-CT-0", pixels=False).series[0]
    for s in cq.slices[::CQ500_STRIDE]:
        files[s.sop_uid] = Path(s.path)
        rows.append({INDEX_NAME: s.sop_uid, **{c: 0 for c in CLASSES[1:]}})
    labels = pd.DataFrame(rows).set_index(INDEX_NAME)
    labels.insert(0, "any", labels.max(axis=1))
    return files, labels[list(CLASSES)]


def merge_layouts(out: Path, folders: Sequence[Path]) -> Path:
    """One RSNA-layout folder linking every image of ``folders``, with their labels combined."""
    files: dict[str, Path] = {}
    labels = []
    for folder in folders:
        frame = read_rsna_csv(folder / "stage_2_train.csv")
        labels.append(frame)
        for sop in frame.index:
            files[sop] = (folder / "stage_2_train" / f"{sop}.dcm").resolve()
    return _link_layout(out, files, pd.concat(labels))


def _card(
    meta: dict, reports: dict[str, dict], data_summary: dict, have_real: bool, minutes: float, command: Sequence[str]
) -> str:
    """The model card's markdown; ``command`` is the ``train.bundle`` arguments it was made with."""
    lines = [
        "# Model card: bundled hemorrhage classifier",
        "",
        "**Not a medical device. Not for clinical use.** This model was trained on synthetic phantoms and a",
        "few dozen public slices on a 2-core CPU. Its numbers below come from tiny test sets and say how far",
        "it is from useful, not that it is useful.",
        "",
        "## What it is",
        f"- Architecture: `{meta['arch']}` from scratch (no ImageNet weights: none can be downloaded here), "
        f"task `{meta['task']}`, outputs (sigmoid) in order {', '.join(meta['classes'])}.",
        f"- Input: {meta['input_size']}x{meta['input_size']}, head cropped, 3 windows "
        + ", ".join(f"{n} {lv}/{w}" for n, lv, w in meta["windows"])
        + ", normalised with ImageNet mean/std.",
        "- Decision thresholds per class: " + ", ".join(f"{c} {t:.2f}" for c, t in meta["thresholds"].items())
        + f" ({meta.get('threshold_policy', 'fixed')}).",
        f"- Study score: {STUDY_AGGREGATION}.",
        f"- Weights: `weights/{NAME}.safetensors`, sha256 `{meta['sha256']}`.",
        "",
        "## How it was made",
        "```bash",
        "python -m train.bundle " + " ".join(command),
        "```",
        f"took {minutes:.0f} min here. Training data:",
        "",
    ]
    for key, value in data_summary.items():
        lines.append(f"- {key}: {value}")
    lines += ["", "## Results on data it never saw", ""]
    for title, report in reports.items():
        lines.append(evaluate.report_markdown(report, title).replace("# ", "### ", 1))
    if not have_real:
        lines.append("No real test series were available when this card was made (../shared/data absent).")
    lines += [
        "## Limits",
        "- Synthetic phantoms are not patients: good phantom numbers mean the model learned the generator's",
        "  hemorrhages, which resemble real ones only in HU, shape and place.",
        "- The real estimate is leave-one-series-out over 7 series (235 slices, 4 series with bleeds, no",
        "  epidural) from one public sample, scored by seven fold models rather than the bundled one:",
        "  confidence intervals on these numbers are very wide.",
        "- No real epidural slice is in any test set; PhysioNet's 8 are used for training.",
        "- Trained at low resolution on a CPU for minutes; the paper's models trained on 750k real slices.",
        "",
    ]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / ".ich-data" / "bundle", help="scratch folder (git-ignored)")
    p.add_argument("--out", type=Path, default=ROOT / "weights")
    p.add_argument("--shared", type=Path, default=SHARED, help="real data folder (optional)")
    p.add_argument("--studies", type=int, default=120, help="phantom training studies")
    p.add_argument("--test-studies", type=int, default=20, help="phantom test studies (other seeds)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", default="2e-3")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--mix-studies", type=int, default=30, help="phantom studies mixed into the real fine-tuning")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    return p


def _fit(args: argparse.Namespace, data: Path, name: str, extra: Sequence[str]) -> Path:
    """Train one model on an RSNA-layout folder; returns its checkpoint's JSON path."""
    fit.main(
        [
            "--data", str(data), "--cache", str(data.parent / f"cache-{name}"), "--size", str(args.size),
            "--min-brain", "0", "--arch", args.arch, "--task", "multilabel", "--batch-size", str(args.batch_size),
            "--device", args.device, "--workers", str(args.workers), "--out", str(args.work / "run"), "--name", name,
            "--print-freq", "0", "--seed", str(args.seed), *extra,
        ]
    )
    return args.work / "run" / f"{name}.json"


def rsna_series(shared: Path) -> dict[str, list[str]]:
    """SOPInstanceUIDs of each series of ``rsna-sample``, in slice order."""
    return {s.series_uid: s.sop_uids for s in dicom.load(shared / "rsna-sample", pixels=False).series}


def main(argv: Sequence[str] | None = None) -> int:
    command = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(command)
    start = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    train_frame = phantom.write_dataset(work / "phantom-train", args.studies, args.seed)
    phantom.write_dataset(work / "phantom-test", args.test_studies, args.seed + 10_000)
    folders = [work / "phantom-train"]
    summary = {
        "phantom (stage 1)": f"{train_frame['study_uid'].nunique()} studies, {len(train_frame)} slices, "
        f"{int(train_frame['any'].sum())} with hemorrhage (`ich.phantom`, seed {args.seed})",
    }
    have_real = (args.shared / "README.md").exists()
    if have_real:
        files, labels = real_training_slices(args.shared)
        folders.append(_link_layout(work / "real-train", files, labels))
        summary["real slices (stages 1 and 2)"] = (
            f"{len(files)} ({int(labels['any'].sum())} with hemorrhage): PhysioNet CT-ICH hemo_subset, "
            f"rsna-5-samples, every {CQ500_STRIDE}th slice of CQ500-CT-0"
        )
    lr = ["--lr", args.lr, "--epochs", str(args.epochs)]
    final = base = _fit(args, merge_layouts(work / "train", folders), "base", lr)
    reports: dict[str, dict] = {}
    if have_real:
        # Stage 2: fine-tune on the real RSNA series too (with some phantoms, so they are not
        # forgotten). Its real-data estimate comes from leave-one-series-out: each series is
        # scored by a model fine-tuned on the other six.
        mix = phantom.write_dataset(work / "phantom-mix", args.mix_studies, args.seed + 20_000)
        summary["phantom (stage 2)"] = f"{mix['study_uid'].nunique()} more studies, {len(mix)} slices (seed {args.seed + 20_000})"
        rsna_labels = read_rsna_csv(args.shared / "rsna-sample/stage_2_train.csv")
        series = rsna_series(args.shared)
        images = args.shared / "rsna-sample/stage_2_train"
        tune = ["--init", str(base), "--lr", str(args.finetune_lr), "--epochs", str(args.finetune_epochs)]
        frames = []
        for k, (held_out, sops) in enumerate(series.items()):
            others = {sop: images / f"{sop}.dcm" for uid, ss in series.items() if uid != held_out for sop in ss}
            rsna_folder = _link_layout(work / f"rsna-fold{k}", others, rsna_labels)
            fold = _fit(args, merge_layouts(work / f"fold{k}", [*folders[1:], work / "phantom-mix", rsna_folder]), f"fold{k}", tune)
            predictor = Predictor.from_checkpoint(fold, args.device)
            frames.append(evaluate.predict(predictor, [images / f"{sop}.dcm" for sop in sops]).frame)
        reports["Real: ../shared/data/rsna-sample, leave-one-series-out (7 RSNA 2019 series)"] = evaluate.evaluate(
            pd.concat(frames), rsna_labels, predictor.thresholds
        )
        everything = _link_layout(work / "rsna-all", {sop: images / f"{sop}.dcm" for ss in series.values() for sop in ss}, rsna_labels)
        final = _fit(args, merge_layouts(work / "final", [*folders[1:], work / "phantom-mix", everything]), NAME, tune)
        summary["real RSNA series (stage 2)"] = (
            "the 7 series of rsna-sample (235 slices); each fold model leaves one out, the bundled model uses all"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".json"):
        shutil.copy2(final.with_suffix(suffix), args.out / f"{NAME}{suffix}")
    predictor = Predictor.from_checkpoint(args.out / f"{NAME}.json", args.device)
    folder = work / "phantom-test"
    result = evaluate.predict(predictor, [folder])
    reports = {
        f"Held-out phantoms ({args.test_studies} studies, seed {args.seed + 10_000})": evaluate.evaluate(
            result.frame, evaluate.load_labels(folder), predictor.thresholds
        ),
        **reports,
    }
    minutes = (time.perf_counter() - start) / 60
    (args.out / "evaluation.json").write_text(json.dumps(json_ready(reports), indent=2, allow_nan=False) + "\n")
    (args.out / "MODEL_CARD.md").write_text(_card(predictor.metadata, reports, summary, have_real, minutes, command))
    print((args.out / "MODEL_CARD.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
