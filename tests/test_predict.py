"""ich.inference, `ich predict` and `ich evaluate`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from pydicom.uid import generate_uid

from ich import dicom
from ich.inference import Predictor, study_score
from ich.labels import CLASSES
from tests.dicom_factory import make_ct, to_bytes
from tests.helpers import ROOT, evaluate_image_folder, make_checkpoint


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return Predictor.from_checkpoint(tiny_checkpoint, device="cpu")


def synthetic_series(n=4) -> dicom.Series:
    series, study = generate_uid(), generate_uid()
    uploads = [
        dicom.Upload(f"{i}.dcm", to_bytes(make_ct(z=5.0 * i, series_uid=series, study_uid=study))) for i in range(n)
    ]
    return dicom.load(uploads).series[0]


def test_study_score_is_top2_mean():
    assert study_score(np.array([0.1, 0.9, 0.3, 0.7])) == pytest.approx(0.8)
    assert study_score(np.array([0.4])) == pytest.approx(0.4)
    assert np.isnan(study_score(np.array([])))


def test_predict_series(predictor):
    series = synthetic_series(5)
    result = predictor.predict_series(series)
    assert result.probs.shape == (5, 6) and result.sop_uids == series.sop_uids
    assert np.all((result.probs >= 0) & (result.probs <= 1))
    assert result.score == pytest.approx(study_score(result.probs[:, 0]), abs=1e-6)
    assert result.top_subtype in CLASSES[1:]
    assert result.flagged == (result.score >= predictor.thresholds["any"])
    # Deterministic: the model is in eval mode and never changed by a prediction.
    np.testing.assert_array_equal(predictor.predict_series(series).probs, result.probs)


def test_binary_checkpoint_leaves_subtypes_empty(tmp_path):
    path = make_checkpoint(tmp_path / "binary", classes=("any",))
    result = Predictor.from_checkpoint(path, device="cpu").predict_series(synthetic_series(3))
    assert np.isfinite(result.probs[:, 0]).all() and np.isnan(result.probs[:, 1:]).all()
    assert result.top_subtype is None


def test_checkpoint_without_any_is_refused_by_name(tmp_path):
    """The study score and flag come from 'any': a subtypes-only checkpoint would score every study NaN."""
    path = make_checkpoint(tmp_path / "subtypes", classes=("epidural", "subdural"))
    with pytest.raises(ValueError, match=r"predicts \['epidural', 'subdural'\] but not 'any'"):
        Predictor.from_checkpoint(path, device="cpu")


def test_the_top_subtype_is_one_the_viewer_names_on_some_slice(tmp_path):
    """Issue 22: the worklist showed a subtype no slice named (peak 0.18-0.36 under its threshold)."""
    from ich.labels import NOT_NAMED

    thresholds = dict.fromkeys(CLASSES, 0.5) | {"epidural": NOT_NAMED}
    pred = Predictor.from_checkpoint(make_checkpoint(tmp_path / "m", thresholds=thresholds), device="cpu")

    def top(*rows: dict[str, float]) -> str | None:
        probs = np.array([[row.get(c, 0.01) for c in CLASSES] for row in rows], np.float32)
        return pred.summarize([str(i) for i in range(len(rows))], probs).top_subtype

    # epidural is not named by this checkpoint: shown as a probability, never the headline
    assert top({"any": 0.9, "epidural": 0.99, "subdural": 0.6}) == "subdural"
    assert top({"any": 0.9, "intraparenchymal": 0.45, "subdural": 0.55}) == "subdural"  # the higher one is not named
    assert top({"any": 0.9, "intraparenchymal": 0.45}) is None  # nothing named: no subtype on the worklist
    # a slice called clear names no subtype, however high its subtype probability
    assert top({"any": 0.1, "subdural": 0.9}, {"any": 0.6, "subarachnoid": 0.7}) == "subarachnoid"


def test_tampered_weights_refused(tmp_path):
    path = make_checkpoint(tmp_path / "m")
    weights = path.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        Predictor.from_checkpoint(path, device="cpu")


def run_ich(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ich", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_predict_cli_every_slice(shared_data, tiny_checkpoint, tmp_path):
    out = tmp_path / "sub.csv"
    proc = run_ich(
        "predict",
        str(shared_data / "rsna-sample"),
        "--weights",
        str(tiny_checkpoint),
        "--out",
        str(out),
        "--timings",
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    timings = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(timings) == {"load_s", "read_s", "preprocess_s", "infer_s", "total_s"}
    assert all(v >= 0 for v in timings.values())
    sub = pd.read_csv(out)
    assert list(sub.columns) == ["ID", "Label"] and sub["Label"].between(0, 1).all()
    labels = pd.read_csv(shared_data / "rsna-sample/stage_2_train.csv")
    assert set(sub["ID"]) == set(labels["ID"])  # every slice, all six classes, same ID format
    assert len(sub) == 235 * 6


def test_predict_cli_keeps_going_past_bad_files(tmp_path, tiny_checkpoint):
    series, study = generate_uid(), generate_uid()
    for i in range(4):
        (tmp_path / f"{i}.dcm").write_bytes(to_bytes(make_ct(z=5.0 * i, series_uid=series, study_uid=study)))
    (tmp_path / "2.dcm").write_bytes((tmp_path / "2.dcm").read_bytes()[:-64])
    out = tmp_path / "out" / "sub.csv"
    proc = run_ich("predict", str(tmp_path), "--weights", str(tiny_checkpoint), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert len(pd.read_csv(out)) == 3 * 6
    assert "2.dcm: pixel data too short" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_warm_up_sends_one_blank_slice_shaped_like_a_real_one(tiny_checkpoint, monkeypatch):
    """The warm-up must meet the kernels a study will: the same input shape as a preprocessed slice."""
    pred = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    seen: list[tuple[int, ...]] = []
    real = pred.predict_batch
    monkeypatch.setattr(pred, "predict_batch", lambda batch: seen.append(batch.shape) or real(batch))
    pred.warm_up()
    slice_shape = pred.preprocess(np.full((96, 80), 40.0, np.float32)).shape
    assert seen == [(1, *slice_shape)]


def test_predict_cli_repeat_reports_warm_calls(tmp_path, tiny_checkpoint):
    series, study = generate_uid(), generate_uid()
    for i in range(3):
        (tmp_path / f"{i}.dcm").write_bytes(to_bytes(make_ct(z=5.0 * i, series_uid=series, study_uid=study)))
    out = tmp_path / "sub.csv"
    args = ("predict", str(tmp_path), "--weights", str(tiny_checkpoint), "--out", str(out), "--quiet", "--timings")
    proc = run_ich(*args, "--repeat", "3")
    assert proc.returncode == 0, proc.stderr
    timings = json.loads(proc.stdout.strip().splitlines()[-1])
    phases = {"read_s", "preprocess_s", "infer_s", "total_s"}
    assert set(timings) == {"load_s", "warm_calls", *phases, *(f"warm_{k}" for k in phases)}
    assert timings["warm_calls"] == 2 and timings["warm_total_s"] >= timings["warm_infer_s"] > 0
    assert len(pd.read_csv(out)) == 3 * 6  # the CSV holds the first call's scores, once
    refused = run_ich(*args[:-1], "--repeat", "3")  # without --timings, repeating would time nothing
    assert refused.returncode == 1 and "--repeat 3: give a count of 1 or more, with --timings" in refused.stderr


def test_evaluate_cli(shared_data, tiny_checkpoint, tmp_path):
    proc = run_ich(
        "evaluate",
        str(shared_data / "rsna-sample"),
        "--weights",
        str(tiny_checkpoint),
        "--out",
        str(tmp_path),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["slice"]["n"] == 235 and report["series"]["n"] == 7
    assert report["slice"]["per_class"]["any"]["prevalence"] == pytest.approx(33 / 235)
    assert report["slice"]["per_class"]["epidural"]["auc"] is None  # no epidural slice: strict JSON null, not NaN
    assert "| subdural |" in (tmp_path / "report.md").read_text()


def test_evaluate_cli_scores_each_exam_on_its_soft_tissue_series(tiny_checkpoint, tmp_path):
    """Two exams of five series each (scout, soft tissue, bone kernel, coronal reformat, dose page) in the RSNA
    layout: one exams.csv row per exam, scored on its axial soft-tissue series, the others named with why not."""
    from tests.test_exam_intake import exam

    data = tmp_path / "data"
    (data / "stage_2_train").mkdir(parents=True)
    exams = [exam(generate_uid()) for _ in range(2)]
    rows = ["ID,Label"]
    for parts in exams:
        for ds in (ds for part in parts.values() for ds in part):
            (data / "stage_2_train" / f"{ds.SOPInstanceUID}.dcm").write_bytes(to_bytes(ds))
            rows += [f"{ds.SOPInstanceUID}_{c},0" for c in CLASSES]
    (data / "stage_2_train.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    proc = run_ich("evaluate", str(data), "--weights", str(tiny_checkpoint), "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(out / "exams.csv")
    assert table["exam"].tolist() == [1, 2] and table["slices"].tolist() == [6, 6]
    assert sorted(table["series_uid"]) == sorted(parts["soft"][0].SeriesInstanceUID for parts in exams)
    assert (table["series_description"] == "Head 5mm soft").all() and table["score"].between(0, 1).all()
    for not_scored in table["not_scored"]:
        assert "Topogram: localizer (scout)" in not_scored and "Head 5mm bone: bone kernel (H70h)" in not_scored
        assert "Coronal MPR: coronal" in not_scored and "Dose report: not a CT image (modality OT)" in not_scored
    report = json.loads((out / "report.json").read_text())
    assert report["slice"]["n"] == 12 and report["series"]["n"] == 2  # the scored series' slices only
    assert len(pd.read_csv(out / "predictions.csv")) == 12 * len(CLASSES)


def test_predict_cli_nothing_readable_exits_2(tmp_path, tiny_checkpoint):
    (tmp_path / "junk.dcm").write_bytes(b"junk")
    out = tmp_path / "sub.csv"
    proc = run_ich("predict", str(tmp_path), "--weights", str(tiny_checkpoint), "--out", str(out), "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert "junk.dcm: not a DICOM file" in proc.stderr and "no readable slice found" in proc.stderr
    assert not out.exists() and "Traceback" not in proc.stderr


def test_predictor_follows_calibration_flip_and_study_rule(tmp_path):
    from ich.windowing import BRAIN_INPUT

    windows = [[x.name, x.level, x.width] for x in BRAIN_INPUT.windows]
    plain = Predictor.from_checkpoint(make_checkpoint(tmp_path / "plain", windows=windows, clip=True), device="cpu")
    calibration = {"method": "platt", "a": dict.fromkeys(CLASSES, 0.5), "b": dict.fromkeys(CLASSES, -1.0)}
    tuned = Predictor.from_checkpoint(
        make_checkpoint(
            tmp_path / "tuned", windows=windows, clip=True, calibration=calibration, tta_flip=True, study_top_k=1
        ),
        device="cpu",
    )
    assert plain.preprocess.clip == (0.0, 80.0) and tuned.top_k == 1 and tuned.tta_flip
    series = synthetic_series(4)
    raw = plain.predict_series(series).probs
    out = tuned.predict_series(series)
    # Same weights (seeded): flip-averaged logits, then sigmoid(0.5 z - 1).
    import torch

    x = plain.to_input(np.stack([plain.preprocess(s.hu) for s in series.slices]))
    with torch.inference_mode():
        z = ((plain.model(x) + plain.model(x.flip(-1))) / 2).numpy()
    np.testing.assert_allclose(out.probs, 1 / (1 + np.exp(-(0.5 * z - 1.0))), rtol=1e-4, atol=1e-6)
    assert not np.allclose(out.probs, raw)
    assert out.score == pytest.approx(out.probs[:, 0].max())  # top-1: the highest slice
    assert "highest slice" in tuned.aggregation


def test_evaluate_cli_on_a_png_layout(tmp_path):
    """`ich evaluate` scores a labelled RSNA-PNG folder and reports per class, without series."""
    import cv2

    from ich.labels import to_rsna

    root = tmp_path / "pngs"
    (root / "stage_2_train_png").mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"ID_{i:04d}" for i in range(12)]
    for i in ids:
        img = np.zeros((96, 96), np.uint8)
        img[20:76, 20:76] = rng.integers(80, 160, (56, 56))
        cv2.imwrite(str(root / "stage_2_train_png" / f"{i}.png"), img)
    labels = pd.DataFrame(0, index=pd.Index(ids, name="sop_uid"), columns=list(CLASSES))
    labels.iloc[::3, [0, 5]] = 1
    to_rsna(labels).to_csv(root / "stage_2_train.csv", index=False)
    out = evaluate_image_folder(root, tmp_path)
    report = json.loads((out / "report.json").read_text())
    assert report["slice"]["n"] == 12 and report["series"] is None
    assert report["slice"]["per_class"]["subdural"]["positives"] == 4
    assert "AUC (95 % CI)" in (out / "report.md").read_text() and (out / "reliability.html").is_file()


def test_predict_reads_zips_inside_folders_and_zips(predictor, tmp_path):
    """Every slice `ich info` finds is scored: a zipped series in a folder, a zip holding a folder, a zip in a zip."""
    import io
    import zipfile

    from ich import evaluate

    series, study = generate_uid(), generate_uid()
    files = {f"s{i}.dcm": to_bytes(make_ct(z=5.0 * i, series_uid=series, study_uid=study)) for i in range(3)}

    def zipped(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return buf.getvalue()

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "series.zip").write_bytes(zipped(files))
    (tmp_path / "holds_folder.zip").write_bytes(zipped({f"study/dicom/{k}": v for k, v in files.items()}))
    (tmp_path / "nested.zip").write_bytes(zipped({"inner.zip": zipped(files), "readme.txt": b"not dicom"}))
    for source in (folder, tmp_path / "holds_folder.zip", tmp_path / "nested.zip"):
        info = dicom.load([source], pixels=False)
        result = evaluate.predict(predictor, [source], progress=False)
        assert len(result.frame) == sum(len(s) for s in info.series) == 3, source
        assert [str(p) for p in result.problems] == [str(p) for p in info.problems], source
        assert result.frame[list(CLASSES)].notna().all().all()


def test_read_member_names_what_is_gone(tmp_path):
    with pytest.raises(dicom.DicomError, match="not a file or a member"):
        dicom.read_member(str(tmp_path / "nothing.zip" / "a.dcm"))
    import zipfile

    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr("x.dcm", b"data")
    assert dicom.read_member(str(tmp_path / "a.zip" / "x.dcm")) == b"data"
    with pytest.raises(dicom.DicomError, match="no longer in its zip"):
        dicom.read_member(str(tmp_path / "a.zip" / "y.dcm"))


def test_evaluate_says_when_the_model_trained_on_the_data(tmp_path):
    from ich import evaluate

    meta = {
        "training": {"sources": {"rsna-png": {"root": str(tmp_path / "rsna-png"), "images": 1, "with_hemorrhage": 0}}}
    }
    assert evaluate.trained_on(meta, tmp_path / "rsna-png")
    assert not evaluate.trained_on(meta, tmp_path / "rsna-sample") and not evaluate.trained_on({}, tmp_path)
    report = {"slice": {"n": 0, "accuracy": 0, "accuracy_multi": 0, "weighted_log_loss": 0, "per_class": {}},
              "unlabelled_slices": 0, "series": None, "trained_on_this_data": True}  # fmt: skip
    assert "trained on this data" in evaluate.report_markdown(report)
