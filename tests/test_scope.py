"""ich.scope: series outside what the model was validated on, and what a score means."""

from __future__ import annotations

import json

import pytest
from pydicom.uid import generate_uid

from ich import dicom, scope
from ich.labels import NOT_NAMED
from ich.worklist import Worklist, ingest
from tests.dicom_factory import make_ct, to_bytes
from tests.helpers import ROOT, FakePredictor


def series_of(**header) -> dicom.Series:
    study, uid = generate_uid(), generate_uid()
    thickness = float(header.pop("SliceThickness", 5.0))
    files = [
        dicom.Upload(
            f"{i}.dcm",
            to_bytes(
                make_ct(
                    z=thickness * i, series_uid=uid, study_uid=study, instance=i + 1, SliceThickness=thickness, **header
                )
            ),
        )
        for i in range(3)
    ]
    return dicom.load(files).series[0]


def test_a_routine_adult_axial_series_is_in_scope():
    assert scope.out_of_scope(series_of(PatientAge="064Y")) == []


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ({"SliceThickness": 0.625}, "thin slices (0.6 mm)"),
        ({"ContrastBolusAgent": "IOPAMIDOL"}, "contrast-enhanced"),
        ({"PatientAge": "007Y"}, "under 18"),
        ({"PatientAge": "018M"}, "under 18"),
        ({"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]}, "not an axial series"),  # sagittal
    ],
)
def test_what_takes_a_series_out_of_scope(header, words):
    (line,) = scope.out_of_scope(series_of(**header))
    assert words in line


def test_ingest_keeps_the_scope_lines_with_the_study(tmp_path):
    wl = Worklist(tmp_path)
    files = [
        dicom.Upload(
            f"{i}.dcm", to_bytes(make_ct(z=i, series_uid=uid, study_uid=study, instance=i + 1, SliceThickness=1.0))
        )
        for study, uid in [(generate_uid(), generate_uid())]
        for i in range(3)
    ]
    (study_id,) = ingest(wl, FakePredictor(), files).added
    assert [n for n in wl.study(study_id).notes if n.startswith(scope.NOTE_PREFIX)] == [
        scope.NOTE_PREFIX + "thin slices (1.0 mm): the model learned from ~5 mm slices"
    ]


def test_the_bundled_checkpoint_explains_its_flag_and_numbers():
    metadata = json.loads(next((ROOT / "weights").glob("ich-*.json")).read_text())
    meaning = scope.score_meaning(metadata)
    assert (
        f"{metadata['thresholds']['any']:.0%} or more" in meaning and "95" in meaning and 'not "hemorrhage"' in meaning
    )
    lines = scope.validation_lines(metadata)
    assert len(lines) == 6 and lines[0].startswith("- any: AUC 0.") and "–" in lines[0]
    unnamed = [c for c, t in metadata["thresholds"].items() if t >= NOT_NAMED]  # the bundled model: epidural
    assert [line.split(":")[0] for line in lines if "not named" in line] == [f"- {c}" for c in unnamed]
    # Issue 22: no subtype named at a probability a reader calls negligible, and the dashboard says the rule.
    from train.series_policy import NAMING_FLOOR

    subtypes = {c: t for c, t in metadata["thresholds"].items() if c != "any"}
    assert all(NAMING_FLOOR <= t for t in subtypes.values()), subtypes
    rule = scope.subtype_rule(metadata["thresholds"])
    lowest = min(t for t in subtypes.values() if t < NOT_NAMED)
    assert rule.startswith("A subtype is named only on a slice called bleeding") and f"({lowest:.0%}–" in rule
    assert rule.endswith(f"; not named by this model: {', '.join(unnamed)}.")
    assert scope.subtype_rule({"any": 0.3, "subdural": 0.25}).endswith(
        "(25%); not named by this model: epidural, intraparenchymal, intraventricular, subarachnoid."
    )
    named = lines[2]  # intraparenchymal, which the bundled model names
    quiet = metadata | {"thresholds": metadata["thresholds"] | {"intraparenchymal": NOT_NAMED}}
    assert scope.validation_lines(quiet)[2] == named + (
        "; not named by this model (never the likely subtype at a probability worth naming)"
    )
