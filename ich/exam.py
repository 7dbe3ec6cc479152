"""Which series of a head-CT exam the model scores.

A PACS sends a whole exam (one StudyInstanceUID): a scout, an axial soft-tissue series, often a bone-kernel
series, thin reconstructions, coronal and sagittal reformats, a dose page. :func:`choose_series` scores one
of them and says, for every other, why not. The rule:

1. Never scored: what is not a CT image (modality OT and other non-CT), a secondary capture (dose page,
   screenshot), a localizer (scout), a series of fewer than 3 slices (a scout's one or two views, or stray
   images: too little of the head to triage), and a series that is not axial: coronal, sagittal, or tilted more than 30° from axial. A tilt up to 30° is kept: gantry
   tilt is common in head CT (3 of the 7 RSNA 2019 series in the project's real-data sample are tilted
   17-22°, the CQ500 5 mm slice 15°; the model learned from such slices) and gantries tilt at most ~30°.
2. Of the rest, an image not marked DERIVED or SECONDARY in its ImageType is preferred to one that is
   (a reformat): that is scored only where nothing else is left.
3. Then a soft-tissue (brain) kernel before a bone or sharp kernel (Siemens numbered 60 and up: H70h, Hr64, GE
   BONE/BONEPLUS/EDGE/LUNG, Philips D/E/L/YC/YD/YE, Canon/Toshiba FC30 and above; an unknown kernel
   counts as soft tissue); then slices of 2.5-5 mm, before thinner ones (scored on ~5 mm slabs), before
   thicker ones, before unknown thickness; then within 10° of axial before tilted, before unknown
   orientation; then more slices; then the lower series number.

Where nothing passes step 1, no series is scored.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ich.dicom import OtherObject, Problem, Series
from ich.slabs import THIN_MM  # below: a thin series, scored on ~5 mm slabs

AXIAL_TOLERANCE_DEG = 10.0
MAX_TILT_DEG = 30.0  # beyond: an oblique reformat, not gantry tilt
PREFERRED_MM = (2.5, 5.0)
MIN_SLICES = 3

_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame children .7.1-.7.4
_SHARP_WORDS = ("BONE", "SHARP", "EDGE", "LUNG")  # GE BONE, BONEPLUS, EDGE, LUNG and other vendors' words
_PHILIPS_SHARP = {"D", "E", "L", "YC", "YD", "YE"}
_CANON = re.compile(r"FC(\d\d)")  # Canon/Toshiba FC01-FC8x: 30 and above are bone, lung, inner ear
_SIEMENS = re.compile(r"[A-Z]R?(\d\d)")  # Siemens H30s, J70h, Hr38, Br64: the number is the sharpness


@dataclass(frozen=True)
class SeriesChoice:
    """One series of an exam: what identifies it to a radiologist, and whether (or why not) it is scored."""

    series_uid: str
    number: int | None  # SeriesNumber
    description: str  # SeriesDescription ('' if none)
    n_slices: int
    thickness: float | None  # SliceThickness, else the spacing between slices
    kernel: str
    plane: str  # "axial", "coronal", "sagittal", "oblique", or "unknown"
    scored: bool  # True for exactly one series of an exam that has a usable one
    reason: str  # '' for the scored one; else why not, in words a radiologist reads


def plane(orientation: np.ndarray | None) -> tuple[str, float]:
    """The plane of ImageOrientationPatient and the angle (degrees) between slice normal and patient z.

    Within :data:`AXIAL_TOLERANCE_DEG` of an axis: "axial", "coronal" or "sagittal"; else "oblique";
    without a usable orientation: ("unknown", nan).
    """
    if orientation is None:
        return "unknown", math.nan
    normal = np.cross(orientation[:3], orientation[3:])
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        return "unknown", math.nan
    x, y, z = np.degrees(np.arccos(np.clip(np.abs(normal) / length, 0.0, 1.0)))
    if z <= AXIAL_TOLERANCE_DEG:
        return "axial", float(z)
    name = "coronal" if y <= AXIAL_TOLERANCE_DEG else "sagittal" if x <= AXIAL_TOLERANCE_DEG else "oblique"
    return name, float(z)


def group_exams(series: Iterable[Series]) -> dict[str, list[Series]]:
    """Series by StudyInstanceUID, in the order they come."""
    exams: dict[str, list[Series]] = {}
    for s in series:
        exams.setdefault(s.study_uid, []).append(s)
    return exams


def _sharp_kernel(kernel: str) -> bool:
    name = kernel.split("\\")[0].strip().upper()  # Siemens adds e.g. the iterative strength: "Hr38\3"
    if name in _PHILIPS_SHARP or any(word in name for word in _SHARP_WORDS):
        return True
    if match := _CANON.match(name):
        return int(match[1]) >= 30
    if match := _SIEMENS.match(name):
        return int(match[1]) >= 60
    return False


def _mm(value: float) -> str:
    return f"{value:.3g} mm"


@dataclass(frozen=True)
class _Candidate:
    index: int
    choice: SeriesChoice
    angle: float
    derived: str  # '' for an original image, else the reason it is not preferred
    excluded: str  # '' unless never scored (rule step 1)

    @property
    def key(self) -> tuple[int, ...]:
        """Smaller is better; the order of rule steps 2 and 3."""
        c = self.choice
        t = c.thickness
        thickness = 3 if t is None else 0 if PREFERRED_MM[0] <= t <= PREFERRED_MM[1] else 1 if t < THIN_MM else 2
        return (
            bool(self.derived),
            _sharp_kernel(c.kernel),
            thickness,
            {"axial": 0, "oblique": 1}.get(c.plane, 2),
            -c.n_slices,
            sys.maxsize if c.number is None else c.number,
        )

    def beaten_by(self, chosen: _Candidate) -> str:
        """Why this series lost to ``chosen``: the first rule step where it is worse."""
        c = self.choice
        reasons = [
            self.derived,
            f"bone kernel ({c.kernel})",
            (
                "slice thickness unknown: a series of known thickness was chosen"
                if c.thickness is None
                else f"thin ({_mm(c.thickness)}): a thicker series was chosen"
                if c.thickness < THIN_MM
                else f"thick ({_mm(c.thickness)}): a thinner series was chosen"
            ),
            (
                f"tilted {self.angle:.0f}° from axial: a less tilted series was chosen"
                if c.plane == "oblique"
                else "orientation unknown: a series of known orientation was chosen"
            ),
            f"fewer slices ({c.n_slices}) than the chosen series ({chosen.choice.n_slices})",
            "an equivalent series with a lower series number was chosen",
        ]
        for mine, theirs, reason in zip(self.key, chosen.key, reasons):
            if mine != theirs:
                return reason
        return "an equivalent series was chosen"


def _candidate(index: int, s: Series) -> _Candidate:
    first = s.slices[0]
    name, angle = plane(first.orientation)
    choice = SeriesChoice(
        series_uid=s.series_uid,
        number=first.series_number,
        description=first.series_description,
        n_slices=len(s),
        thickness=s.thickness if s.thickness is not None else s.spacing,
        kernel=first.kernel,
        plane=name,
        scored=False,
        reason="",
    )
    excluded = _not_a_ct_image(s.modality, first.sop_class_uid) or _not_scorable(s, name, angle)
    derived = ""
    if {"DERIVED", "SECONDARY"} & set(first.image_type[:2]):
        detail = ", ".join(v for v in first.image_type[2:] if v)
        derived = f"derived/secondary image ({detail})" if detail else "derived/secondary image"
    return _Candidate(index, choice, angle, derived, excluded)


def _not_scorable(s: Series, name: str, angle: float) -> str:
    """Why a CT image series is never scored ('' where it may be): rule step 1's others."""
    if "LOCALIZER" in s.slices[0].image_type:
        return "localizer (scout)"
    if len(s) < MIN_SLICES:
        return f"too few slices ({len(s)})"
    if name in ("coronal", "sagittal") or (name == "oblique" and angle > MAX_TILT_DEG):
        return f"{name}, {angle:.0f}° from axial"
    return ""


