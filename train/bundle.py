"""Build the checkpoint bundled in ``weights/`` and its model card, in one command.

    python -m train.bundle                                   # the CPU recipe below (2-core CPU: see the card)
    python -m train.bundle --size 192 --epochs 40 --device cuda --jobs 6   # the GPU recipe (six runs at once)

1. Prepare: the three real training sets in ``../shared/data`` (``rsna-png``, ``phe-sich``,
   ``roboflow-ich``, read by :mod:`ich.datasets`) into one cache with the brain-window input
   (:data:`ich.windowing.BRAIN_INPUT`).
2. Cross-validation: 5 fold models with the recipe, each validated on one fifth of ``rsna-png``
   (its slices are a random draw from ~20,000 series, so folds are nearly patient-disjoint);
   ``phe-sich`` and ``roboflow-ich`` always train. Their validation predictions are the
   out-of-fold (OOF) predictions for every ``rsna-png`` slice.
3. The bundled model: the same recipe on all 5,498 slices.
4. Calibration (:mod:`ich.calibration`) from the OOF predictions; the study rule, flag threshold and
   subtype thresholds from the real complete series in ``--shared`` (:mod:`train.series_policy`), where
   it has them, else from the OOF predictions and simulated series.
5. External checks it never trained on, through the product's own DICOM path: ``rsna-sample``
   (7 series), ``cq500`` (2 scans), ``physionet-ctich`` (26 bleed slices).
6. ``weights/``: the checkpoint, ``evaluation.json`` and ``MODEL_CARD.md``.

Each training run is skipped when its checkpoint already exists with the same arguments, so an
interrupted bundle resumes, and the card can be remade without retraining. ``--train-only`` stops
after the training runs (on a GPU machine, where ``../shared`` and its DICOM checks are absent:
``scripts/device_bundle.sh``); ``--checks-only`` reruns steps 5-6 for the checkpoint already in
``--out``, keeping its cross-validation (after the checks' code changed); ``--series-policy`` refits
step 4's real-series part and reruns 5-6 (needs no out-of-fold predictions).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torchvision

from ich import checkpoint, datasets, dicom, evaluate, explain, review
from ich.calibration import Platt, fit_platt, reliability
from ich.checkpoint import json_ready
from ich.files import data_dir
from ich.inference import Predictor, aggregation_text
from ich.labels import CLASSES, INDEX_NAME, NOT_NAMED, SUBTYPES, read_rsna_csv
from ich.metrics import bootstrap_auc, mcc_thresholds, rsna_weights, summarize, weighted_log_loss, wilson_interval
from ich.models import build_model, unwrap
from ich.windowing import BRAIN_INPUT
from train import fit, prepare, series_policy
from train.data import Cache
from train.operating_point import TARGET_SENSITIVITY, choose_series_rule

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
NAME = "ich-resnet18-brain"
TRAINING_SETS = ("rsna-png", "phe-sich", "roboflow-ich")
VALIDATION_SET = "rsna-png"
FOLDS = 5
OOF_FILE = "out-of-fold.parquet"  # in --out: the raw fold predictions the calibration and CV numbers come from
BUNDLE_RECORD = "bundle.json"  # in --work: the command, so a later stage can cite the one it continued
FAILURES_SHOWN = 5
POINTING_TOLERANCE_PX = 8  # the pointing game's usual slack: a peak this close to the mask still points at it
POINTING_LIMIT = 300  # PHE-SICH bleed slices checked (it has 676; the model trained on all of them)
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")  # Grad-CAM layers compared on physionet-series
# What a person saw looking at the worst cases of the run in weights/ (rewritten after each rebuild).
FAILURE_NOTES = Path(__file__).with_name("failure_notes.md")
PHYSIONET_SUBTYPES = {"Epidural": "epidural", "Intraparenchymal": "intraparenchymal", "Intraventricular": "intraventricular",
                      "Subarachnoid": "subarachnoid", "Subdural": "subdural"}  # fmt: skip


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _failure_lines(failures: dict) -> list[str]:
    lines = []
    for kind, rows in failures.items():
        lines.append(f"- {kind.replace('_', ' ')}: " + "; ".join(
            f"`{r[INDEX_NAME]}` {_f(r['score'], 2)}" + (f" ({', '.join(c for c in SUBTYPES if r.get(c) == 1)})" if r.get("any", 1) and any(r.get(c) == 1 for c in SUBTYPES) else "")
            for r in rows))  # fmt: skip
    return lines


def _commands(ev: dict) -> list[str]:
    """The bundle commands that made the model: the first stage, then each run that continued the one before."""
    earlier = ev.get("earlier_stages", [])
    lines = [
        (f"python -m train.bundle {' '.join(s['command'])}").rstrip()
        + f"  # stage {i}: {s['input_size']} px, {s['epochs']} epochs, peak lr {s['lr']}, {s['minutes']:.0f} min"
        for i, s in enumerate(earlier, 1)
    ]
    last = ("python -m train.bundle " + " ".join(ev["training"]["command"])).rstrip()
    return [*lines, last + (f"  # stage {len(earlier) + 1}: each run continued at a larger size" if earlier else "")]


def _stages_text(ev: dict) -> str:
    stages = len(ev.get("earlier_stages", [])) + 1
    return "" if stages == 1 else ", both stages" if stages == 2 else f", all {stages} stages"


def _lossy_text(lossy: dict | None) -> list[str]:
    if not lossy:
        return []
    return [
        f"Trained from a WebP pack of the cache (quality {lossy['webp_quality']}, mean error "
        f"{lossy['webp_mean_abs_error']} grey levels of 255 in the brain window; `python -m train.pack`), "
        "carried to the GPU machine; predictions here are on uncompressed slices."
    ]


def model_card(meta: dict, ev: dict, notes: str) -> str:
    """``weights/MODEL_CARD.md`` from the checkpoint JSON, ``evaluation.json`` and the reviewed failure notes."""
    cv, ext, tr = ev["cross_validation"], ev["external"], ev["training"]
    named = cv["subtypes_named"]
    rule = cv["series_rule"]
    real = ev.get("real_series")
    windows = ", ".join(f"{n} {lv:g}/{w:g}" for n, lv, w in meta["windows"])
    lines = [
        f"# Model card: {meta['name']}",
        "",
        "**Not a medical device. Not for clinical use.** A research model trained from scratch on 5,498 public",
        "slices on a 2-core CPU. Its numbers below are measured on data it never trained on; they are far from",
        "what a clinical product must show, and the real DICOM checks are tiny.",
        "",
        "## What it is",
        f"- `{meta['arch']}` from scratch (no ImageNet weights: none can be downloaded here), multilabel sigmoid outputs "
        f"in order {', '.join(meta['classes'])}.",
        f"- Input `{meta.get('input')}`: {meta['input_size']}x{meta['input_size']} px, HU clipped to the brain window and cropped "
        f"to the head, channels {windows} (the one brain window, repeated), ImageNet mean/std. The fixed 40/80 window is used "
        "whatever a file's header says (RSNA files carry 30/80, 36/80 or 40/80; CQ500 carries 30/300).",
        f"- Test-time flip: {'yes (logits averaged with the mirror image)' if meta.get('tta_flip') else 'no'}.",
        "- Probabilities are calibrated per class (Platt scaling fitted on the out-of-fold predictions): "
        + ", ".join(
            f"{c} a={meta['calibration']['a'][c]:.3f} b={meta['calibration']['b'][c]:.3f}" for c in meta["classes"]
        )
        + ".",
        f"- Study score: {aggregation_text(meta['study_top_k'])}; a study is flagged at >= {meta['thresholds']['any']:.3f}.",
        "- Slice thresholds: "
        + ", ".join(f"{c} {t:.3f}" if t < NOT_NAMED else f"{c} not named" for c, t in meta["thresholds"].items())
        + f" ({meta['threshold_policy']}).",
        f"- Weights: `weights/{NAME}.safetensors`{' (stored in float16, loaded as float32)' if meta.get('weights_dtype') == 'float16' else ''}, sha256 `{meta['sha256']}`.",
        "",
        "## How it was made",
        "```bash",
        *_commands(ev),
        "```",
        f"The six training runs (5 folds + the final model{_stages_text(ev)}) took "
        f"{tr['minutes']:.0f} min on {tr['device']} ({tr['amp']}); the final model trained at "
        f"{tr['final_images_per_second']:.0f} img/s. Training data (never any DICOM series below):",
        "",
    ]
    for name, src in tr["sources"].items():
        lines.append(f"- `{name}`: {src['images']} slices, {src['with_hemorrhage']} with hemorrhage")
    lines += [
        "",
        f"Recipe: {meta['training']['epochs']} epochs one-cycle AdamW (peak lr {meta['training']['lr']}, batch "
        f"{meta['training']['batch_size']}), augmentation {meta['training']['augment']}, masked BCE (PHE-SICH gives "
        "bleed and intraparenchymal only: its other subtype labels are unknown and left out of the loss).",
        "The bundled model trained on all slices; five fold models with the same recipe give the out-of-fold numbers.",
        *_lossy_text(meta["training"].get("lossy_pack")),
        "",
        f"## Cross-validation on rsna-png ({cv['slices']} slices, 5 folds)",
        "",
        "Each fold model validated on one fifth of `rsna-png` and trained on the rest plus all of `phe-sich` and "
        "`roboflow-ich`. The slices are a random draw from about 20,000 RSNA series, so the folds are nearly, not "
        "strictly, patient-disjoint. Calibrated probabilities, bootstrap 95 % intervals (1,000 resamples):",
        "",
        *evaluate.slice_table(cv["slice"]),
        "",
        f"Epidural has {cv['slice']['per_class']['epidural']['positives']} positives here: its interval is wide and its "
        "sensitivity rests on a handful of slices.",
        "",
        f"Subtypes as a reader sees them: a subtype is named only on a slice called bleeding. Of the "
        f"{named['called']} out-of-fold slices called bleeding at the thresholds in the table, "
        + "; ".join(
            f"{c} is named on {named[c]['named']} ({named[c]['correct']} carry it; {named[c]['positives_called']} "
            f"{c} slices were called)"
            if cv["slice"]["per_class"][c]["threshold"] < NOT_NAMED
            else f"{c} is not named ({named[c]['positives_called']} {c} slices were called bleeding)"
            for c in SUBTYPES
        )
        + "."
        + (
            " These are the out-of-fold thresholds; the checkpoint's are chosen on real series (below)." if real else ""
        ),
        "",
        f"RSNA weighted log loss: {_f(cv['log_loss_raw'], 4)} raw, {_f(cv['log_loss_calibrated'], 4)} calibrated "
        "(calibration is fitted on these same predictions, so the second figure is optimistic by a little).",
        "",
        "Reliability of 'any' (calibrated): "
        + "; ".join(
            f"{r['low']:.1f}–{r['high']:.1f}: {r['n']} slices, predicted {r['predicted']:.2f}, observed {r['observed']:.2f}"
            for r in cv["reliability_calibrated"]
        )
        + ".",
        "",
        "## Operating point",
        "",
        f"`rsna-png` has no series, so series were simulated from the out-of-fold slices ({rule['simulated_series']} series, "
        "28–44 slices each, bleeding ones with as many bleed slices as a PHE-SICH patient has; slices drawn independently, "
        "which real series are not). Simulated series AUC by study score: "
        + ", ".join(f"top-{k} {_f(v)}" for k, v in rule["auc_by_k"].items())
        + f". Chosen: {aggregation_text(rule['top_k'])}, flag at >= {rule['threshold']:.3f} for simulated series "
        f"sensitivity {_f(rule['sensitivity'])} (target {rule['target_sensitivity']}) at specificity {_f(rule['specificity'])}."
        + (
            " On real series this missed its aim; the checkpoint's rule is chosen on them (next section)."
            if real
            else ""
        ),
        "",
        *(real_series_lines(real, ext.get("cq500")) if real else []),
        "## Real DICOM series it never saw",
        "",
    ]
    if "rsna-sample" in ext:
        r = ext["rsna-sample"]
        lines += [
            f"### rsna-sample: 7 RSNA 2019 series ({r['slice']['n']} slices), through `ich evaluate`",
            "",
            *(
                [
                    "The flag rule was fitted on these series among others: its cross-validated numbers are under "
                    '"Real series".',
                    "",
                ]
                if real
                else []
            ),
            *evaluate.slice_table(r["slice"]),
            "",
        ]
        se = r["series"]
        lines.append(
            f"Series: AUC {_f(se['per_class']['any']['auc'])}, sensitivity {_f(se['per_class']['any']['sensitivity'])}, "
            f"specificity {_f(se['per_class']['any']['specificity'])}. Scores: "
            + ", ".join(f"`{s['series_uid']}` {s['score']:.3f} ({'bleed' if s['truth'] else 'clear'})" for s in sorted(r["series_scores"], key=lambda s: -s["score"]))
            + "."
        )  # fmt: skip
        lines.append("")
    if "cq500" in ext:
        lines.append("### CQ500 (majority of 3 readers)")
        lines.append("")
        for s in ext["cq500"]["scans"]:
            truth = {1: "ICH", 0: "no ICH"}.get(s["truth"], "unknown")
            what = f"{s['slices']} slices" if s["slices"] > 1 else "1 slice: a single slice, not a series"
            lines.append(
                f"- `{s['scan']}` ({what}, {truth}): score {s['score']:.3f}, {'flagged' if s['flagged'] else 'not flagged'}"
                + (
                    f". A thin series: scored, as the worklist scores it, on its {s['slabs']} slabs of ~5 mm "
                    f"(`ich.slabs`, `Predictor.predict_series`); scored slice by slice ({s['slices']} slices) under "
                    f"the same rule it would be {s['score_per_slice']:.3f}, "
                    + ("also flagged" if s["score_per_slice"] >= meta["thresholds"]["any"] else "not flagged")
                    if "score_per_slice" in s
                    else ""
                )
                + "."
            )
        lines.append("")
    if "physionet-ctich" in ext:
        pc = ext["physionet-ctich"]["per_class"]
        lines.append(f"### PhysioNet CT-ICH ({pc['any']['slices']} bleed slices, MATLAB-exported DICOM)")
        lines.append("")
        lines.append(f"- any: {pc['any']['caught_as_any']} of {pc['any']['slices']} slices called bleeding")
        for c in SUBTYPES:
            m = pc[c]
            if m["slices"]:
                lines.append(
                    f"- {c}: {m['slices']} slices, {m['caught_as_subtype']} called {c}, {m['caught_as_any']} called bleeding"
                )
        lines.append("")
    if ev.get("heatmaps"):
        shown = ev["heatmaps"].get("physionet-series", {}).get("layer") or "layer2"
        lines += [
            "## Does the heatmap point at the bleed?",
            "",
            f"Grad-CAM of 'any' (ResNet `{shown}`), cleared over air. Pointing game: the map's peak on the masked "
            f"bleed, exactly or within {POINTING_TOLERANCE_PX} px; chance is the mask's share of the head.",
            "",
        ]
        for name, r in ev["heatmaps"].items():
            low, high = r["hit_ci"]
            seen = ", **trained on**: optimistic" if r["trained_on"] else ", never trained on"
            lines.append(
                f"- `{name}` ({r['slices']} bleed slices{seen}): peak on the bleed {r['hits']} of {r['slices']} "
                f"({_f(r['hit_rate'], 2)}, 95 % CI {_f(low, 2)}–{_f(high, 2)}), within {POINTING_TOLERANCE_PX} px "
                f"{r['hits_near']} ({_f(r['hit_rate_near'], 2)}); chance {_f(r['chance'], 3)}"
            )
        lines.append("")
        lines += layer_lines(ev["heatmaps"].get("physionet-series", {}), meta["input_size"])
    lines += [
        "## Known failure modes",
        "",
        "Out-of-fold (`rsna-png`), by calibrated 'any':",
        *_failure_lines(cv["failures"]),
    ]
    if "rsna-sample" in ext:
        lines += ["", "rsna-sample:", *_failure_lines(ext["rsna-sample"]["failures"])]
    lines += ["", notes.strip(), ""]
    lines += [
        "## Limits",
        "- Trained on brain-window images only: nothing outside 0–80 HU reaches the model (no bone window: fractures, "
        "and blood against bone, are seen only as the brain window shows them).",
        "- Trained at low resolution on a CPU for minutes; the RSNA 2019 winners trained on 750k slices at full size.",
        *(
            [f"- The flag rule is fitted on the {real['series']} real series it is measured on: the cross-validated "
             f"numbers are the honest ones, and they rest on {real['cross_validated']['all']['sensitivity']['n']} "
             "bleeding series (see their intervals).",
             "- Subtype thresholds are fitted on real slices dominated by one trauma hospital (PhysioNet); another "
             "population's mix of subtypes may need others."]
            if real
            else ["- The DICOM checks are 7 RSNA series, 2 CQ500 scans and 26 PhysioNet slices: their intervals are very wide.",
                  "- The operating point comes from simulated series; on real series clear slices with false positives "
                  "cluster (skull base, streaks), so real specificity may be lower."]
        ),
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def layer_lines(r: dict, size: int) -> list[str]:
    """The card's comparison of Grad-CAM layers on physionet-series (:func:`layer_comparison`), if measured."""
    layers, shown = r.get("layers"), r.get("layer")
    if not layers:
        return []
    stride = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
    lines = [
        f"Which layer: every ResNet stage on the same {r['slices']} bleed slices of `physionet-series` (never trained "
        f"on; chance {_f(r['chance'], 3)}), Wilson 95 % intervals:",
        "",
        f"| layer | map cells at {size} px | peak on the bleed | within {POINTING_TOLERANCE_PX} px |",
        "| --- | --- | --- | --- |",
    ]
    for name, m in layers.items():
        lines.append(
            f"| `{name}`{' (shown)' if name == shown else ''} | {size // stride[name]}x{size // stride[name]} | "
            f"{_rate_text({'hits': m['hits'], 'n': m['slices'], 'rate': m['hit_rate'], 'ci': m['hit_ci']})} | "
            f"{_rate_text({'hits': m['hits_near'], 'n': m['slices'], 'rate': m['hit_rate_near'], 'ci': m['near_ci']})} |"
        )
    best_exact = max(m["hits"] for m in layers.values())
    best_near = max(m["hits_near"] for m in layers.values())
    if shown and layers[shown]["hits"] == best_exact and layers[shown]["hits_near"] == best_near:
        verdict = (
            f"`{shown}`, the layer the viewer shows (`ich.explain.target_layer`), is best or tied on both counts here, "
            "so it stays; the intervals overlap and every layer misses the bleed on most slices."
        )
    else:
        better = [n for n, m in layers.items() if m["hits"] > layers[shown]["hits"] or m["hits_near"] > layers[shown]["hits_near"]] if shown else []  # fmt: skip
        verdict = (
            f"The viewer shows `{shown}` (`ich.explain.target_layer`); {', '.join(f'`{n}`' for n in better)} "
            "pointed better on some count here (see the intervals before changing it)."
        )
    return [*lines, "", verdict, ""]


