"""ich.exam: which series of a head-CT exam is scored, and why each other one is not."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydicom.uid import (
    ComprehensiveSRStorage,
    CTImageStorage,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
    generate_uid,
)

from ich import dicom
from ich.dicom.series import Slice, sort_series
from ich.exam import ExamRule, SeriesChoice, choose_series, group_exams, plane, set_aside
from tests.dicom_factory import make_ct, to_bytes

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
ORIGINAL = ("ORIGINAL", "PRIMARY", "AXIAL")


def tilted(degrees: float) -> tuple[float, ...]:
    """Gantry tilt: the slice plane rotated about the patient's left-right axis."""
    a = math.radians(degrees)
    return (1.0, 0.0, 0.0, 0.0, math.cos(a), -math.sin(a))


def series(
    n: int = 30,
    *,
    number: int | None = 2,
    kernel: str = "H30s",
    thickness: float | None = 5.0,
    orientation: tuple[float, ...] | None = AXIAL,
    image_type: tuple[str, ...] = ORIGINAL,
    modality: str = "CT",
    sop_class: str = CTImageStorage,
    study: str = "1.2.826.0.1.3680043.1",
) -> dicom.Series:
    """A headers-only series of ``n`` slices stacked along the slice normal, ``thickness`` apart
    (without orientation or thickness: no positions, so no spacing either)."""
    uid = generate_uid()
    normal = np.array([0.0, 0.0, 1.0]) if orientation is None else np.cross(orientation[:3], orientation[3:])
    slices = [
        Slice(
            path=f"{i}.dcm",
            sop_uid=generate_uid(),
            study_uid=study,
            series_uid=uid,
            patient_id="TEST-0001",
            modality=modality,
            instance_number=i + 1,
            position=None if orientation is None or thickness is None else normal * i * thickness,
            orientation=None if orientation is None else np.asarray(orientation),
            pixel_spacing=(0.5, 0.5),
            thickness=thickness,
            rows=32,
            columns=32,
            bits_stored=16,
            pixel_representation=1,
            slope=1.0,
            intercept=-1024.0,
            window_center=40.0,
            window_width=80.0,
            transfer_syntax="Explicit VR Little Endian",
            image_type=image_type,
            kernel=kernel,
            sop_class_uid=sop_class,
            series_number=number,
        )
        for i in range(n)
    ]
    return sort_series(study, uid, slices)


def by_number(choices: list[SeriesChoice]) -> dict[int | None, SeriesChoice]:
    return {c.number: c for c in choices}


def scored(choices: list[SeriesChoice]) -> SeriesChoice | None:
    picked = [c for c in choices if c.scored]
    assert len(picked) <= 1 and (not picked or choices[0] is picked[0])
    return picked[0] if picked else None


def write_series(folder, n: int, study: str, number: int, spacing: float, orientation=AXIAL, **overrides) -> str:
    uid = generate_uid()
    normal = np.cross(orientation[:3], orientation[3:])
    for i in range(n):
        ds = make_ct(series_uid=uid, study_uid=study, instance=i + 1, SeriesNumber=number, **overrides)
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = list(normal * i * spacing)
        (folder / f"{number}-{i}.dcm").write_bytes(to_bytes(ds))
    return uid


