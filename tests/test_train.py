"""train.*: splits, loading, augmentation, LR finder, fit end to end (also DDP), prepare, explore, compare, bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ich import checkpoint
from ich.inference import Predictor
from ich.labels import CLASSES, write_rsna_csv
from ich.models import IMAGENET_MEAN, IMAGENET_STD, ModelInput
from ich.windowing import MODEL_WINDOWS, PRESETS
from tests.dicom_factory import make_ct, to_bytes
from train import bench, compare, distributed, explore, fit, lr_finder, prepare
from train.data import (
    BatchLoader,
    BatchReader,
    Cache,
    RandomAffine,
    RandomFlip,
    RandomGaussianBlur,
    build_augment,
    patient_split,
    synthetic_cache,
)

# RSNA-style SOPInstanceUIDs ("ID_...") are not valid UIDs: pydicom warns when the tests write them.
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--batch-size", "8", "--workers", "0", "--print-freq", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Cache:
    return synthetic_cache(tmp_path_factory.mktemp("cache"), n=48, size=64, patients=8)


# --------------------------------------------------------------------------- splits and loading


def test_patient_split_has_no_patient_on_both_sides():
    patients = np.random.default_rng(1).integers(0, 30, size=500).astype(str)
    train, val = patient_split(patients, val_frac=0.2, seed=3)
    assert not set(patients[train]) & set(patients[val])
    assert sorted(np.r_[train, val]) == list(range(500))
    assert len(set(patients[val])) == round(0.2 * len(set(patients)))
    # Same seed, same split; K folds put each patient in exactly one validation fold.
    assert np.array_equal(patient_split(patients, 0.2, 3)[1], val)
    folds = [set(patients[patient_split(patients, folds=5, fold=i)[1]]) for i in range(5)]
    assert sum(len(f) for f in folds) == len(set(patients)) and set.union(*folds) == set(patients)


def test_patient_split_refuses_impossible_requests():
    with pytest.raises(ValueError, match="2 patients"):
        patient_split(["a", "a"])
    with pytest.raises(ValueError, match="folds"):
        patient_split(["a", "b"], folds=3)


def test_batch_loader_reads_every_row_once_and_shards(cache):
    rows = np.arange(5, 40)
    y = np.arange(len(cache.frame), dtype=np.float32)[:, None]
    reader = BatchReader(cache.images_path, rows, y[rows])
    seen = []
    for images, target, row in BatchLoader(reader, 8, shuffle=False):
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 64, 64)
        assert torch.equal(images, torch.from_numpy(np.asarray(cache.images[row.numpy()])))
        assert torch.equal(target[:, 0], row.float())  # targets travel with their rows
        seen += row.tolist()
    assert sorted(seen) == rows.tolist()
    shards = [
        set(r for _, _, rr in BatchLoader(reader, 8, True, rank=k, world_size=2, seed=1) for r in rr.tolist())
        for k in (0, 1)
    ]
    assert shards[0] | shards[1] == set(rows.tolist())


def test_batch_reader_refuses_rows_outside_its_cache(cache):
    """read() clips out-of-range rows for speed, so they are refused up front rather than read as the last image."""
    n = len(cache.frame)
    with pytest.raises(ValueError, match=rf"holds {n} images; rows \[{n}\] are outside it"):
        BatchReader(cache.images_path, np.array([0, n]), np.zeros((2, 1), np.float32))
    with pytest.raises(ValueError, match="outside it"):
        BatchReader(cache.images_path, np.array([-1]), np.zeros((1, 1), np.float32))
    with pytest.raises(ValueError, match="3 rows but 2 target rows"):
        BatchReader(cache.images_path, np.arange(3), np.zeros((2, 1), np.float32))


def test_batch_loader_threads_read_ahead_and_stop_early(cache):
    reader = BatchReader(cache.images_path, np.arange(30), np.zeros((30, 1), np.float32))
    loader = BatchLoader(reader, 4, shuffle=True, workers=2, drop_last=True, seed=5)
    loader.set_epoch(3)
    threaded = [r.tolist() for _, _, r in loader]
    assert len(threaded) == len(loader) == 7 and len({r for b in threaded for r in b}) == 28
    inline = BatchLoader(reader, 4, shuffle=True, workers=0, drop_last=True, seed=5)
    inline.set_epoch(3)
    assert threaded == [r.tolist() for _, _, r in inline]  # same batches, same order as without threads
    inline_epochs = []
    for epoch in (0, 1):
        inline.set_epoch(epoch)
        inline_epochs.append([r.tolist() for _, _, r in inline])
    assert inline_epochs[0] != inline_epochs[1]  # each epoch its own shuffle
    stream = loader.forever()
    streamed = [next(stream)[2].tolist() for _ in range(10)]  # across an epoch boundary, then abandoned mid-epoch
    assert streamed == inline_epochs[0] + inline_epochs[1][:3]
    stream.close()


# --------------------------------------------------------------------------- augmentation


def test_augmentations_keep_shape_and_do_what_they_say():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32) * 255
    assert torch.equal(RandomFlip(1.0)(x), x.flip(-1))
    assert torch.equal(RandomFlip(0.0)(x), x)
    assert torch.allclose(RandomAffine(0.0, 1.0, p=1.0)(x), x, atol=1e-3)  # no rotation, no zoom: identity
    rotated = RandomAffine(15.0, 1.2, p=1.0)(x)
    assert rotated.shape == x.shape and not torch.allclose(rotated, x)
    flat = torch.full((2, 3, 16, 16), 100.0)
    assert torch.allclose(RandomGaussianBlur(1.0)(flat), flat, atol=1e-3)  # blur keeps a constant image
    assert torch.equal(RandomGaussianBlur(0.0)(x), x)
    blurred = RandomGaussianBlur(1.0, (1.0, 1.0))(x)
    assert blurred.std() < x.std() and blurred.mean().item() == pytest.approx(x.mean().item(), rel=0.02)
    assert repr(build_augment()) == "Compose(RandomFlip, RandomAffine, RandomGaussianBlur)"
    assert repr(build_augment(0, 0, 1, 0)) == "Compose()"


def test_model_input_normalises():
    to_input = ModelInput(torch.device("cpu"), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = to_input(torch.full((1, 3, 4, 4), 255, dtype=torch.uint8))
    assert x.dtype == torch.float32 and torch.allclose(x, torch.full_like(x, 2.0))


# --------------------------------------------------------------------------- LR finder


def test_valley_and_steep_on_a_known_curve():
    lrs = list(np.logspace(-6, 0, 60))
    losses = [1.0] * 10 + list(np.linspace(1.0, 0.2, 35)) + list(np.linspace(0.25, 3.0, 15))
    assert 1e-5 < lr_finder.valley(lrs, losses) < lrs[45]
    assert lrs[10] <= lr_finder.steep(lrs, losses) <= lrs[45]


def test_lr_find_returns_a_finite_rate_and_restores_the_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    before = model.weight.detach().clone()

    def step(lr: float) -> float:
        for g in opt.param_groups:
            g["lr"] = lr
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    with lr_finder.restored(model, opt):
        result = lr_finder.lr_find(step, start_lr=1e-5, end_lr=10, num_it=50)
    assert np.isfinite(result.suggestion) and 1e-5 <= result.suggestion <= 10
    assert len(result.lrs) < 50  # it stopped once the loss diverged
    assert torch.equal(model.weight, before)


# --------------------------------------------------------------------------- fit


def test_resolve_device_puts_each_process_on_its_gpu(monkeypatch):
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.resolve_device("auto", local_rank=1) == torch.device("cpu")
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        distributed.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.resolve_device("auto", local_rank=1) == torch.device("cuda", 1)


def test_fit_end_to_end_writes_a_loadable_checkpoint(cache, tmp_path):
    argv = [
        "--data",
        str(cache.root),
        "--task",
        "multilabel",
        "--bleed-only",
        "--epochs",
        "1",
        "--out",
        str(tmp_path),
        *TINY,
    ]
    meta = fit.main(argv)
    weights, meta_path = checkpoint.paths(tmp_path / "resnet18-multilabel")
    assert weights.is_file() and meta_path.is_file()
    model, saved = checkpoint.load_model(weights)
    assert saved["classes"] == list(CLASSES) and saved["task"] == "multilabel" and saved["input_size"] == 64
    assert saved["thresholds"] == dict.fromkeys(CLASSES, 0.5)
    assert saved["training"]["valid_patients"] + saved["training"]["train_patients"] == 8
    assert saved["training"]["bleed_only"] and saved["training"]["slices_used"] == cache.frame["any"].sum()
    assert len(saved["history"]) == 1 and set(saved["metrics"]["per_class"]) == set(CLASSES)
    assert meta["metrics"]["n"] == saved["training"]["valid_slices"]
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 6)
    # Prediction normalises a cached slice exactly as training did (augmentation off).
    images = np.array(cache.images[:4])  # a writable copy of the memory map
    trained_on = ModelInput(torch.device("cpu"), IMAGENET_MEAN, IMAGENET_STD)(torch.from_numpy(images))
    predicted_on = Predictor.from_checkpoint(weights, device="cpu").to_input(images)
    expected = (images / 255.0 - np.reshape(IMAGENET_MEAN, (1, 3, 1, 1))) / np.reshape(IMAGENET_STD, (1, 3, 1, 1))
    assert torch.equal(trained_on, predicted_on)
    np.testing.assert_allclose(predicted_on.numpy(), expected, atol=1e-5)


def test_fit_init_starts_from_a_checkpoint(cache, tmp_path):
    first = fit.main(["--data", str(cache.root), "--epochs", "1", "--out", str(tmp_path / "a"), *TINY])
    start, _ = checkpoint.load(tmp_path / "a" / first["name"])
    # --lr 0 leaves the weights where --init put them, so the saved model equals the start.
    argv = ["--data", str(cache.root), "--epochs", "1", "--lr", "0", "--out", str(tmp_path / "b"), *TINY]
    meta = fit.main([*argv, "--init", str(tmp_path / "a" / first["name"])])
    end, _ = checkpoint.load(tmp_path / "b" / meta["name"])
    weights = [k for k in start if "running" not in k and "num_batches" not in k]
    assert all(torch.equal(start[k], end[k]) for k in weights)
    with pytest.raises(SystemExit, match="predicting"):
        fit.main([*argv, "--task", "multilabel", "--init", str(tmp_path / "a" / first["name"])])


def test_seeded_augmentation_repeats_whatever_else_draws():
    x = torch.rand(6, 3, 32, 32) * 255
    first = build_augment(zoom=1.2).set_random_state(7)(x)
    torch.rand(100)  # someone else uses the global generator in between
    again = build_augment(zoom=1.2).set_random_state(7)(x)
    other = build_augment(zoom=1.2).set_random_state(8)(x)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_fit_is_reproducible_bit_for_bit_on_cpu(cache, tmp_path):
    argv = ["--data", str(cache.root), "--epochs", "1", "--aug-zoom", "1.2", *TINY]
    for name in ("a", "b"):
        fit.main([*argv, "--out", str(tmp_path), "--name", name])
    fit.main([*argv, "--out", str(tmp_path), "--name", "c", "--seed", "1"])
    a, b, c = (checkpoint.load(tmp_path / n)[0] for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_fit_resumes_after_an_interruption(cache, tmp_path, monkeypatch):
    argv = [
        "--data",
        str(cache.root),
        "--epochs",
        "2",
        "--freeze-epochs",
        "1",
        "--out",
        str(tmp_path),
        "--thresholds",
        "youden",
        *TINY,
    ]
    real_evaluate = fit.evaluate
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(fit, "evaluate", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        fit.main(argv)
    monkeypatch.setattr(fit, "evaluate", real_evaluate)
    state = tmp_path / "resnet18-binary.state.pt"
    meta = fit.main([*argv, "--resume", str(state)])
    assert [h["phase"] for h in meta["history"]] == ["head", "full", "full"]
    assert meta["training"]["steps"] == 3 * 4  # 36 training slices / batch 8, last batch dropped
    # The interrupted part counts too: time over all three epochs, not only the one after the resume.
    training = meta["training"]
    assert training["wall_seconds"] >= sum(h["seconds"] for h in meta["history"])
    assert training["images_per_second"] == pytest.approx(3 * 4 * 8 / training["train_seconds"])
    assert meta["threshold_policy"] == "youden" and meta["classes"] == ["any"]


@pytest.mark.slow
def test_fit_lr_find_writes_plot(cache, tmp_path):
    result = fit.main(["--data", str(cache.root), "--lr-find", "--lr-find-iters", "12", "--out", str(tmp_path), *TINY])
    assert np.isfinite(result["lr_find"]["valley"]) and Path(result["lr_find"]["plot"]).is_file()
    assert not (tmp_path / "resnet18-binary.safetensors").exists()


@pytest.mark.slow
def test_fit_ddp_two_processes_on_cpu(cache, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train.fit",
           "--data", str(cache.root), "--epochs", "1", "--max-steps", "2", "--out", str(tmp_path), *TINY]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((tmp_path / "resnet18-binary.json").read_text())
    assert saved["training"]["world_size"] == 2 and saved["training"]["steps"] == 2
    assert saved["metrics"]["n"] == saved["training"]["valid_slices"]  # the ranks' halves gathered, padding dropped
    assert done.stdout.count("saved ") == 1  # rank 0 alone reports and writes


# --------------------------------------------------------------------------- prepare / explore


def _rsna_folder(root: Path, n: int = 20) -> Path:
    """``n`` readable slices (two patients, the last one blank), one corrupt file, and the CSV."""
    images = root / "stage_2_train"
    images.mkdir(parents=True)
    labels = {}
    for i in range(n):
        sop = f"ID_{i:09x}"
        hu = np.full((32, 32), -1000.0) if i == n - 1 else None
        ds = make_ct(
            hu, z=5.0 * i, instance=i + 1, PatientID=f"P{i % 2}", SOPInstanceUID=sop, series_uid=f"1.2.{i % 2}"
        )
        (images / f"{sop}.dcm").write_bytes(to_bytes(ds))
        labels[sop] = [i % 3 == 0] + [i % 3 == 0 and k == i % 5 for k in range(5)]
    (images / "ID_corrupt.dcm").write_bytes(b"this is not DICOM")
    labels["ID_corrupt"] = [0] * 6
    frame = pd.DataFrame.from_dict(labels, orient="index", columns=list(CLASSES)).astype(int)
    write_rsna_csv(frame, root / "stage_2_train.csv")
    return root


def test_prepare_builds_and_resumes_a_cache(tmp_path, monkeypatch, capsys):
    data = _rsna_folder(tmp_path / "rsna")
    out = tmp_path / "cache"
    real_process = prepare._process
    processed = []

    def interrupted(items):
        if processed:
            raise RuntimeError("power cut")
        processed.extend(items)
        return real_process(items)

    monkeypatch.setattr(prepare, "_process", interrupted)
    with pytest.raises(RuntimeError, match="power cut"):
        prepare.prepare(data, out, size=32, workers=0, progress=False)
    assert len(processed) == 16  # one chunk recorded before the "crash"

    monkeypatch.setattr(prepare, "_process", lambda items: processed.extend(items) or real_process(items))
    cache = prepare.prepare(data, out, size=32, workers=0, progress=False)
    assert len(processed) == 21  # only the 5 rows left were read again

    frame = cache.frame
    assert len(frame) == 21 and cache.images.shape == (21, 3, 32, 32)
    assert frame["path"].tolist() == sorted(frame["path"])
    bad = frame[frame["path"].str.contains("corrupt")].iloc[0]
    assert bad["problem"] and not bad["kept"]
    blank = frame[frame["sop_uid"] == "ID_000000013"].iloc[0]
    assert blank["brain_fraction"] < 0.2 and not blank["kept"] and pd.isna(blank["problem"])
    assert frame["kept"].sum() == 19
    assert frame.loc[frame["sop_uid"] == "ID_000000000", "any"].item() == 1
    assert sorted(frame["slice_index"][frame["patient_id"] == "P0"]) == list(range(10))
    assert cache.images[0].max() > 0  # written by the worker into the shared memmap
    problems = pd.read_csv(out / "problems.csv")
    assert problems["path"].str.endswith("ID_corrupt.dcm").tolist() == [True]
    assert "problem: " in capsys.readouterr().out  # reported, not silently skipped

    # A finished cache is reopened as is; a new --min-brain re-filters without re-reading.
    assert prepare.prepare(data, out, size=32, workers=0, progress=False).frame["kept"].sum() == 19
    assert prepare.prepare(data, out, size=32, min_brain=0.0, workers=0, progress=False).frame["kept"].sum() == 20
    assert len(processed) == 21


def test_prepare_refuses_a_cache_of_other_data(tmp_path):
    data = _rsna_folder(tmp_path / "rsna", n=3)
    prepare.prepare(data, tmp_path / "cache", size=32, workers=0, progress=False)
    (tmp_path / "cache" / "cache.json").write_text(json.dumps({"size": 64, "files_sha256": "x", "complete": False}))
    with pytest.raises(SystemExit, match="other files or size"):
        prepare.prepare(data, tmp_path / "cache", size=32, workers=0, progress=False)


@pytest.mark.slow
def test_prepare_and_explore_real_rsna_sample(shared_data, tmp_path):
    out = tmp_path / "cache"
    assert prepare.main([str(shared_data / "rsna-sample"), "--out", str(out), "--size", "64", "--workers", "2"]) == 0
    cache = Cache.open(out)
    frame = cache.frame
    assert len(frame) == 235 and frame["problem"].isna().all() and frame["patient_id"].nunique() == 7
    assert set(frame["bits_stored"]) == {12, 16}
    assert frame.loc[frame["kept"], "any"].sum() > 0 and frame["epidural"].sum() == 0
    report = explore.main([str(out), "--examples", "1"])
    assert "Subtype prevalence" in report.read_text()
    # DICOM readable: every preset window, through the cache's own crop and resize (so the model's three match).
    row = int(np.flatnonzero(frame["kept"])[0])
    stack, names = explore._windows_of(cache, row)
    assert names == list(PRESETS) and stack.shape == (len(PRESETS), 64, 64)
    assert np.array_equal(stack[: len(MODEL_WINDOWS)], cache.images[row])


def test_explore_report_on_synthetic_cache(cache, tmp_path):
    report = explore.main([str(cache.root), "--out", str(tmp_path / "r.html")])
    text = report.read_text()
    for title in ("Label balance", "Subtype prevalence", "BitsStored", "Brain-pixel fraction", "no bleed"):
        assert title in text
    # No DICOM behind a synthetic cache: the cached channels are shown, named by the cache's windows.
    stack, names = explore._windows_of(cache, 5)
    assert names == [w.name for w in MODEL_WINDOWS] and np.array_equal(stack, cache.images[5])


# --------------------------------------------------------------------------- compare / bench


@pytest.mark.slow
def test_compare_tabulates_each_architecture(cache, tmp_path):
    table = compare.main(["--archs", "resnet18,efficientnet_b0", "--out", str(tmp_path), "--", "--data", str(cache.root),
                          "--max-steps", "1", *TINY])  # fmt: skip
    lines = table.splitlines()
    assert lines[0].startswith("| architecture | accuracy | accuracy_multi")
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["resnet18", "efficientnet_b0"]
    assert (tmp_path / "compare.md").read_text().endswith(table)


def test_bench_reports_img_per_second(capsys):
    results = bench.main(["--devices", "cpu", "--archs", "resnet18", "--size", "64", "--batch-size", "4", "--steps", "1",
                          "--warmup", "1", "--workers", "0"])  # fmt: skip
    assert [r["mode"] for r in results] == ["loader", "model", "end to end"]
    assert all(r["img/s"] > 0 for r in results)
    assert "| resnet18 | cpu | end to end |" in capsys.readouterr().out


# --------------------------------------------------------------------------- real training layouts, masked labels


def test_masked_bce_leaves_unknown_labels_out():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    target = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    known = torch.nn.functional.binary_cross_entropy_with_logits(logits[target >= 0], target[target >= 0])
    assert fit.MaskedBCEWithLogits()(logits, target).item() == pytest.approx(known.item())


@pytest.fixture(scope="module")
def png_sets(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny RSNA-PNG folder (with one unlabelled image) and a tiny PHE-SICH folder."""
    from ich.labels import to_rsna
    from tests.test_datasets import write_png

    root = tmp_path_factory.mktemp("pngsets")
    rsna = root / "mine-rsna"
    ids = [f"ID_{i:03d}" for i in range(12)]
    for i, name in enumerate([*ids, "ID_unlabelled"]):
        write_png(rsna / "stage_2_train_png" / f"{name}.png", value=60 + 10 * i, size=48)
    labels = pd.DataFrame(0, index=pd.Index(ids, name="sop_uid"), columns=list(CLASSES))
    labels.iloc[::2, [0, 5]] = 1
    to_rsna(labels).to_csv(rsna / "stage_2_train.csv", index=False)
    phe = root / "mine-phe"
    rows = []
    for p in range(3):
        for s in range(2):
            name = f"{p:04d}_{s:02d}"
            write_png(phe / "images" / f"{name}.png", size=40)
            write_png(phe / "masks" / f"{name}.png", 255, size=40)
            rows.append({"image": name, "patient": f"{p:04d}", "slice": s, "hemorrhage": s})
    pd.DataFrame(rows).to_csv(phe / "labels.csv", index=False)
    return rsna, phe