def _rate_text(r: dict) -> str:
    low, high = r["ci"]
    return f"{r['hits']}/{r['n']} = {_f(r['rate'], 2)} ({_f(low, 2)}–{_f(high, 2)})" if r["n"] else "—"


def real_series_lines(rs: dict, cq500: dict | None = None) -> list[str]:
    """The card's "Real series" section from ``evaluation.json``'s ``real_series`` (:func:`train.series_policy.fit`)
    and, scored by its rule but not fitted on, the complete series of ``external["cq500"]``."""
    cv, prev = rs["cross_validated"], rs.get("previous")
    missed = [s for s in rs["scores"] if s["truth"] and not s["flagged_cross_validated"]]
    below, lowest = rs.get("threshold_between", [None, None])
    margin = (
        f" The threshold lies halfway between the lowest bleeding series score it must flag ({lowest:.4f}) and the "
        f"highest series score below that ({below:.4f}): the same series are flagged as at the highest such threshold, "
        f"but no series sits on it: a score must move by {(lowest - below) / 2:.4f} to flip a flag, where float noise "
        "(another inference engine, a GPU, float16) moves it by about 1e-7. The leave-one-patient-out refits use the "
        "same rule."
        if lowest is not None and below is not None
        else ""
    )
    series_rows = [s for s in (cq500 or {}).get("scans", []) if s["slices"] > 1 and s["truth"] is not None]
    series_rows_names = [s["scan"] for s in series_rows]
    single = [s["scan"] for s in (cq500 or {}).get("scans", []) if s["slices"] == 1]
    lines = [
        "## Real series",
        "",
        f"Rule (the dashboard's line, with how thin series count): **a study is flagged when the "
        f"{aggregation_text(rs['top_k'])} is at least {rs['threshold']:.3f}**, a thin series' ~5 mm slabs each counted "
        f"once. Chosen on {rs['series']} complete real series "
        f"({', '.join(rs['sets'])}; {rs['slices']} slices, every slice labelled): the `k` with the best series AUC "
        f"({', '.join(f'top-{k} {_f(v)}' for k, v in rs['auc_by_k'].items())}), then a threshold that flags at "
        f"least {rs['target_sensitivity']} of the bleeding series"
        + (
            f"; it replaces the {aggregation_text(prev['top_k'])} at >= {prev['threshold']:.3f}, chosen on simulated "
            "series (Operating point)."
            if prev
            else "."
        )
        + margin,
        "",
        "```bash",
        "python -m train.bundle --series-policy   # scores the real series in ../shared/data, refits, rewrites weights/",
        "```",
        "",
        "Cross-validated: each series is flagged by the rule refitted without its patient (one series per patient; "
        f"`k` chosen per fold: {', '.join(f'top-{k} in {n}' for k, n in rs['cross_validated_top_k'].items())}). "
        "Sensitivity and specificity with Wilson 95 % intervals, AUC of the chosen score with a bootstrap over series "
        "(its `k` was chosen on these series too)"
        + (
            f"; {', '.join(f'`{s}`' for s in series_rows_names)} (not used to fit) scored by the rule"
            if series_rows_names
            else ""
        )
        + ":",
        "",
        "| series set | series (bleeding) | sensitivity | specificity | AUC (95 % CI) |"
        + (" previous rule: sensitivity | specificity |" if prev else ""),
        "| --- | --- | --- | --- | --- |" + (" --- | --- |" if prev else ""),
    ]
    for name, m in cv.items():
        low, high = m["auc_ci"]
        row = (
            f"| {name} | {m['series']} ({m['sensitivity']['n']}) | {_rate_text(m['sensitivity'])} | "
            f"{_rate_text(m['specificity'])} | {_f(m['auc'])} ({_f(low)}–{_f(high)}) |"
        )
        if prev:
            p = prev["table"][name]
            row += f" {_rate_text(p['sensitivity'])} | {_rate_text(p['specificity'])} |"
        lines.append(row)
    for s in series_rows:
        bleed, caught = bool(s["truth"]), bool(s["flagged"]) == bool(s["truth"])
        rate = {"hits": int(caught), "n": 1, "rate": float(caught), "ci": list(wilson_interval(int(caught), 1))}
        lines.append(
            f"| cq500 `{s['scan']}` (scored, not fitted on; score {s['score']:.3f}) | 1 ({int(bleed)}) | "
            f"{_rate_text(rate) if bleed else '—'} | {'—' if bleed else _rate_text(rate)} | n/a |"
            + (" — | — |" if prev else "")
        )
    fitted = rs["in_sample"]["all"]
    pooled = cv["all"]["sensitivity"]
    under = [
        f"`{name}` alone is {_rate_text(m['sensitivity'])} cross-validated, under it"
        for name, m in cv.items()
        if name != "all" and m["sensitivity"]["n"] and m["sensitivity"]["rate"] < rs["target_sensitivity"]
    ]
    boot = pooled.get("ci_bootstrap")
    lines += [
        "",
        *(
            [
                f"CQ500: {', '.join(f'`{s}`' for s in single)} is a single slice, not a series: not in this table "
                "(listed under CQ500 below).",
                "",
            ]
            if single
            else []
        ),
        f"Per set: the {rs['target_sensitivity']} sensitivity aim "
        + (
            f"holds only on the pooled {cv['all']['series']} series ({_rate_text(pooled)}, and even there the "
            f"interval's lower bound is {_f(pooled['ci'][0], 2)}); " + "; ".join(under) + "."
            if under and pooled["rate"] >= rs["target_sensitivity"]
            else f"{'is met' if pooled['rate'] >= rs['target_sensitivity'] else 'is missed'} on the pooled "
            f"{cv['all']['series']} series ({_rate_text(pooled)})" + ("; " + "; ".join(under) if under else "") + "."
        ),
        "",
        *(
            [
                f"Why Wilson and not a bootstrap over series for sensitivity and specificity: a percentile bootstrap of "
                f"{pooled['hits']}/{pooled['n']} gives {_f(boot[0], 2)}–{_f(boot[1], 2)} (Wilson {_f(pooled['ci'][0], 2)}–"
                f"{_f(pooled['ci'][1], 2)}): no resample catches more than all of them, so its upper bound collapses to 1.00 "
                f"when all or nearly all are caught, and at {pooled['n']} series it is narrower than the data support.",
                "",
            ]
            if boot and boot[0] is not None
            else []
        ),
        f"In-sample (the rule on the series it was fitted on): sensitivity {_rate_text(fitted['sensitivity'])}, "
        f"specificity {_rate_text(fitted['specificity'])}. Bleeding series the cross-validated flag missed: "
        + (", ".join(f"`{s['series']}` (score {s['score']:.3f})" for s in missed) or "none")
        + ". CQ500 (not used to fit) is listed below with this rule.",
        "",
        "Subtypes, as a reader sees them: a subtype is named only on a slice called bleeding (its 'any' at or above the "
        f"flag threshold), at or above its threshold, which is the Matthews-best cut on the real bleeding slices but never "
        f"below {series_policy.NAMING_FLOOR:.0%} (a probability a reader would call negligible), and a subtype is not "
        "named at all where, at every such cut, most slices it would be named on do not carry it. Cross-validated by "
        "patient (thresholds refitted without the slice's patient):",
        "",
        "| subtype | threshold | named on slices carrying it | on other bleeding slices | on clear slices |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c, m in rs["naming_cross_validated"].items():
        t = rs["thresholds"][c]
        lines.append(
            f"| {c} | {f'{t:.3f}' if t < NOT_NAMED else 'not named'} | {_rate_text(m['carries'])} | "
            f"{_rate_text(m['other_bleeds'])} | {_rate_text(m['clear'])} |"
        )
    lines.append("")
    return lines


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--work", type=Path, default=data_dir() / "bundle", help="scratch folder (default $ICH_DATA_DIR/bundle)"
    )
    p.add_argument("--out", type=Path, default=ROOT / "weights")
    p.add_argument("--shared", type=Path, default=SHARED, help="folder holding the training sets and the DICOM checks")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="a finished training cache to use instead of preparing --shared (see train.pack)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", default="2e-3")
    p.add_argument("--zoom", type=float, default=1.15, help="max zoom-in of the augmentation")
    p.add_argument(
        "--init-run",
        type=Path,
        default=None,
        help="start each run from the same-named run of an earlier bundle (e.g. .ich-data/bundle/run): progressive "
        "resizing; fold k continues fold k, so its validation fifth stays unseen",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--jobs", type=int, default=1, help="training runs at once, each in its own process (GPU)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="stop each training run after this many steps (smoke runs)"
    )
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--train-only", action="store_true", help="train (or reuse) the runs in --work/run, then stop")
    stop.add_argument(
        "--checks-only",
        action="store_true",
        help="rerun the external and heatmap checks for the checkpoint in --out and rewrite its evaluation.json and card",
    )
    stop.add_argument(
        "--recalibrate",
        action="store_true",
        help=f"refit calibration, thresholds and the study rule on --out/{OOF_FILE} (the policy changed, the "
        "model did not), then rerun the checks",
    )
    stop.add_argument(
        "--series-policy",
        action="store_true",
        help="refit the study rule, flag and subtype thresholds on the real series in --shared (train.series_policy), "
        "keeping the calibration, then rerun the checks",
    )
    return p