def test_five_series_exam_from_files(tmp_path):
    """Scout, soft axial, bone axial, coronal MPR and thin axial of one exam, written and read as DICOM."""
    study = generate_uid()
    soft = write_series(tmp_path, 30, study, 2, 5.0, ImageType=list(ORIGINAL), ConvolutionKernel="H30s")
    write_series(tmp_path, 1, study, 1, 5.0, ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], ConvolutionKernel="T20f")
    write_series(tmp_path, 30, study, 3, 5.0, ImageType=list(ORIGINAL), ConvolutionKernel="H70h")
    write_series(
        tmp_path, 40, study, 4, 3.0, CORONAL, ImageType=["DERIVED", "SECONDARY", "MPR"], ConvolutionKernel="H30s"
    )
    write_series(tmp_path, 60, study, 5, 0.6, ImageType=list(ORIGINAL), ConvolutionKernel="H30s", SliceThickness=0.6)
    result = dicom.load(tmp_path, pixels=False)
    assert not result.problems and len(group_exams(result.series)) == 1

    choices = choose_series(result.series)

    assert scored(choices) == choices[0]
    assert (choices[0].series_uid, choices[0].reason, choices[0].kernel) == (soft, "", "H30s")
    assert (choices[0].plane, choices[0].thickness, choices[0].n_slices) == ("axial", 5.0, 30)
    assert [(c.number, c.reason) for c in choices[1:]] == [
        (1, "localizer (scout)"),
        (3, "bone kernel (H70h)"),
        (4, "coronal, 90° from axial"),
        (5, "thin (0.6 mm): a thicker series was chosen"),
    ]
    assert all(s.series_uid not in c.reason and study not in c.reason for c in choices for s in result.series)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower-case ImageType, as some exporters write it
def test_reader_fills_the_new_fields_and_defaults_without_them():
    ds = make_ct(ImageType=["original", "primary", "axial"], ConvolutionKernel=["Hr38", "3"], SeriesNumber=7)
    s = dicom.read_slice(dicom.Upload("a.dcm", to_bytes(ds)), pixels=False)
    assert (s.image_type, s.kernel, s.sop_class_uid, s.series_number) == (ORIGINAL, "Hr38\\3", CTImageStorage, 7)
    bare = dicom.read_slice(dicom.Upload("b.dcm", to_bytes(make_ct())), pixels=False)
    assert (bare.image_type, bare.kernel, bare.series_number) == ((), "", None)


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        (AXIAL, ("axial", 0.0)),
        (tilted(8), ("axial", 8.0)),
        (tilted(25), ("oblique", 25.0)),
        (CORONAL, ("coronal", 90.0)),
        (SAGITTAL, ("sagittal", 90.0)),
    ],
)
def test_plane(orientation, expected):
    name, angle = plane(np.asarray(orientation))
    assert (name, round(angle, 6)) == expected


def test_plane_unknown():
    for orientation in (None, np.zeros(6)):
        name, angle = plane(orientation)
        assert name == "unknown" and math.isnan(angle)


def test_gantry_tilt():
    """8° counts as axial; 25° is gantry tilt (scored when alone, second to an axial series); 40° is an oblique reformat."""
    choices = choose_series([series(number=2, orientation=tilted(25)), series(number=3, orientation=tilted(8))])
    assert (choices[0].number, choices[0].plane) == (3, "axial")
    assert by_number(choices)[2].reason == "tilted 25° from axial: a less tilted series was chosen"
    alone = choose_series([series(orientation=tilted(25))])
    assert alone[0].scored and alone[0].plane == "oblique"
    steep = choose_series([series(orientation=tilted(40))])
    assert scored(steep) is None and steep[0].reason == "oblique, 40° from axial"


def test_thin_only_exam_scores_the_thin_series():
    choices = choose_series(
        [series(1, number=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), series(200, thickness=0.625)]
    )
    assert scored(choices) is not None and (choices[0].number, choices[0].thickness) == (2, 0.625)


def test_scout_only_exam_scores_nothing():
    choices = choose_series([series(2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))])
    assert scored(choices) is None and choices[0].reason == "localizer (scout)"
    assert choose_series([]) == []


@pytest.mark.parametrize(
    "kernel",
    ["H70h", "H60s", "Hr64", "J70h", "B70f", "BONE", "BONEPLUS", "EDGE", "LUNG", "YC", "D", "E", "FC30", "FC81"],
)
def test_bone_kernels_lose_to_soft_tissue(kernel):
    choices = choose_series([series(number=1, kernel=kernel), series(number=2, kernel="H30s")])
    assert choices[0].number == 2
    assert by_number(choices)[1].reason == f"bone kernel ({kernel})"


@pytest.mark.parametrize("kernel", ["H30s", "Hr38\\3", "J40s", "STANDARD", "SOFT", "BRAIN", "FC21", "UA", "B", ""])
def test_soft_and_unknown_kernels_count_as_soft_tissue(kernel):
    choices = choose_series([series(number=1, kernel=kernel), series(number=2, kernel="H30s")])
    assert choices[0].number == 1
    assert by_number(choices)[2].reason == "an equivalent series with a lower series number was chosen"