def test_prepare_mixes_layouts_with_a_source_column(png_sets, tmp_path, capsys):
    from ich.windowing import BRAIN_INPUT, THREE_WINDOW_INPUT

    rsna, phe = png_sets
    with pytest.raises(SystemExit, match="brain-window images only"):
        prepare.prepare([rsna, phe], tmp_path / "wrong", size=32, spec=THREE_WINDOW_INPUT, workers=0, progress=False)
    cache = prepare.prepare(
        [rsna, phe], tmp_path / "c", size=32, spec=BRAIN_INPUT, min_brain=0.0, workers=0, progress=False
    )
    frame = cache.frame
    assert frame["source"].value_counts().to_dict() == {"rsna-png": 12, "phe-sich": 6}
    assert cache.info["input"] == "brain" and cache.info["clip"] and cache.info["windows"][0] == ["brain", 40, 80]
    phe_rows = frame[frame["source"] == "phe-sich"]
    assert (phe_rows.loc[phe_rows["any"] == 1, "intraventricular"] == -1).all()
    assert phe_rows["patient_id"].nunique() == 3 and frame["problem"].isna().all()
    images = cache.images
    assert (images[:, 0] == images[:, 1]).all() and images.max() > 0
    problems = pd.read_csv(tmp_path / "c" / "problems.csv")
    assert problems["reason"].tolist() == ["no label row in stage_2_train.csv"]
    assert "ID_unlabelled.png: no label row" in capsys.readouterr().out