def _fit_args(args: argparse.Namespace, cache: Path, name: str, split: Sequence[str]) -> list[str]:
    return [
        "--data", str(cache), "--arch", args.arch, "--task", "multilabel", "--min-brain", "0",
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", args.lr, "--aug-zoom", str(args.zoom),
        "--device", args.device, "--workers", str(args.workers), "--seed", str(args.seed), "--tta-flip",
        "--out", str(args.work / "run"), "--name", name, "--print-freq", "0", *split,
        *(["--max-steps", str(args.max_steps)] if args.max_steps is not None else []),
        *(["--init", str(args.init_run / f"{name}.safetensors")] if args.init_run is not None else []),
    ]  # fmt: skip


# Where and on what a run happened, not what it learned: a run made elsewhere (a GPU machine) is reused.
_PLACE_OPTIONS = ("--data", "--out", "--device", "--workers")


def _recipe(fit_args: Sequence[str]) -> list[str]:
    """``fit_args`` without the values of :data:`_PLACE_OPTIONS`."""
    return [a for i, a in enumerate(fit_args) if not (i and fit_args[i - 1] in _PLACE_OPTIONS)]


def _reusable(fit_args: list[str], run: Path, name: str) -> bool:
    """``run/<name>`` already holds a checkpoint made with the same recipe (:func:`_recipe`)."""
    record, done = run / f"{name}.args.json", run / f"{name}.json"
    return done.is_file() and record.is_file() and _recipe(json.loads(record.read_text())) == _recipe(fit_args)


