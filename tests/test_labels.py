"""ich.labels: class order and the RSNA ``ID,Label`` CSV."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from ich.labels import CLASSES, INDEX_NAME, SUBTYPES, from_rsna, read_rsna_csv, to_rsna, write_rsna_csv


def _wide() -> pd.DataFrame:
    frame = pd.DataFrame(
        [[1, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0]],
        columns=list(CLASSES),
        index=pd.Index(["ID_000012eaf", "1.2.826.0.1.3680043.8.498.1"], name=INDEX_NAME),
    )
    return frame


def test_class_order():
    assert CLASSES == ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
    assert SUBTYPES == CLASSES[1:]


def test_round_trip_through_csv(tmp_path):
    path = tmp_path / "labels.csv"
    write_rsna_csv(_wide(), path)
    lines = path.read_text().splitlines()
    assert lines[0] == "ID,Label"
    assert len(lines) == 1 + 6 * 2
    # The competition's own row order: subtypes, then "any"; SOP UIDs with underscores survive.
    assert [line.split(",")[0] for line in lines[1:7]] == [f"ID_000012eaf_{c}" for c in (*SUBTYPES, "any")]
    pd.testing.assert_frame_equal(read_rsna_csv(path), _wide().sort_index())


def test_several_frames_are_concatenated():
    buffer = io.StringIO()
    write_rsna_csv([_wide().iloc[:1], _wide().iloc[1:]], buffer)
    buffer.seek(0)
    assert len(read_rsna_csv(buffer)) == 2


def test_duplicates_dropped_conflicts_rejected():
    long = to_rsna(_wide())
    assert len(from_rsna(pd.concat([long, long.iloc[:3]]))) == 2
    conflict = long.iloc[:1].assign(Label=1 - long["Label"].iloc[0])
    with pytest.raises(ValueError, match="conflicting"):
        from_rsna(pd.concat([long, conflict]))


@pytest.mark.parametrize(
    "long, message",
    [
        (pd.DataFrame({"ID": ["ID_1_any"], "Value": [1]}), "expected columns"),
        (pd.DataFrame({"ID": ["ID_1_bleed"], "Label": [1]}), "unknown classes"),
        (pd.DataFrame({"ID": ["ID_1_any", "ID_1_epidural"], "Label": [1, 0]}), "without a row"),
    ],
)
def test_malformed_input_is_rejected(long, message):
    with pytest.raises(ValueError, match=message):
        from_rsna(long)


def test_to_rsna_needs_every_class():
    with pytest.raises(ValueError, match="lack columns"):
        to_rsna(_wide().drop(columns="subdural"))


def test_reads_the_real_rsna_csv(shared_data):
    labels = read_rsna_csv(shared_data / "rsna-sample" / "stage_2_train.csv")
    assert len(labels) == 235
    assert list(labels.columns) == list(CLASSES)
    assert (labels["any"] == labels[list(SUBTYPES)].max(axis=1)).all()
    assert labels["epidural"].sum() == 0 and labels["any"].sum() > 0
