"""train.bundle: the real slices it trains on never include the real test series; its card matches weights/."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from ich.labels import CLASSES, read_rsna_csv
from train import bundle

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def test_real_training_slices_exclude_test_series(shared_data):
    files, labels = bundle.real_training_slices(shared_data)
    assert list(labels.columns) == list(CLASSES) and set(labels.index) == set(files)
    assert len(files) == 26 + 5 + len(range(0, 238, bundle.CQ500_STRIDE))
    assert labels["epidural"].sum() >= 8  # PhysioNet's epidural slices (+1 RSNA sample)
    assert (labels["any"] == labels[list(CLASSES[1:])].max(axis=1)).all()
    test_sops = set(read_rsna_csv(shared_data / "rsna-sample/stage_2_train.csv").index)
    assert not test_sops & set(files)
    assert not any("rsna-sample" in str(p) for p in files.values())


def test_merge_layouts_links_every_image(shared_data, tmp_path):
    files, labels = bundle.real_training_slices(shared_data)
    first = dict(list(files.items())[:3])
    second = dict(list(files.items())[3:5])
    a = bundle._link_layout(tmp_path / "a", first, labels)
    b = bundle._link_layout(tmp_path / "b", second, labels)
    merged = bundle.merge_layouts(tmp_path / "m", [a, b])
    out = read_rsna_csv(merged / "stage_2_train.csv")
    assert set(out.index) == set(first) | set(second)
    pd.testing.assert_frame_equal(out.sort_index(), labels.loc[sorted(out.index)], check_names=False)
    for sop in out.index:
        link = merged / "stage_2_train" / f"{sop}.dcm"
        assert link.is_symlink() and link.resolve() == files[sop].resolve()


def test_card_rebuilds_the_bundled_model_card():
    """The card's text, from the bundled checkpoint and evaluation.json, is weights/MODEL_CARD.md as committed."""
    card = (WEIGHTS / "MODEL_CARD.md").read_text()
    meta = json.loads((WEIGHTS / f"{bundle.NAME}.json").read_text())
    reports = json.loads((WEIGHTS / "evaluation.json").read_text())
    command = re.search(r"^python -m train\.bundle (.*)$", card, re.M).group(1).split()
    minutes = float(re.search(r"^took (\d+) min here", card, re.M).group(1))
    summary = dict(re.findall(r"^- ([^:\n]+\)): (.+)$", card, re.M))  # "- phantom (stage 1): ..." lines
    assert len(summary) == 4 and len(reports) == 2
    assert bundle._card(meta, reports, summary, True, minutes, command) == card