def _fit(fit_args: list[str], run: Path, name: str, in_process: bool = True) -> Path:
    """Train ``run/<name>`` unless it is :func:`_reusable`; in this process, or in a child (``train.fit``'s CLI).

    A run of the same recipe that was interrupted (its ``<name>.state.pt`` is written after every
    epoch) continues where it stopped: on a 2-core CPU one run is 10-25 minutes.
    """
    done = run / f"{name}.json"
    if _reusable(fit_args, run, name):
        print(f"{name}: reusing {done}")
        return done
    record, started, state = (run / f"{name}.{suffix}" for suffix in ("args.json", "started.json", "state.pt"))
    record.unlink(missing_ok=True)
    resume = state.is_file() and started.is_file() and _recipe(json.loads(started.read_text())) == _recipe(fit_args)
    if resume:
        print(f"{name}: resuming the interrupted run in {state}")
    else:
        state.unlink(missing_ok=True)
    started.write_text(json.dumps(fit_args) + "\n")
    argv = [*fit_args, *(["--resume", str(state)] if resume else [])]
    if in_process:
        fit.main(argv)
    else:
        log = run / f"{name}.log"
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # train/ from any cwd
        with log.open("a" if resume else "w") as out:
            child = subprocess.run(
                [sys.executable, "-m", "train.fit", *argv],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=os.environ | {"PYTHONPATH": path},
            )
        if child.returncode:
            raise SystemExit(f"{name}: train.fit failed (exit {child.returncode}); see {log}")
        print(f"{name}: done ({log})")
    record.write_text(json.dumps(fit_args) + "\n")
    return done