def test_thickness_preference():
    """2.5-5 mm first, then thin (even with many more slices), then thick, then unknown."""
    exam = [
        series(20, number=1, thickness=None),
        series(12, number=2, thickness=10.0),
        series(200, number=3, thickness=0.6),
        series(30, number=4, thickness=2.5),
    ]
    choices = choose_series(exam)
    assert choices[0].number == 4
    assert [c.reason for c in choices[1:]] == [
        "slice thickness unknown: a series of known thickness was chosen",
        "thick (10 mm): a thinner series was chosen",
        "thin (0.6 mm): a thicker series was chosen",
    ]
    assert choose_series(exam[:3])[0].number == 3  # thin before thick
    assert choose_series(exam[:2])[0].number == 2  # thick before unknown


def test_thickness_falls_back_to_spacing():
    rsna_like = series(30, thickness=4.5)
    for s in rsna_like.slices:
        s.thickness = None
    assert choose_series([rsna_like])[0].thickness == pytest.approx(4.5)


def test_more_slices_then_lower_number():
    choices = choose_series([series(30, number=3), series(36, number=4), series(36, number=5)])
    assert choices[0].number == 4
    reasons = by_number(choices)
    assert reasons[3].reason == "fewer slices (30) than the chosen series (36)"
    assert reasons[5].reason == "an equivalent series with a lower series number was chosen"


def test_hard_exclusions():
    exam = [
        series(number=1, modality="OT", sop_class=SecondaryCaptureImageStorage),
        series(number=2, sop_class=SecondaryCaptureImageStorage),
        series(2, number=3),
        series(number=4, orientation=SAGITTAL),
    ]
    choices = choose_series(exam)
    assert scored(choices) is None
    assert [c.reason for c in choices] == [
        "not a CT image (modality OT)",
        "secondary capture (dose page or screenshot)",
        "too few slices (2)",
        "sagittal, 90° from axial",
    ]
    assert choose_series([*exam, series(3, number=5)])[0].number == 5  # 3 slices are enough


def test_derived_axial_is_scored_only_when_nothing_else_is_left():
    mpr = series(number=2, image_type=("DERIVED", "SECONDARY", "MPR"))
    choices = choose_series([mpr, series(number=3, kernel="H70h")])
    assert choices[0].number == 3  # an original bone-kernel series before a reformat
    assert by_number(choices)[2].reason == "derived/secondary image (MPR)"
    fallback = choose_series([mpr, series(1, number=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))])
    assert (fallback[0].number, fallback[0].scored, fallback[0].reason) == (2, True, "")


def test_unknown_orientation_after_known():
    choices = choose_series([series(number=1, orientation=None), series(number=2, orientation=tilted(20))])
    assert choices[0].number == 2
    assert by_number(choices)[1].reason == "orientation unknown: a series of known orientation was chosen"
    assert choose_series([series(orientation=None)])[0].scored


def test_group_exams_keeps_order():
    a1, b1, a2 = series(study="1.1"), series(study="1.2"), series(study="1.1")
    assert group_exams([a1, b1, a2]) == {"1.1": [a1, a2], "1.2": [b1]}


# --- the real scans in ../shared/data -------------------------------------------------------------


def exams(folder) -> dict[str, list[dicom.Series]]:
    result = dicom.load(folder, pixels=False)
    assert not result.problems
    return group_exams(result.series)


def test_cq500(shared_data):
    """CT-0: one thin (0.625 mm) STANDARD-kernel axial series, scored; CT-1: a single 5 mm slice, not scored."""
    thin = exams(shared_data / "cq500/CQ500-CT-0")
    [(exam,)] = [tuple(choose_series(s)) for s in thin.values()]
    assert exam.scored and (exam.number, exam.kernel, exam.plane, exam.n_slices) == (6, "STANDARD", "axial", 238)
    assert exam.thickness == pytest.approx(0.625)
    first = next(iter(thin.values()))[0].slices[0]
    assert (first.image_type, first.sop_class_uid, first.series_number) == (ORIGINAL, CTImageStorage, 6)
    [(single,)] = [tuple(choose_series(s)) for s in exams(shared_data / "cq500/CQ500-CT-1").values()]
    assert not single.scored and single.reason == "too few slices (1)" and single.plane == "oblique"