def _not_a_ct_image(modality: str, sop_class: str, detail: str = "") -> str:
    """Why an object is not a CT image the model could score ('' where it is one): rule step 1's first two;
    ``detail`` (its SOP class's name) is added inside the brackets."""
    more = f", {detail}" if detail else ""
    if modality != "CT":
        return f"not a CT image (modality {modality or 'unknown'}{more})"
    if _secondary_capture(sop_class):
        return f"secondary capture (dose page or screenshot{more})"
    return ""


def _secondary_capture(sop_class: str) -> bool:
    return sop_class == _SECONDARY_CAPTURE or sop_class.startswith(_SECONDARY_CAPTURE + ".")


def set_aside(
    number: int | None, description: str, modality: str, sop_class: str, sop_class_name: str, instances: int
) -> SeriesChoice:
    """A series the DICOM listener set aside at the door (a dose page, a dose SR, a structured report): never
    stored, so known only by what its instances said. Its reason reads as an upload's for the same object,
    with the SOP class named: "not a CT image (modality SR, X-Ray Radiation Dose SR Storage)"."""
    reason = _not_a_ct_image(modality, sop_class, sop_class_name) or f"not a CT image ({sop_class_name})"
    return SeriesChoice("", number, description, instances, None, "", "unknown", False, reason)