def train_models(args: argparse.Namespace) -> tuple[Cache, Path, list[Path]]:
    """``(cache, final checkpoint, fold checkpoints)``: the cache, the CV folds and the model on all data.

    ``--cache`` names a finished cache (e.g. unpacked by :mod:`train.pack` on a GPU machine that
    has no ``../shared``); otherwise the training sets are prepared from ``--shared``. ``--jobs N``
    trains N runs at once, each in its own process: one small run leaves a big GPU mostly idle.
    """
    if args.cache is not None:
        cache = Cache.open(args.cache)
        if cache.size != args.size or cache.info.get("input") != BRAIN_INPUT.name:
            raise SystemExit(
                f"--cache {args.cache} holds {cache.info.get('input')} at {cache.size} px; this recipe needs {BRAIN_INPUT.name} at {args.size}"
            )
    else:
        missing = [s for s in TRAINING_SETS if not (args.shared / s).is_dir()]
        if missing:
            raise SystemExit(
                f"training sets not found in {args.shared}: {', '.join(missing)} (see ../shared/data/README.md)"
            )
        folders = [args.shared / s for s in TRAINING_SETS]
        path = args.work / f"cache-{BRAIN_INPUT.name}-{args.size}"
        cache = prepare.prepare(folders, path, size=args.size, spec=BRAIN_INPUT, min_brain=0.0, workers=args.workers)
    run = args.work / "run"
    run.mkdir(parents=True, exist_ok=True)
    # Folds first: fold 0's validation says whether the recipe is worth the other runs (hours on a CPU),
    # and the final model is no use without the out-of-fold predictions.
    splits = {
        f"fold{k}": ["--val-sources", VALIDATION_SET, "--folds", str(FOLDS), "--fold", str(k)] for k in range(FOLDS)
    } | {"final": ["--val-frac", "0"]}
    runs = {name: _fit_args(args, cache.root, name, split) for name, split in splits.items()}
    if args.jobs > 1:
        with ThreadPoolExecutor(args.jobs) as pool:
            done = list(pool.map(lambda name: _fit(runs[name], run, name, in_process=False), runs))
    else:
        done = [_fit(fit_args, run, name) for name, fit_args in runs.items()]
    return cache, done[-1], done[:-1]


def out_of_fold(folds: Sequence[Path]) -> pd.DataFrame:
    """Every fold's validation predictions (``p_<class>``, raw) with their labels, one row per slice."""
    frame = pd.concat(
        [pd.read_parquet(f.with_suffix("").with_suffix(".valid.parquet")) for f in folds], ignore_index=True
    )
    if frame["row"].duplicated().any():
        raise SystemExit("a slice was validated by two folds: the fold checkpoints belong to different splits")
    return frame


def bleed_counts(frame: pd.DataFrame) -> list[int]:
    """Hematoma slices per PHE-SICH patient (cache or manifest rows): how many slices of a bleeding series show the bleed."""
    phe = frame[frame["source"] == "phe-sich"]
    if phe.empty:
        raise SystemExit("no phe-sich rows: the series simulation takes its bleed-slice counts from PHE-SICH patients")
    counts = phe.groupby("patient_id")["any"].sum()
    return sorted(int(c) for c in counts if c > 0)


def subtypes_named(y: np.ndarray, prob: np.ndarray, thresholds: dict[str, float]) -> dict:
    """How the shipped thresholds name subtypes on the slices they call bleeding, as a reader sees them.

    Per subtype: slices naming it (:func:`ich.review.calls`), of those the ones that carry it, and
    the subtype's slices called bleeding.
    """
    named = review.calls(prob, thresholds)
    called = named[:, 0]
    out: dict = {"called": int(called.sum())}
    for i, c in enumerate(SUBTYPES, 1):
        carries = y[:, i] > 0.5
        out[c] = {
            "named": int(named[:, i].sum()),
            "correct": int((named[:, i] & carries).sum()),
            "positives_called": int((carries & called).sum()),
        }
    return out


