"""train.bundle: calibration and operating point from out-of-fold predictions; the card matches weights/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ich import checkpoint
from ich.labels import CLASSES, NOT_NAMED
from ich.metrics import youden_thresholds
from train import bundle

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def test_card_rebuilds_the_bundled_model_card():
    """The card's text, from the bundled checkpoint JSON, evaluation.json and the failure notes, is MODEL_CARD.md as committed."""
    card = (WEIGHTS / "MODEL_CARD.md").read_text()
    meta = json.loads((WEIGHTS / f"{bundle.NAME}.json").read_text())
    evaluation = json.loads((WEIGHTS / "evaluation.json").read_text())
    assert bundle.model_card(meta, evaluation, bundle.FAILURE_NOTES.read_text()) == card
    assert "Not for clinical use" in card and meta["calibration"]["method"] == "platt"


def test_card_holds_what_the_real_series_audit_asked_for():
    """The bundled card: the flag's margin, CQ500-CT-0 as a row scored by the rule (CT-1 a single slice),
    its score on slabs and slice by slice, the per-set sensitivity, and the Grad-CAM layer comparison."""
    card = (WEIGHTS / "MODEL_CARD.md").read_text()
    evaluation = json.loads((WEIGHTS / "evaluation.json").read_text())
    real = evaluation["real_series"]
    below, lowest = real["threshold_between"]
    assert below < real["threshold"] < lowest and real["threshold"] == pytest.approx((below + lowest) / 2)
    assert (real["previous"]["top_k"], real["previous"]["threshold"]) == (
        evaluation["cross_validation"]["series_rule"]["top_k"],
        evaluation["cross_validation"]["series_rule"]["threshold"],
    )
    scans = {s["scan"]: s for s in evaluation["external"]["cq500"]["scans"]}
    thin = scans["CQ500-CT-0"]
    assert thin["slabs"] < thin["slices"] == 238 and f"it would be {thin['score_per_slice']:.3f}" in card
    assert "| cq500 `CQ500-CT-0`" in card and "`CQ500-CT-1` is a single slice, not a series" in card
    for name, m in real["cross_validated"].items():
        sens = m["sensitivity"]
        if name != "all" and sens["rate"] < real["target_sensitivity"]:
            assert f"`{name}` alone is {sens['hits']}/{sens['n']}" in card
    physionet = evaluation["heatmaps"]["physionet-series"]
    assert list(physionet["layers"]) == list(bundle.RESNET_STAGES) and physionet["layer"] == "layer2"
    for name, m in physionet["layers"].items():
        assert f"| `{name}`" in card and f"{m['hits_near']}/{m['slices']}" in card


