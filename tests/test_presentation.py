"""What the dashboard shows, without Streamlit: probabilities, findings lines, tables, the slice curve, images."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.uid import XRayRadiationDoseSRStorage

from ich.exam import SeriesChoice, set_aside
from ich.labels import CLASSES
from ich.presentation import (
    exam_series_table,
    findings_markdown,
    flag_rule,
    local_time,
    pct,
    png_data_uri,
    probability_figure,
    slice_note,
    studies_table,
    worklist_rule,
)


def test_a_probability_is_never_a_bare_certainty():
    assert [pct(v) for v in (0.999, 0.991, 0.5, 0.004, None, float("nan"))] == [">99%", ">99%", "50%", "<1%", "—", "—"]


def test_local_time_reads_like_a_person_writes_it(monkeypatch):
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        assert local_time("2026-11-27T16:12:50+00:00") == "27 Nov 2026, 17:12"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_findings_lines_colour_each_question():
    lines = findings_markdown(frozenset({"subdural", "intraparenchymal"}), frozenset({"subdural"}), "csv")
    assert ":green[hemorrhage: yes / yes ✓]" in lines and ":green[subdural: yes / yes ✓]" in lines
    assert ":red[intraparenchymal: yes / no ✗]" in lines and "(label CSV)" in lines
    assert ":gray[actual: not assessed by the read]" in findings_markdown(
        frozenset({"subdural"}), None, unknown="not assessed by the read"
    )


def slices(p_any: list[float]) -> pd.DataFrame:
    n = len(p_any)
    frame = pd.DataFrame({"index": range(n)})
    for c in CLASSES:
        frame[f"p_{c}"] = p_any if c == "any" else [0.01] * n
        frame[f"y_{c}"] = np.nan
    frame.loc[1, "y_any"] = 1.0
    return frame


def test_the_slice_line_names_what_is_called_and_abbreviates_subtypes():
    row = slices([0.9, 0.2]).iloc[0].copy()
    row["p_subdural"] = 0.8
    thresholds = dict.fromkeys(CLASSES, 0.5)
    assert slice_note(row, thresholds) == "model: any 90% · called hemorrhage (SDH)"
    assert slice_note(slices([0.9, 0.2]).iloc[1], thresholds) == "model: any 20% · not called"


def test_the_curve_has_a_line_per_class_the_actual_marks_and_the_threshold():
    figure = probability_figure(slices([0.9, 0.2, 0.1]), 1, {"any": 0.4})
    names = [t.name for t in figure.data]
    assert names == [*CLASSES, "actual: hemorrhage"] and list(figure.data[-1].x) == [2]
    assert any(s.y0 == 0.4 for s in figure.layout.shapes) and any(s.x0 == 2 for s in figure.layout.shapes)


def test_the_worklist_table_names_the_subtype_only_where_flagged():
    studies = pd.DataFrame(
        {
            "label": ["Study 1 · 4 slices", "Study 2 · 4 slices"],
            "study_datetime": [pd.Timestamp("2026-11-27 16:12"), pd.NaT],
            "description": ["CT head", ""],
            "received": [pd.Timestamp("2026-11-27 16:20")] * 2,
            "source": ["dicom", "upload"],
            "n_slices": [4, 4],
            "thickness": [5.0, None],
            "score": [0.9, 0.2],
            "top_subtype": ["subdural", "epidural"],
            "flagged": [True, False],
            "status": ["new", "new"],
            "updated": [pd.NaT, pd.Timestamp("2026-11-27 16:30")],  # the second re-scored after it was listed
        }
    )
    table = studies_table(studies)
    assert table["Most likely subtype"].tolist() == ["subdural", "—"]
    assert table["Status"].tolist() == ["new", "new · updated"]
    assert table["Likelihood"].tolist() == [90.0, 20.0] and table["Flag"].tolist() == ["⚠ flagged", ""]
    assert table["Exam"].tolist() == ["2026-11-27 16:12", "—"] and table["Description"].tolist() == ["CT head", "—"]


def test_every_series_of_an_exam_says_whether_it_was_scored_and_why_not():
    info = type("Info", (), {})()
    info.exam_series = (
        SeriesChoice("1", 2, "Head soft", 36, 5.0, "H30s", "axial", True, ""),
        SeriesChoice("2", 3, "", 36, 5.0, "H70h", "axial", False, "bone kernel (H70h)"),
    )
    info.exam_series += (
        set_aside(997, "Dose Report", "SR", XRayRadiationDoseSRStorage, "X-Ray Radiation Dose SR Storage", 1),
    )
    table = exam_series_table(info)
    assert list(table.columns[:3]) == ["Series", "Description", "Scored"]  # the reason first, in a narrow panel
    assert table["Scored"].tolist() == [
        "scored",
        "not scored: bone kernel (H70h)",
        "not scored: not a CT image (modality SR, X-Ray Radiation Dose SR Storage)",
    ]
    assert table["Description"].tolist() == ["Head soft", "—", "Dose Report"]
    assert table["Thickness (mm)"].tolist() == ["5", "5", "—"] and table["Plane"].tolist() == ["axial", "axial", "—"]


def test_an_image_is_shown_from_a_data_uri_that_decodes_to_its_pixels():
    image = np.arange(48 * 48, dtype=np.uint8).reshape(48, 48)
    uri = png_data_uri(image)
    assert uri.startswith("data:image/png;base64,")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    np.testing.assert_array_equal(decoded, image)


def test_the_worklist_states_the_flag_rule_of_the_studies_it_lists():
    assert (
        worklist_rule([(6, 0.31), (6, 0.31)])
        == "Likelihood = mean of the 6 highest slice 'any' probabilities; flagged at ≥ 31%."
    )
    assert (
        flag_rule(None, 0.5, fallback="the loaded model's rule")
        == "Likelihood = the loaded model's rule; flagged at ≥ 50%"
    )
    mixed = worklist_rule([(6, 0.31), (3, 0.53), (None, 0.5)])
    assert mixed.startswith("The studies listed were scored under 3 rules")