def is_set_aside(choice: SeriesChoice) -> bool:
    """Whether ``choice`` is a series :func:`set_aside` made: known by no UID (none is kept)."""
    return not choice.series_uid


def with_set_aside(choices: Sequence[SeriesChoice], extra: Sequence[SeriesChoice]) -> list[SeriesChoice]:
    """An exam's ``choices`` (:func:`choose_series`) with ``extra`` series set aside (:func:`set_aside`) among
    the others: the scored one still first, the rest by series number."""
    head = list(choices[:1]) if choices and choices[0].scored else []
    rest = [*choices[len(head) :], *extra]
    return head + sorted(rest, key=lambda c: (c.number is None, c.number or 0))


def viewable(s: Series) -> bool:
    """Whether a series not scored is still kept for the viewer: a CT image (bone kernel, thin, reformat,
    scout), not a dose page or another modality's image."""
    sop_class = s.slices[0].sop_class_uid
    return s.modality == "CT" and not _secondary_capture(sop_class)


def choose_series(series: Sequence[Series]) -> list[SeriesChoice]:
    """One :class:`SeriesChoice` per series of one exam (headers are enough): the scored one first
    (none where no series is usable), then the rest by series number, then input order."""
    candidates = [_candidate(i, s) for i, s in enumerate(series)]
    usable = [c for c in candidates if not c.excluded]
    chosen = min(usable, key=lambda c: c.key) if usable else None
    rest = sorted(
        (c for c in candidates if c is not chosen),
        key=lambda c: (c.choice.number is None, c.choice.number or 0, c.index),
    )
    head = [] if chosen is None else [replace(chosen.choice, scored=True)]
    # Without a chosen series every series was excluded, so each has its reason already.
    return head + [
        replace(c.choice, reason=c.excluded if c.excluded or chosen is None else c.beaten_by(chosen)) for c in rest
    ]


def not_scored_text(choices: Sequence[SeriesChoice]) -> str:
    """Every series of an exam with why it was not scored, on one line ('' where all were scored)."""
    return "; ".join(
        f"{c.description or f'series {c.number or k}'}: {c.reason}" for k, c in enumerate(choices, 1) if not c.scored
    )