def naming_thresholds(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Subtype thresholds from the out-of-fold bleeding slices (``SUBTYPES`` columns, calibrated).

    A subtype is named only on a slice called bleeding (:func:`ich.review.calls`), so its threshold
    tells the subtypes apart among bleeding slices, by the Matthews correlation: Youden's J chose
    0.002 for epidural (18 slices) and named it on 372 of 386 called slices (5 right), and F1 names a
    common subtype (subdural, nearly half of the bleeds) on almost every bleed. A subtype whose
    probability does not rank its own slices above the other bleeds (AUC among bleeding slices, its
    bootstrap 95 % lower bound not above 0.5) is not named at all (:data:`~ich.labels.NOT_NAMED`);
    its probability is still shown. The test is on the ranking, not on the chosen threshold's
    precision, which the choice itself makes look better than it is.
    """
    out = {}
    for i, (c, t) in enumerate(zip(SUBTYPES, mcc_thresholds(y, prob))):
        known = y[:, i] >= 0
        auc_low = bootstrap_auc(y[known, i], prob[known, i])[0]
        out[c] = float(t) if auc_low > 0.5 else NOT_NAMED  # NaN (under 2 positives): not named
    return out


def calibrate(oof: pd.DataFrame, counts: Sequence[int]) -> tuple[Platt, dict[str, float], dict]:
    """Platt scaling, thresholds and the study rule from the out-of-fold predictions; plus their report."""
    y = oof[list(CLASSES)].to_numpy(np.float64)
    raw = oof[[f"p_{c}" for c in CLASSES]].to_numpy(np.float64)
    platt = fit_platt(y, raw)
    cal = platt(raw)
    rule = choose_series_rule(y[:, 0], cal[:, 0], counts)
    bleed = y[:, 0] > 0.5
    thresholds = {"any": rule.threshold} | naming_thresholds(y[bleed, 1:], cal[bleed, 1:])
    weights = rsna_weights(CLASSES)
    summary = summarize(y, cal, CLASSES, [thresholds[c] for c in CLASSES])
    for i, c in enumerate(CLASSES):
        summary["per_class"][c]["auc_ci"] = list(bootstrap_auc(y[:, i], cal[:, i]))
        summary["per_class"][c]["positives"] = int((y[:, i] > 0.5).sum())
    report = {
        "slices": len(oof),
        "slice": summary,
        "log_loss_raw": weighted_log_loss(y, raw, weights),
        "log_loss_calibrated": weighted_log_loss(y, cal, weights),
        "subtypes_named": subtypes_named(y, cal, thresholds),
        "reliability_raw": reliability(y[:, 0], raw[:, 0]),
        "reliability_calibrated": reliability(y[:, 0], cal[:, 0]),
        "series_rule": {"top_k": rule.top_k, "threshold": rule.threshold, "sensitivity": rule.sensitivity,
                        "specificity": rule.specificity, "auc_by_k": rule.auc_by_k, "simulated_series": rule.n_series,
                        "target_sensitivity": TARGET_SENSITIVITY, "bleed_slices_per_series": list(counts)},
        "calibrated": oof.assign(**{f"p_{c}": cal[:, i] for i, c in enumerate(CLASSES)}),
    }  # fmt: skip
    return platt, thresholds, report


def cross_validation(oof: pd.DataFrame, counts: Sequence[int]) -> tuple[Platt, dict[str, float], dict]:
    """:func:`calibrate`, with the worst out-of-fold false positives and negatives in the report."""
    platt, thresholds, cv = calibrate(oof, counts)
    calibrated = cv.pop("calibrated").set_index("sop_uid")
    cv["failures"] = _failures(calibrated[["source", *SUBTYPES]], calibrated["any"], calibrated["p_any"])
    return platt, thresholds, cv


def _failures(
    frame: pd.DataFrame, truth: pd.Series, score: pd.Series, n: int = FAILURES_SHOWN
) -> dict[str, list[dict]]:
    """The ``n`` highest-scored clear slices and lowest-scored bleeding ones."""
    both = pd.DataFrame({"truth": truth, "score": score}).join(frame)
    fp = both[both["truth"] == 0].sort_values("score", ascending=False).head(n)
    fn = both[both["truth"] == 1].sort_values("score").head(n)
    keep = [c for c in ("score", "source", *SUBTYPES) if c in both]
    return {
        "false_positives": fp[keep].reset_index().to_dict(orient="records"),
        "false_negatives": fn[keep].reset_index().to_dict(orient="records"),
    }


def external_checks(predictor: Predictor, shared: Path) -> dict[str, dict]:
    """Scores on the DICOM sets that no model here trained on, through the product's DICOM path.

    Every labelled series is scored (``every_series``), those the exam rule leaves out too: CQ500-CT-1 and
    the PhysioNet CT-ICH subset are samples of single slices, which the worklist would not score.
    """
    reports: dict[str, dict] = {}
    folder = shared / "rsna-sample"
    if folder.is_dir():
        labels = read_rsna_csv(folder / "stage_2_train.csv")
        result = evaluate.predict(predictor, [folder], progress=False, every_series=True)
        report = evaluate.evaluate(result.frame, labels, predictor.thresholds, predictor.top_k)
        any_true = labels["any"].reindex(result.frame.index)
        report["failures"] = _failures(labels.drop(columns="any"), any_true, result.frame["any"])
        reports["rsna-sample"] = report
    folder = shared / "cq500"
    if folder.is_dir():
        votes = pd.read_csv(folder / "cq500_labels_for_these_patients.csv")
        rows: list[dict[str, Any]] = []
        for scan in sorted(p for p in folder.iterdir() if p.is_dir()):
            result = evaluate.predict(predictor, [scan], progress=False, every_series=True)
            vote = votes[votes["name"] == scan.name]
            slab = result.frame.groupby(["series_uid", "slab"]).ngroup().to_numpy()
            rows.append({"scan": scan.name, "slices": len(result.frame), "score": float(predictor.summarize(
                list(result.frame.index), result.frame[list(CLASSES)].to_numpy(), slab_of_slice=slab).score),
                "truth": int(vote["ICH_majority"].iloc[0]) if len(vote) else None})  # fmt: skip
            if result.frame["series_uid"].nunique() == 1 and slab.max() + 1 < len(slab):
                # A thin series, scored on ~5 mm slabs as the worklist scores it; slice by slice for comparison.
                series = next(dicom.iter_series([scan], []))
                probs, _ = predictor.predict_volume([s.pixels for s in series.slices])
                rows[-1] |= {"slabs": int(slab.max() + 1),
                             "score_per_slice": float(predictor.summarize(series.sop_uids, probs).score)}  # fmt: skip
        for r in rows:
            r["flagged"] = r["score"] >= predictor.thresholds["any"]
        reports["cq500"] = {"scans": rows}
    folder = shared / "physionet-ctich"
    if folder.is_dir():
        table = pd.read_csv(folder / "labels_raw_ct_numbering.csv", dtype={"file": str})
        result = evaluate.predict(
            predictor, sorted((folder / "hemo_subset").glob("*.dcm")), progress=False, every_series=True
        )
        sops = {dicom.read_slice(folder / "hemo_subset" / f"{f}.dcm", pixels=False).sop_uid: f for f in table["file"]}
        probs = result.frame.rename(index=sops)
        # As a reader sees them: a subtype counts only where the slice is also called bleeding.
        named = pd.DataFrame(
            review.calls(probs[list(CLASSES)].to_numpy(), predictor.thresholds), index=probs.index, columns=CLASSES
        )
        per_class = {}
        for col, c in PHYSIONET_SUBTYPES.items():
            files = table.loc[table[col] == 1, "file"]
            per_class[c] = {
                "slices": len(files),
                "caught_as_subtype": int(named.loc[files, c].sum()),
                "caught_as_any": int(named.loc[files, "any"].sum()),
            }
        per_class["any"] = {"slices": len(probs), "caught_as_any": int(named["any"].sum())}
        reports["physionet-ctich"] = {"per_class": per_class}
    return reports


def _pointing(cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]], trained_on: bool) -> dict:
    """Pointing game of Grad-CAM ('any') over ``(cam, mask, hu)`` cases: exact and within 8 px, with chance.

    Chance is where a point drawn at random in the head (HU > 0) lands on the mask: the mask's share of it.
    """
    n = len(cases)
    exact = sum(explain.pointing_hit(cam, mask) for cam, mask, _ in cases)
    near = sum(explain.pointing_hit(cam, mask, POINTING_TOLERANCE_PX) for cam, mask, _ in cases)
    chance = float(np.mean([mask.sum() / max(1, (hu > 0).sum()) for _, mask, hu in cases])) if n else None
    return {"slices": n, "hits": exact, "hit_rate": exact / n if n else None, "hit_ci": wilson_interval(exact, n),
            "hits_near": near, "hit_rate_near": near / n if n else None, "near_ci": wilson_interval(near, n),
            "chance": chance, "trained_on": trained_on}  # fmt: skip


def _masked_slices(folder: Path, limit: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(mask, hu)`` of the first ``limit`` masked bleed slices of an image layout (:mod:`ich.datasets`)."""
    manifest = datasets.read_source(folder).manifest
    rows = manifest[(manifest["any"] == 1) & manifest["mask"].notna()].head(limit)
    out = []
    for row in rows.itertuples():
        mask = datasets.load_image(row.mask, row.rotate) > 0
        if mask.any():
            out.append((mask, datasets.load_hu(row.path, row.rotate)))
    return out


def _masked_cases(predictor: Predictor, slices: list, layer: Any = None) -> list:
    """``(cam, mask, hu)`` of ``(mask, hu)`` slices: Grad-CAM of 'any' from ``layer`` (default the viewer's)."""
    return [(explain.grad_cam(predictor, hu, "any", layer), mask, hu) for mask, hu in slices]


def layer_comparison(predictor: Predictor, slices: list) -> dict[str, dict]:
    """The pointing game of each ResNet stage (:data:`RESNET_STAGES`) on the same slices; ``{}`` for
    another architecture. Which layer :func:`ich.explain.target_layer` shows rests on this."""
    net = unwrap(predictor.model)
    if not isinstance(net, torchvision.models.ResNet):
        return {}
    return {name: _pointing(_masked_cases(predictor, slices, getattr(net, name)), False) for name in RESNET_STAGES}


def heatmap_checks(predictor: Predictor, shared: Path, limit: int = POINTING_LIMIT) -> dict[str, dict]:
    """Does the heatmap point at the bleed? The pointing game on the masked sets (PhysioNet never trained on:
    the DICOM subset, and every bleed slice of its complete series, there for each ResNet stage too:
    :func:`layer_comparison`)."""
    reports: dict[str, dict] = {}
    folder = shared / "physionet-ctich"
    if (folder / "Masks_subset").is_dir():
        cases = []
        for mask_file in sorted((folder / "Masks_subset").glob("*.dcm")):
            hu = dicom.read_slice(folder / "hemo_subset" / mask_file.name).pixels
            mask = dicom.read_slice(mask_file).pixels > 0
            if mask.any():
                cases.append((explain.grad_cam(predictor, hu, "any"), mask, hu))
        reports["physionet-ctich"] = _pointing(cases, trained_on=False)
    if (shared / "physionet-series").is_dir():
        # Every ResNet stage compared on its bleed slices; the viewer's layer is one of them, reported as the others.
        slices = _masked_slices(shared / "physionet-series", None)
        layers = layer_comparison(predictor, slices)
        shown = explain.target_layer(predictor.model)
        name = next((n for n in layers if getattr(unwrap(predictor.model), n) is shown), None)
        chosen = dict(layers[name]) if name else _pointing(_masked_cases(predictor, slices), False)
        reports["physionet-series"] = chosen | ({"layer": name, "layers": layers} if layers else {})
    if (shared / "phe-sich").is_dir():
        slices = _masked_slices(shared / "phe-sich", limit)
        reports["phe-sich"] = _pointing(_masked_cases(predictor, slices), trained_on=True)
    return reports


def store(final: Path, out: Path, updates: dict) -> Path:
    """``final``'s weights as the bundled checkpoint in ``out``, in float16 (22 MB, not 45: what a GPU
    machine receives is capped at 64 MiB, the checkout included), its JSON updated with ``updates``."""
    state, meta = checkpoint.load(final)
    model = build_model(meta["arch"], int(meta["num_classes"]))
    model.load_state_dict(state)
    written = ("sha256", "weights", "weights_dtype", "created", "format", "ich_version", "history")
    keep = {k: v for k, v in meta.items() if k not in written}
    return checkpoint.save(model, out / NAME, keep | {"name": NAME} | updates, half=True)[1]


def write_checkpoint(final: Path, out: Path, platt: Platt, thresholds: dict[str, float], cv: dict) -> Path:
    """The final model's weights with the calibration, thresholds, study rule and CV metrics in its JSON."""
    return store(
        final,
        out,
        {
            "thresholds": thresholds,
            "threshold_policy": f"any: series sensitivity >= {TARGET_SENSITIVITY} on simulated out-of-fold series; subtypes: Matthews correlation on out-of-fold bleeding slices; not named where their AUC among bleeding slices is not above 0.5 (95 % bootstrap)",
            "study_top_k": cv["series_rule"]["top_k"],
            "calibration": platt.to_json(CLASSES),
            "metrics": {
                "out_of_fold": cv["slice"],
                "log_loss_raw": cv["log_loss_raw"],
                "log_loss_calibrated": cv["log_loss_calibrated"],
            },
        },
    )


def earlier_stages(init_run: Path | None, names: Sequence[str]) -> list[dict]:
    """The bundles an ``--init-run`` chain continued, oldest first: each one's command, size, epochs,
    peak lr, minutes and its runs' training records (read from each work folder's bundle.json)."""
    stages: list[dict] = []
    while init_run is not None:
        runs = [json.loads((init_run / f"{name}.json").read_text()) for name in names]
        command = json.loads((init_run.parent / BUNDLE_RECORD).read_text())["command"]
        stages.insert(0, {
            "command": command,
            "input_size": runs[0]["input_size"],
            "epochs": runs[0]["training"]["epochs"],
            "lr": runs[0]["training"]["lr"],
            "minutes": round(sum(r["training"]["wall_seconds"] for r in runs) / 60, 1),
            "runs": [r["training"] for r in runs],
        })  # fmt: skip
        init_run = get_args_parser().parse_args(command).init_run
    return stages


def main(argv: Sequence[str] | None = None) -> int:
    command = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(command)
    dicom.quiet_invalid_values()
    if args.checks_only or args.recalibrate or args.series_policy:
        print(recheck(args.out, args.shared, args.device, args.recalibrate, args.series_policy))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / BUNDLE_RECORD).write_text(json.dumps({"command": command}) + "\n")
    cache, final, folds = train_models(args)
    if args.train_only:
        for path in (final, *folds):
            t = json.loads(path.read_text())["training"]
            print(
                f"{path.stem}: {t['train_seconds']:.0f} s training, {t['images_per_second']:.0f} img/s on {t['device']}"
            )
        return 0
    oof = out_of_fold(folds)
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.safetensors"):  # one checkpoint in weights/: the one the dashboard loads
        old.unlink()
        old.with_suffix(".json").unlink(missing_ok=True)
    oof.to_parquet(args.out / OOF_FILE, index=False)
    platt, thresholds, cv = cross_validation(oof, bleed_counts(cache.frame))
    meta_path = write_checkpoint(final, args.out, platt, thresholds, cv)
    reports: dict[str, Any] = {}
    if series_policy.available(args.shared):
        meta_path, reports["real_series"] = real_series_policy(meta_path, args.shared, args.device, cv["series_rule"])
    predictor = Predictor.from_checkpoint(meta_path, args.device)
    reports |= {
        "cross_validation": cv,
        "external": external_checks(predictor, args.shared),
        "heatmaps": heatmap_checks(predictor, args.shared),
    }
    final_meta = json.loads(final.read_text())
    runs = [json.loads(p.read_text())["training"] for p in (final, *folds)]
    stages = earlier_stages(args.init_run, [p.stem for p in (final, *folds)])
    if stages:  # for the card's account of the whole recipe
        reports["earlier_stages"] = [{k: v for k, v in s.items() if k != "runs"} for s in stages]
        runs += [r for s in stages for r in s["runs"]]
    reports["training"] = {
        # The training runs' own wall time, every stage (they may come from an earlier, resumed invocation).
        "minutes": round(sum(r["wall_seconds"] for r in runs) / 60, 1),
        "final_train_seconds": final_meta["training"]["train_seconds"],
        "final_images_per_second": final_meta["training"]["images_per_second"],
        "device": final_meta["training"]["device"],
        "amp": final_meta["training"]["amp"],
        "sources": final_meta["training"]["sources"],
        "command": command,
    }
    evaluate.reliability_figure(
        {"raw": cv["reliability_raw"], "calibrated": cv["reliability_calibrated"]},
        "Out-of-fold reliability, 'any' (rsna-png)",
    ).write_html(args.work / "reliability.html", include_plotlyjs=True)
    print(write_reports(meta_path, reports))
    return 0