def synthetic_oof(n=1500, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = np.zeros((n, len(CLASSES)), int)
    y[:, 1:] = rng.random((n, len(CLASSES) - 1)) < 0.05
    y[:, 0] = y[:, 1:].max(1)
    frame = pd.DataFrame(y, columns=list(CLASSES))
    for i, c in enumerate(CLASSES):
        z = 4 * (y[:, i] + rng.normal(0, 0.6, n)) - 1.5  # over-confident raw model
        frame[f"p_{c}"] = 1 / (1 + np.exp(-z))
    frame.insert(0, "row", np.arange(n))
    frame.insert(1, "sop_uid", [f"ID_{i:05d}" for i in range(n)])
    frame.insert(2, "source", "rsna-png")
    return frame


def test_calibrate_sets_thresholds_and_lowers_log_loss():
    _platt, thresholds, report = bundle.calibrate(synthetic_oof(), [1, 3, 5, 8])
    assert set(thresholds) == set(CLASSES)
    assert report["log_loss_calibrated"] < report["log_loss_raw"]
    rule = report["series_rule"]
    assert rule["sensitivity"] >= rule["target_sensitivity"] and thresholds["any"] == rule["threshold"]
    assert all(np.isfinite(report["slice"]["per_class"][c]["auc_ci"]).all() for c in CLASSES)


def test_subtype_thresholds_tell_subtypes_apart_among_bleeding_slices():
    """Subtype scores that rise on any bleed and barely more on their own (as a weak model's do): over all
    slices Youden's J would name every subtype on every called slice; chosen among bleeding slices, a
    subtype is named on fewer slices and more often where it is."""
    oof = synthetic_oof(3000, seed=1)
    rng = np.random.default_rng(2)
    for c in CLASSES[1:]:
        z = 4 * oof["any"] + 0.6 * oof[c] + rng.normal(0, 0.5, len(oof)) - 4
        oof[f"p_{c}"] = 1 / (1 + np.exp(-z))
    platt, thresholds, report = bundle.calibrate(oof, [1, 3, 5, 8])
    y = oof[list(CLASSES)].to_numpy(float)
    cal = platt(oof[[f"p_{c}" for c in CLASSES]].to_numpy(float))
    named = report["subtypes_named"]
    for i, c in enumerate(CLASSES[1:], 1):
        assert thresholds[c] > youden_thresholds(y[:, i : i + 1], cal[:, i : i + 1])[0]
        share = named[c]["positives_called"] / named["called"]  # what naming it everywhere would get right
        assert named[c]["named"] < named["called"] / 2 and named[c]["correct"] / named[c]["named"] > 1.5 * share


def test_a_rare_weak_subtype_is_not_named_on_every_bleeding_slice():
    """The shipped model's epidural case: a subtype on 3 % of bleeding slices whose score is barely higher
    there. Youden's J among bleeding slices would name it on over a fifth of the called slices; the
    Matthews threshold names it rarely and is right far more often than its share."""
    oof = synthetic_oof(4000, seed=3)
    rng = np.random.default_rng(4)
    bleeding = np.flatnonzero(oof["any"].to_numpy() > 0)
    oof["epidural"] = 0
    oof.loc[rng.choice(bleeding, len(bleeding) // 30, replace=False), "epidural"] = 1
    z = 3 * oof["any"] + 0.3 * oof["epidural"] + rng.normal(0, 0.6, len(oof)) - 5
    oof["p_epidural"] = 1 / (1 + np.exp(-z))
    platt, thresholds, report = bundle.calibrate(oof, [1, 3, 5, 8])
    named, called = report["subtypes_named"]["epidural"], report["subtypes_named"]["called"]
    assert named["named"] < called / 10
    assert named["correct"] / named["named"] > 5 * named["positives_called"] / called

    y = oof[list(CLASSES)].to_numpy(float)
    cal = platt(oof[[f"p_{c}" for c in CLASSES]].to_numpy(float))
    youden = youden_thresholds(y[bleeding, 1:2], cal[bleeding, 1:2])[0]
    assert ((cal[:, 1] >= youden) & (cal[:, 0] >= thresholds["any"])).sum() > called / 5


def test_a_subtype_named_no_better_than_chance_is_not_named():
    """An epidural output that is noise among bleeding slices: whatever threshold is best names epidural
    no more often where it is than its share of bleeds, so the bundle does not name it at all."""
    oof = synthetic_oof(4000, seed=5)
    rng = np.random.default_rng(6)
    bleeding = np.flatnonzero(oof["any"].to_numpy() > 0)
    oof["epidural"] = 0
    oof.loc[rng.choice(bleeding, len(bleeding) // 20, replace=False), "epidural"] = 1
    oof["p_epidural"] = 1 / (1 + np.exp(-(3 * oof["any"] + rng.normal(0, 0.6, len(oof)) - 5)))
    _platt, thresholds, report = bundle.calibrate(oof, [1, 3, 5, 8])
    assert thresholds["epidural"] == NOT_NAMED and report["subtypes_named"]["epidural"]["named"] == 0
    assert all(thresholds[c] < NOT_NAMED for c in CLASSES[2:])  # the informative ones still are


def test_earlier_stages_follow_the_init_run_chain(tmp_path):
    """A third stage's card cites both bundles it continued, oldest first, with their runs' wall time."""
    previous = None
    for size, seconds in ((128, 600), (160, 300)):
        work = tmp_path / f"stage-{size}"
        (work / "run").mkdir(parents=True)
        command = [] if previous is None else ["--init-run", str(previous), "--size", str(size)]
        (work / bundle.BUNDLE_RECORD).write_text(json.dumps({"command": command}))
        training = {"epochs": 8, "lr": 1e-3, "wall_seconds": seconds}
        (work / "run" / "final.json").write_text(json.dumps({"input_size": size, "training": training}))
        previous = work / "run"
    stages = bundle.earlier_stages(previous, ["final"])
    assert [(s["input_size"], s["minutes"], s["command"][:1]) for s in stages] == [
        (128, 10.0, []),
        (160, 5.0, ["--init-run"]),
    ]
    assert bundle.earlier_stages(None, ["final"]) == []


def test_out_of_fold_refuses_folds_that_overlap(tmp_path):
    oof = synthetic_oof(10)
    for k, rows in enumerate([oof.iloc[:6], oof.iloc[4:]]):
        rows.to_parquet(tmp_path / f"fold{k}.valid.parquet")
    with pytest.raises(SystemExit, match="validated by two folds"):
        bundle.out_of_fold([tmp_path / "fold0.json", tmp_path / "fold1.json"])
    oof.iloc[6:].to_parquet(tmp_path / "fold1.valid.parquet")
    assert len(bundle.out_of_fold([tmp_path / "fold0.json", tmp_path / "fold1.json"])) == 10


def test_bleed_counts_come_from_phe_sich_patients(shared_data):
    from ich import datasets

    counts = bundle.bleed_counts(datasets.read_source(shared_data / "phe-sich").manifest)
    assert len(counts) == 119 and sum(counts) == 676 and min(counts) >= 1
    with pytest.raises(SystemExit, match="no phe-sich rows"):
        bundle.bleed_counts(datasets.read_source(shared_data / "roboflow-ich").manifest)


def test_a_run_made_elsewhere_is_reused_but_not_another_recipe(tmp_path):
    args = bundle.get_args_parser().parse_args(["--work", str(tmp_path)])
    here = bundle._fit_args(args, tmp_path / "cache", "fold0", ["--fold", "0"])
    args_gpu = bundle.get_args_parser().parse_args(["--work", "/elsewhere", "--device", "cuda"])
    there = bundle._fit_args(args_gpu, Path("/elsewhere/cache"), "fold0", ["--fold", "0"])
    assert bundle._recipe(here) == bundle._recipe(there)
    args_long = bundle.get_args_parser().parse_args(["--work", str(tmp_path), "--epochs", "40"])
    assert bundle._recipe(bundle._fit_args(args_long, tmp_path / "cache", "fold0", ["--fold", "0"])) != bundle._recipe(
        here
    )


def test_an_interrupted_run_resumes_and_another_recipe_starts_afresh(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    args = bundle.get_args_parser().parse_args(["--work", str(tmp_path)])
    fit_args = bundle._fit_args(args, tmp_path / "cache", "fold0", ["--fold", "0"])
    calls: list[list[str]] = []

    def fake_fit(argv):
        calls.append(argv)
        (run / "fold0.state.pt").write_bytes(b"after epoch 1")
        if len(calls) == 1:
            raise KeyboardInterrupt  # the session ends mid-run
        (run / "fold0.json").write_text("{}")

    monkeypatch.setattr(bundle.fit, "main", fake_fit)
    with pytest.raises(KeyboardInterrupt):
        bundle._fit(fit_args, run, "fold0")
    bundle._fit(fit_args, run, "fold0")
    assert calls[0] == fit_args and calls[1] == [*fit_args, "--resume", str(run / "fold0.state.pt")]
    assert bundle._reusable(fit_args, run, "fold0")  # recorded without --resume

    (run / "fold0.json").unlink()
    other = bundle._fit_args(
        bundle.get_args_parser().parse_args(["--work", str(tmp_path), "--epochs", "40"]),
        tmp_path / "cache",
        "fold0",
        ["--fold", "0"],
    )
    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        bundle._fit(other, run, "fold0")
    assert calls == [other]  # another recipe's state is not resumed


def test_checks_only_reruns_the_external_checks_and_keeps_the_rest(shared_data, tmp_path):
    out, shared = tmp_path / "weights", tmp_path / "shared"
    shutil.copytree(WEIGHTS, out)
    shared.mkdir()
    (shared / "physionet-ctich").symlink_to(shared_data / "physionet-ctich")
    before = json.loads((out / "evaluation.json").read_text())
    model, meta_before = checkpoint.load_model(out / f"{bundle.NAME}.json")
    checkpoint.save(model, out / bundle.NAME, meta_before)  # as bundled before weights were stored in float16
    assert bundle.main(["--checks-only", "--out", str(out), "--shared", str(shared), "--device", "cpu"]) == 0
    after = json.loads((out / "evaluation.json").read_text())
    meta = json.loads((out / f"{bundle.NAME}.json").read_text())
    assert meta["weights_dtype"] == "float16" and (out / f"{bundle.NAME}.safetensors").stat().st_size < 25e6
    changed = ("sha256", "weights_dtype", "created")
    assert {k: v for k, v in meta.items() if k not in changed} == {
        k: v for k, v in meta_before.items() if k not in changed
    }
    assert {k: v for k, v in after.items() if k not in ("external", "heatmaps")} == {
        k: v for k, v in before.items() if k not in ("external", "heatmaps")
    }
    assert set(after["external"]) == set(after["heatmaps"]) == {"physionet-ctich"}
    per_class = after["external"]["physionet-ctich"]["per_class"]
    assert per_class["any"]["slices"] == 26
    # A subtype is named only on a slice called bleeding (ich.review.calls).
    assert all(m["caught_as_subtype"] <= m["caught_as_any"] for c, m in per_class.items() if c != "any")
    card = (out / "MODEL_CARD.md").read_text()
    assert card == bundle.model_card(meta, after, bundle.FAILURE_NOTES.read_text()) and "### rsna-sample" not in card
    with pytest.raises(SystemExit, match=r"no .*ich-resnet18-brain\.json"):
        bundle.main(["--checks-only", "--out", str(tmp_path / "empty")])
    (out / "evaluation.json").unlink()
    with pytest.raises(SystemExit, match=r"no .*evaluation\.json"):
        bundle.main(["--checks-only", "--out", str(out)])


def test_recalibrate_refits_the_policy_on_the_kept_out_of_fold_predictions(shared_data, tmp_path):
    """A rebuilt bundle keeps its raw fold predictions, so a new threshold policy needs no retraining:
    --recalibrate refits calibration, thresholds and study rule on them, for the same weights."""
    out, shared = tmp_path / "weights", tmp_path / "shared"
    shutil.copytree(WEIGHTS, out)
    shared.mkdir()
    (shared / "physionet-ctich").symlink_to(shared_data / "physionet-ctich")
    with pytest.raises(SystemExit, match=r"--recalibrate: no .*out-of-fold\.parquet"):
        bundle.main(["--recalibrate", "--out", str(out), "--shared", str(shared)])
    oof, counts = synthetic_oof(), [1, 3, 5, 8]
    oof["p_epidural"] = np.random.default_rng(1).random(len(oof))  # noise: epidural is not named
    oof.to_parquet(out / bundle.OOF_FILE)
    evaluation = json.loads((out / "evaluation.json").read_text())
    evaluation["cross_validation"]["series_rule"]["bleed_slices_per_series"] = counts  # as a rebuild records it
    (out / "evaluation.json").write_text(json.dumps(evaluation))
    before = json.loads((out / f"{bundle.NAME}.json").read_text())

    assert bundle.main(["--recalibrate", "--out", str(out), "--shared", str(shared), "--device", "cpu"]) == 0
    meta = json.loads((out / f"{bundle.NAME}.json").read_text())
    after = json.loads((out / "evaluation.json").read_text())
    _platt, thresholds, _cv = bundle.calibrate(oof, counts)
    assert meta["thresholds"] == pytest.approx(thresholds) and meta["thresholds"] != before["thresholds"]
    assert meta["sha256"] == before["sha256"] and meta["training"] == before["training"]
    assert "Matthews" in meta["threshold_policy"] and after["cross_validation"]["slices"] == len(oof)
    assert after["training"] == evaluation["training"] and set(after["external"]) == {"physionet-ctich"}
    card = (out / "MODEL_CARD.md").read_text()
    assert card == bundle.model_card(meta, after, bundle.FAILURE_NOTES.read_text())
    assert meta["thresholds"]["epidural"] == NOT_NAMED and "epidural not named" in card
    assert "epidural is not named" in card and "subdural is named on" in card
    assert (
        "| epidural | " in card and "| — | — | not named |" in card
    )  # the CV table: no sensitivity at a cut never used