def test_fit_validates_on_the_asked_source_only(png_sets, tmp_path):
    from ich.windowing import BRAIN_INPUT

    cache = prepare.prepare(
        list(png_sets), tmp_path / "c", size=32, spec=BRAIN_INPUT, min_brain=0.0, workers=0, progress=False
    )
    base = [
        "--data",
        str(cache.root),
        "--task",
        "multilabel",
        "--epochs",
        "1",
        "--max-steps",
        "1",
        "--out",
        str(tmp_path),
        *TINY,
    ]
    meta = fit.main([*base, "--val-sources", "rsna-png", "--folds", "3", "--fold", "1", "--tta-flip", "--name", "f1"])
    valid = pd.read_parquet(tmp_path / "f1.valid.parquet")
    assert (valid["source"] == "rsna-png").all() and len(valid) == 4
    assert meta["training"]["train_slices"] == 18 - 4 and meta["tta_flip"] and meta["clip"]
    assert valid["p_any"].between(0, 1).all() and set(valid["any"]) <= {0, 1}
    with pytest.raises(SystemExit, match="holds sources"):
        fit.main([*base, "--val-sources", "cq500"])
    everything = fit.main([*base, "--val-frac", "0", "--name", "all"])
    assert everything["training"]["train_slices"] == 18 and everything["training"]["valid_slices"] == 0


