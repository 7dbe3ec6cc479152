"""ich.datasets: the real training layouts, and every mismatch in a label file reported."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from ich import datasets
from ich.labels import CLASSES, SUBTYPES, to_rsna


@pytest.mark.parametrize(
    ("name", "layout", "images", "bleeds"),
    [
        ("rsna-png", "rsna-png", 3987, 602),
        ("phe-sich", "phe-sich", 1156, 676),
        ("roboflow-ich", "roboflow-ich", 355, 257),
    ],
)
def test_real_training_sets_read_as_the_readme_says(shared_data, name, layout, images, bleeds):
    source = datasets.read_source(shared_data / name)
    assert source.layout == layout
    assert (len(source.manifest), source.positives) == (images, bleeds) == datasets.EXPECTED[name]
    assert source.problems == []
    m = source.manifest
    assert m["path"].is_unique and (m["source"] == layout).all()
    assert (m["any"] == m[list(SUBTYPES)].max(axis=1).clip(lower=0)).all()
    first = datasets.load_image(m["path"].iloc[0], int(m["rotate"].iloc[0]))
    assert first.dtype == np.uint8 and first.ndim == 2


def test_phe_sich_labels_only_what_it_knows(shared_data):
    m = datasets.read_source(shared_data / "phe-sich").manifest
    bleed = m[m["any"] == 1]
    assert (bleed["intraparenchymal"] == 1).all()
    # Its intraventricular extension (and anything else) is not labelled: unknown, not "no".
    assert (bleed[["epidural", "intraventricular", "subarachnoid", "subdural"]] == datasets.UNKNOWN).all().all()
    assert (m.loc[m["any"] == 0, list(CLASSES)] == 0).all().all()
    assert m["mask"].notna().all() and (m["rotate"] == datasets.PHE_ROTATE).all()
    assert m["patient_id"].nunique() == 119


def test_phe_sich_is_turned_to_radiological_orientation(shared_data):
    """The raw PNG has the face on the left; after the turn the face (orbits, air in sinuses) is at the top."""
    m = datasets.read_source(shared_data / "phe-sich").manifest
    path = m.loc[m["image_id"] == "0001_10", "path"].iloc[0]
    raw, turned = datasets.load_image(path), datasets.load_image(path, datasets.PHE_ROTATE)
    assert turned.shape == raw.shape[::-1]
    np.testing.assert_array_equal(turned[0, :], raw[::-1, 0])  # the left column became the top row


def write_png(path, value=120, size=32):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.zeros((size, size), np.uint8)
    img[8:24, 8:24] = value
    cv2.imwrite(str(path), img)


def test_rsna_png_mismatches_are_reported(tmp_path):
    root = tmp_path / "mine"
    for i in ("ID_a", "ID_b", "ID_orphan"):
        write_png(root / "stage_2_train_png" / f"{i}.png")
    labels = pd.DataFrame(0, index=pd.Index(["ID_a", "ID_b", "ID_missing"], name="sop_uid"), columns=list(CLASSES))
    labels.loc["ID_b", ["any", "subdural"]] = 1
    to_rsna(labels).to_csv(root / "stage_2_train.csv", index=False)
    source = datasets.read_source(root)
    assert source.layout == "rsna-png" and list(source.manifest["image_id"]) == ["ID_a", "ID_b"]
    reasons = {(p.path.rsplit("/", 1)[-1], p.reason) for p in source.problems}
    assert ("ID_orphan.png", "no label row in stage_2_train.csv") in reasons
    assert ("stage_2_train.csv", "label row for ID_missing but no image file") in reasons
    assert source.manifest.set_index("image_id").loc["ID_b", "subdural"] == 1


def test_roboflow_boxes_that_disagree_with_flags_are_reported(tmp_path):
    root = tmp_path / "boxes"
    rows = []
    for i, (flags, box) in enumerate(
        [({"epidural": 1}, "0 0.5 0.5 0.1 0.1"), ({"subdural": 1}, "0 0.5 0.5 0.1 0.1"), ({}, "")]
    ):
        name = f"1_{i}"
        write_png(root / "images" / f"{name}.jpg")
        (root / "labels").mkdir(exist_ok=True)
        (root / "labels" / f"{name}.txt").write_text(box + "\n")
        rows.append({"image": name, "patient": "1", "any": int(bool(flags)), **{c: flags.get(c, 0) for c in SUBTYPES}})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    source = datasets.read_source(root)
    assert source.layout == "roboflow-ich" and len(source.manifest) == 3
    assert [p.reason for p in source.problems] == ["boxes show ['epidural'], labels.csv says ['subdural']"]


def test_counts_that_differ_from_the_readme_are_reported(tmp_path):
    root = tmp_path / "phe-sich"  # named like the real set, so its README counts apply
    write_png(root / "images" / "0001_01.png")
    write_png(root / "masks" / "0001_01.png", 255)
    pd.DataFrame([{"image": "0001_01", "patient": "0001", "slice": 1, "hemorrhage": 1}]).to_csv(
        root / "labels.csv", index=False
    )
    reasons = [p.reason for p in datasets.read_source(root).problems]
    assert reasons == ["1 images / 1 bleeds, the data README says 1156 / 676"]


def test_unknown_layout_and_undecodable_image(tmp_path):
    with pytest.raises(ValueError, match="not a known training layout"):
        datasets.detect_layout(tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="cannot decode"):
        datasets.load_image(bad)