def write_reports(meta_path: Path, reports: dict[str, Any]) -> str:
    """``evaluation.json`` and ``MODEL_CARD.md`` beside the checkpoint ``meta_path``; returns the card."""
    evaluation = meta_path.parent / "evaluation.json"
    evaluation.write_text(json.dumps(json_ready(reports), indent=2, allow_nan=False) + "\n")
    # The card is made from the file as written, so rebuilding it from evaluation.json is byte for byte.
    card = model_card(json.loads(meta_path.read_text()), json.loads(evaluation.read_text()), FAILURE_NOTES.read_text())
    (meta_path.parent / "MODEL_CARD.md").write_text(card)
    return card


def real_series_policy(meta_path: Path, shared: Path, device: str, simulated: dict) -> tuple[Path, dict]:
    """The checkpoint ``meta_path`` with its study rule and thresholds refitted on the real series in ``shared``
    (:mod:`train.series_policy`), and the report, which measures the rule it replaces on the same series.

    The rule replaced is ``simulated``, the cross-validation's ``series_rule`` (chosen on simulated series,
    kept in ``evaluation.json``), not the checkpoint's: once refitted, the checkpoint holds the real-series
    rule, and a rerun compared with it would rewrite the card's "previous rule" with the current one.
    """
    frame = series_policy.score_real_sets(Predictor.from_checkpoint(meta_path, device), shared)
    rule, thresholds, report = series_policy.fit(
        frame, {"top_k": simulated["top_k"], "threshold": simulated["threshold"]}
    )
    updates = {
        "thresholds": thresholds,
        "study_top_k": rule.top_k,
        "threshold_policy": series_policy.policy_text(report),
    }
    return store(meta_path, meta_path.parent, updates), report