def test_pack_round_trip_is_byte_for_byte(png_sets, tmp_path):
    from ich.windowing import BRAIN_INPUT
    from train import pack

    cache = prepare.prepare(
        list(png_sets), tmp_path / "c", size=32, spec=BRAIN_INPUT, min_brain=0.0, workers=0, progress=False
    )
    packed = pack.pack(cache.root, tmp_path / "p")
    again = pack.unpack(packed, tmp_path / "u")
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(cache.images))
    pd.testing.assert_frame_equal(again.frame, cache.frame)
    assert again.info == cache.info
    with pytest.raises(SystemExit, match="channels differ"):
        pack.pack(synthetic_cache(tmp_path / "three", n=8, size=16).root, tmp_path / "p3")


def test_lossy_pack_is_close_and_says_so_in_the_trained_model(png_sets, tmp_path):
    from ich.windowing import BRAIN_INPUT
    from train import pack

    cache = prepare.prepare(
        list(png_sets), tmp_path / "c", size=64, spec=BRAIN_INPUT, min_brain=0.0, workers=0, progress=False
    )
    # (How much smaller than lossless is a property of real CT noise: see the README, not these drawings.)
    again = pack.unpack(pack.pack(cache.root, tmp_path / "q", quality=50), tmp_path / "u")
    original, decoded = np.asarray(cache.images, np.int16), np.asarray(again.images, np.int16)
    assert (decoded[:, 0] == decoded[:, 2]).all() and not np.array_equal(decoded, original)
    error = np.abs(decoded - original).mean()
    assert 0 < error < 8 and again.info["webp_mean_abs_error"] == pytest.approx(error, abs=1e-3)
    pd.testing.assert_frame_equal(again.frame, cache.frame)
    meta = fit.main(["--data", str(again.root), "--task", "multilabel", "--epochs", "1", "--max-steps", "1",
                     "--val-frac", "0", "--out", str(tmp_path), "--name", "m", *TINY])  # fmt: skip
    assert meta["training"]["lossy_pack"] == {
        "webp_quality": 50,
        "webp_mean_abs_error": again.info["webp_mean_abs_error"],
    }
    with pytest.raises(SystemExit, match="quality runs from 1 to 100"):
        pack.pack(cache.root, tmp_path / "bad", quality=0)