class ExamRule:
    """The ``select`` of :func:`ich.dicom.iter_series` that applies :func:`choose_series` to each exam.

    Called with every series' headers, it returns each exam's scored series, followed (with
    ``keep_viewable``) by the exam's other :func:`viewable` series, so a caller storing them gets them
    after the series they belong with. Afterwards ``exams`` maps each Study Instance UID to its choices
    (scored first), and an exam with no series to score is a :class:`ich.dicom.Problem` in ``problems``,
    named by its place in the input ("exam 2 of 3"), never by an identifier.

    ``problems`` is the list :func:`ich.dicom.iter_series` is given: when the rule is called it holds the
    header pass's problems. A file refused as an object of another kind than a CT image (a dose SR, a
    structured report, a colour dose page: :class:`ich.dicom.OtherObject`) whose exam has series is taken out
    of them and listed among that exam's series instead, as the listener lists what it set aside
    (:func:`set_aside`: one per series and SOP class, its instances counted); one whose exam has no series
    (an upload of a dose SR alone, an MR study) stays a problem line. ``set_aside``: series received but never
    stored (:func:`set_aside`, the listener's), listed among the other series of each exam (the listener's
    input is one exam's folder).
    """

    def __init__(
        self, problems: list[Problem], keep_viewable: bool = False, set_aside: Sequence[SeriesChoice] = ()
    ) -> None:
        self.problems = problems
        self.keep_viewable = keep_viewable
        self.set_aside = tuple(set_aside)
        self.exams: dict[str, list[SeriesChoice]] = {}

    def place(self, study_uid: str) -> str:
        """'exam N of M': where the exam came in the input."""
        return f"exam {list(self.exams).index(study_uid) + 1} of {len(self.exams)}"

    def scored(self, series: Series) -> bool:
        """Whether ``series`` (as :func:`ich.dicom.iter_series` yields it) is its exam's scored one."""
        choice = self.exams[series.study_uid][0]
        return choice.scored and choice.series_uid == series.series_uid

    def __call__(self, headers: list[Series]) -> list[Series]:
        groups = group_exams(headers)
        others = self._other_objects(set(groups))
        chosen = {study_uid: choose_series(members) for study_uid, members in groups.items()}
        self.exams = {
            study_uid: with_set_aside(choices, [*self.set_aside, *others.get(study_uid, ())])
            for study_uid, choices in chosen.items()
        }
        wanted: list[Series] = []
        for study_uid, choices in chosen.items():
            if not choices[0].scored:
                why = not_scored_text(self.exams[study_uid])  # the series set aside too
                self.problems.append(Problem(self.place(study_uid), f"no series to score ({why})"))
                continue
            by_uid = {s.series_uid: s for s in groups[study_uid]}
            wanted.append(by_uid[choices[0].series_uid])
            if self.keep_viewable:
                wanted += [by_uid[c.series_uid] for c in choices[1:] if viewable(by_uid[c.series_uid])]
        return wanted

    def _other_objects(self, studies: set[str]) -> dict[str, list[SeriesChoice]]:
        """The problems of objects of another kind than a CT image (:class:`ich.dicom.OtherObject`) of exams in
        ``studies``, taken out of ``problems``: per exam, one :func:`set_aside` series each (by series UID and
        SOP class, as the listener groups them), its distinct instances counted."""
        kept: list[Problem] = []
        series: dict[tuple[str, str, str], list[OtherObject]] = {}
        for problem in self.problems:
            o = problem.other
            if o is None or o.study_uid not in studies:
                kept.append(problem)
            else:
                series.setdefault((o.study_uid, o.series_uid, o.sop_class), []).append(o)
        if series:
            self.problems[:] = kept  # the caller's list, changed in place
        listed: dict[str, list[SeriesChoice]] = {}
        for (study_uid, _, _), objects in series.items():
            first = objects[0]
            instances = len({o.sop_uid or f"#{k}" for k, o in enumerate(objects)})  # a file read twice counts once
            listed.setdefault(study_uid, []).append(
                set_aside(
                    first.number, first.description, first.modality, first.sop_class, first.sop_class_name, instances
                )
            )
        return listed