def recheck(out: Path, shared: Path, device: str, recalibrate: bool = False, real_series: bool = False) -> str:
    """Steps 5-6 again for the checkpoint in ``out``: the checks' code changed, the model did not
    (a float32 checkpoint is stored in float16 first, as :func:`store` writes them now).

    ``recalibrate``: step 4 first, from the out-of-fold predictions kept in ``out`` (the calibration,
    threshold or study-rule policy changed); the cross-validation report is rewritten with it, and the
    real-series policy refitted over it where ``shared`` has the real series. ``real_series``: that
    policy alone, on the calibration the checkpoint has.
    """
    meta_path = out / f"{NAME}.json"
    flag = "--recalibrate" if recalibrate else "--series-policy" if real_series else "--checks-only"
    for needed in (meta_path, out / "evaluation.json", *([out / OOF_FILE] if recalibrate else [])):
        if not needed.is_file():
            raise SystemExit(f"{flag}: no {needed}; build the checkpoint with python -m train.bundle first")
    reports = json.loads((out / "evaluation.json").read_text())
    if recalibrate:
        counts = reports["cross_validation"]["series_rule"]["bleed_slices_per_series"]
        platt, thresholds, reports["cross_validation"] = cross_validation(pd.read_parquet(out / OOF_FILE), counts)
        meta_path = write_checkpoint(meta_path, out, platt, thresholds, reports["cross_validation"])
        reports.pop("real_series", None)  # the simulated rule is the checkpoint's again, unless refitted below
    elif json.loads(meta_path.read_text()).get("weights_dtype") != "float16":
        meta_path = store(meta_path, out, {})  # one bundled before weights were stored in float16: checked as shipped
    if real_series or (recalibrate and series_policy.available(shared)):
        meta_path, reports["real_series"] = real_series_policy(
            meta_path, shared, device, reports["cross_validation"]["series_rule"]
        )
    predictor = Predictor.from_checkpoint(meta_path, device)
    reports["external"] = external_checks(predictor, shared)
    reports["heatmaps"] = heatmap_checks(predictor, shared)
    return write_reports(meta_path, reports)


if __name__ == "__main__":
    raise SystemExit(main())