def test_bundle_train_only_trains_every_run_and_writes_no_checkpoint(png_sets, tmp_path):
    """The GPU half of a bundle (scripts/device_bundle.sh): five folds and the final run, nothing in --out."""
    from ich.windowing import BRAIN_INPUT
    from train import bundle

    cache = prepare.prepare(
        list(png_sets), tmp_path / "c", size=32, spec=BRAIN_INPUT, min_brain=0.0, workers=0, progress=False
    )
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--cache", str(cache.root), "--size", "32", "--work", str(work), "--out", str(out), "--train-only",
            "--max-steps", "1", "--batch-size", "8", "--workers", "0", "--device", "cpu"]  # fmt: skip
    assert bundle.main(argv) == 0
    names = ["final", *(f"fold{k}" for k in range(bundle.FOLDS))]
    assert all((work / "run" / f"{n}.args.json").is_file() for n in names) and not out.exists()
    oof = bundle.out_of_fold([work / "run" / f"{n}.json" for n in names[1:]])
    assert sorted(oof["row"]) == sorted(np.flatnonzero(cache.frame["source"] == "rsna-png"))


@pytest.mark.slow
def test_device_script_round_trip(png_sets, tmp_path):
    """scripts/device_bundle.sh, dry run on the CPU (runs in parallel processes, --jobs): what it returns fits
    the device tool, and a bundle here reuses every run."""
    from ich.windowing import BRAIN_INPUT
    from train import bundle, pack

    cache = prepare.prepare(
        list(png_sets), tmp_path / "c", size=32, spec=BRAIN_INPUT, min_brain=0.0, workers=0, progress=False
    )
    packed = pack.pack(cache.root, tmp_path / "pack", quality=40)
    out, work = tmp_path / "out", tmp_path / "work"
    env = os.environ | {"OUT": str(out), "ICH_WORK": str(work), "ICH_DEVICE": "cpu", "ICH_JOBS": "2",
                        "PYTHON": sys.executable}  # fmt: skip
    recipe = ["--max-steps", "1", "--batch-size", "8"]
    proc = subprocess.run(["bash", "scripts/device_bundle.sh", str(packed), *recipe], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert {"train.log", "latency.json", "device.txt", "run.tar.part-aa"} <= set(files) and len(files) <= 8
    assert all((out / f).stat().st_size <= 16 * 2**20 for f in files)
    assert json.loads((out / "latency.json").read_text())["warm_calls"] == 9
    back = tmp_path / "back"
    back.mkdir()
    parts = b"".join((out / f).read_bytes() for f in files if f.startswith("run.tar.part-"))
    subprocess.run(["tar", "-x", "-C", str(back)], input=parts, check=True)
    assert not list((back / "run").glob("fold*.safetensors")) and (back / "run" / "final.safetensors").is_file()
    # Here the cache comes from the original slices (another path, lossless): the runs are reused all the same.
    here = pack.unpack(pack.pack(cache.root, tmp_path / "lossless"), tmp_path / "c2")
    argv = ["--cache", str(here.root), "--size", "32", "--work", str(back), "--train-only", *recipe, "--device", "cpu"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(bundle.fit, "main", lambda argv: pytest.fail("a run was retrained"))
        assert bundle.main(argv) == 0
