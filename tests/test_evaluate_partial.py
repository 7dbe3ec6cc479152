"""`ich evaluate` on sets that label only some classes, and on PNG series named by a series.csv."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from ich import datasets, evaluate
from ich.labels import CLASSES, INDEX_NAME, SUBTYPES
from tests.helpers import evaluate_image_folder


def png_series(root, labelled=("any",), series=3, slices=5):
    """``series`` series of ``slices`` PNGs, the first slice of every other series bleeding; labels only for
    ``labelled``; a series.csv naming each slice's series and place, listed out of order."""
    rng = np.random.default_rng(0)
    rows, ids = [], []
    for s in range(series):
        for k in range(slices):
            image_id = f"ID_s{s}k{k}"
            img = np.zeros((64, 64), np.uint8)
            img[12:52, 12:52] = rng.integers(60, 200, (40, 40))
            (root / "stage_2_train_png").mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "stage_2_train_png" / f"{image_id}.png"), img)
            ids.append(image_id)
            rows.append({"ID": image_id, "patient": f"p{s}", "slice": k + 1})
    pd.DataFrame(rows[::-1]).to_csv(root / "series.csv", index=False)
    truth = pd.DataFrame(0, index=pd.Index(ids, name=INDEX_NAME), columns=list(CLASSES))
    truth.loc[[f"ID_s{s}k0" for s in range(0, series, 2)], ["any", "subdural"]] = 1
    long = pd.DataFrame(
        [{"ID": f"{i}_{c}", "Label": int(truth.at[i, c])} for i in ids for c in labelled]
    )  # fmt: skip
    long.to_csv(root / "stage_2_train.csv", index=False)
    return truth


def test_classes_a_set_does_not_label_are_unknown_not_an_error(tmp_path):
    png_series(tmp_path, labelled=("any", "subdural"))
    labels = datasets.read_labels(tmp_path / "stage_2_train.csv")
    assert (labels[["epidural", "intraparenchymal"]] == datasets.UNKNOWN).all().all()
    assert labels["subdural"].sum() == 2 and set(labels["any"]) == {0, 1}
    # An image that lacks one row of a class the set does label: that cell only is unknown.
    long = pd.read_csv(tmp_path / "stage_2_train.csv")
    long[long["ID"] != "ID_s1k1_subdural"].to_csv(tmp_path / "some.csv", index=False)
    some = datasets.read_labels(tmp_path / "some.csv")
    assert some.at["ID_s1k1", "subdural"] == datasets.UNKNOWN and (some["subdural"] == datasets.UNKNOWN).sum() == 1


def test_a_series_csv_groups_pngs_into_series_in_slice_order(tmp_path):
    png_series(tmp_path)
    manifest = datasets.read_source(tmp_path).manifest
    assert manifest["patient_id"].nunique() == 3
    first = manifest[manifest["patient_id"] == manifest["patient_id"].iloc[0]]
    assert list(first["image_id"]) == [f"ID_s0k{k}" for k in range(5)]  # the csv listed them backwards


def test_evaluate_judges_only_labelled_classes_and_scores_series_by_the_product_rule():
    ids = [f"ID_{i}" for i in range(8)]
    probs = np.linspace(0.1, 0.9, 8)
    predictions = pd.DataFrame(
        {"study_uid": ["a"] * 4 + ["b"] * 4, "series_uid": ["a"] * 4 + ["b"] * 4, "slice_index": list(range(4)) * 2,
         "slab": list(range(4)) * 2} | {c: probs for c in CLASSES},
        index=pd.Index(ids, name=INDEX_NAME),
    )  # fmt: skip
    labels = pd.DataFrame(datasets.UNKNOWN, index=predictions.index, columns=list(CLASSES))
    labels["any"] = [0, 0, 0, 0, 0, 0, 1, 1]
    report = evaluate.evaluate(predictions, labels, {"any": 0.5}, top_k=2, bootstrap=10)
    assert report["classes"] == ["any"] and report["not_labelled"] == list(SUBTYPES)
    scores = {r["series_uid"]: r["score"] for r in report["series_scores"]}
    assert scores == {"a": pytest.approx(np.mean(probs[2:4])), "b": pytest.approx(np.mean(probs[6:8]))}
    assert report["series"]["n"] == 2
    text = evaluate.report_markdown(report)
    assert "not labelled: epidural" in text and "2 series" in text


@pytest.mark.slow
def test_evaluate_cli_on_png_series_with_partial_labels(tmp_path):
    root = tmp_path / "pngs"
    png_series(root)
    out = evaluate_image_folder(root, tmp_path)
    report = json.loads((out / "report.json").read_text())
    assert report["classes"] == ["any"] and report["series"]["n"] == 3 and report["slice"]["n"] == 15
    assert {r["slices"] for r in report["series_scores"]} == {5}