def test_rsna_sample_every_series_is_scored(shared_data):
    """Anonymised RSNA files lack ImageType, kernel and series number; 3 of 7 series are tilted 17-22°."""
    found = exams(shared_data / "rsna-sample")
    assert len(found) == 7
    choices = [choose_series(s)[0] for s in found.values()]
    assert all(c.scored and c.kernel == "" and c.number is None for c in choices)
    assert all(c.thickness == pytest.approx(5.0, abs=0.01) for c in choices)
    assert sorted(c.plane for c in choices) == ["axial"] * 4 + ["oblique"] * 3
    first = next(iter(found.values()))[0].slices[0]
    assert (first.image_type, first.series_number) == ((), None)


def test_physionet_single_ot_slices_are_not_scored(shared_data):
    for series_ in exams(shared_data / "physionet-ctich/hemo_subset").values():
        [choice] = choose_series(series_)
        assert not choice.scored and choice.reason == "not a CT image (modality OT)"


def _other(study: str, series: str, sop_class: str, number: int | None = 997, description: str = "Dose Report"):
    name = {XRayRadiationDoseSRStorage: "X-Ray Radiation Dose SR Storage"}.get(sop_class, "Comprehensive SR Storage")
    other = dicom.OtherObject(study, series, generate_uid(), number, description, "SR", sop_class, name)
    return dicom.Problem(f"{generate_uid()}.dcm", f"not a CT image: modality SR (structured report; {name})", other)


def test_the_rule_lists_objects_of_another_kind_with_their_exam_and_leaves_the_rest_problem_lines():
    """What the header pass refused as not a CT image is listed among its exam's series, one per series and SOP
    class with its instances counted; an exam without series keeps its problem lines; the listener's ``set_aside``
    still lists its own."""
    study, scout_only, lonely = "1.2.826.0.1.3680043.1", "1.2.826.0.1.3680043.2", "1.2.826.0.1.3680043.3"
    dose, report = generate_uid(), generate_uid()
    twice = _other(study, dose, XRayRadiationDoseSRStorage)
    broken = dicom.Problem("cut.dcm", "pixel data too short")
    alone = _other(lonely, generate_uid(), XRayRadiationDoseSRStorage)
    problems = [
        twice,
        _other(study, dose, XRayRadiationDoseSRStorage),  # a second instance of the dose series
        dicom.Problem("again.dcm", twice.reason, twice.other),  # the same instance in another file: counted once
        _other(study, report, ComprehensiveSRStorage, 998, ""),
        broken,
        alone,
        _other(scout_only, generate_uid(), XRayRadiationDoseSRStorage),
    ]
    listener = set_aside(None, "Dose page", "OT", SecondaryCaptureImageStorage, "Secondary Capture Image Storage", 1)
    rule = ExamRule(problems, set_aside=[listener])
    soft = series(number=2)
    scout = series(1, number=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), study=scout_only)

    assert rule([soft, scout]) == [soft]

    assert [(c.number, c.description, c.n_slices, c.scored, c.reason) for c in rule.exams[study]] == [
        (2, "", 30, True, ""),
        (997, "Dose Report", 2, False, "not a CT image (modality SR, X-Ray Radiation Dose SR Storage)"),
        (998, "", 1, False, "not a CT image (modality SR, Comprehensive SR Storage)"),
        (None, "Dose page", 1, False, "not a CT image (modality OT, Secondary Capture Image Storage)"),
    ]
    assert problems[:2] == [broken, alone]  # the exam with no series: its file stays a problem line
    (no_series,) = problems[2:]
    assert no_series.path == "exam 2 of 2" and "Dose Report: not a CT image (modality SR" in no_series.reason
    assert scout_only not in no_series.reason and "localizer (scout)" in no_series.reason
