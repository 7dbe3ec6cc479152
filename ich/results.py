"""Results back to PACS as DICOM (highdicom): a Structured Report and a Secondary Capture key image.

Both go into the scanned study (its Study Instance UID, patient and study modules copied from the
source images by highdicom) as series of their own, so PACS files them with the scan:

- :func:`structured_report`: a Comprehensive SR following DICOM TID 1500 (Measurement Report), so a viewer
  that knows the template reads it. Its observer is the device (the model); one measurement group
  (TID 1501) per class, its finding coded in SNOMED CT where the code was checked (:data:`FINDINGS`), each
  naming the algorithm (TID 4019: the model's name, this package's version, and as parameters how the
  series likelihood is made and the operating point). The intracranial hemorrhage group holds the series
  likelihood, the triage flag and the key slices (its source images); every group holds the highest
  calibrated slice probability of its class with a reference to that slice. The report's qualitative
  evaluations hold the plain statement that this is not a diagnosis.
- :func:`key_image`: the slice most likely to bleed, brain window, the model's heatmap over it and
  "NOT FOR DIAGNOSTIC USE" burned into the pixels (a secondary capture is seen without its header); its
  Source Image Sequence names that slice.
- :func:`study_objects`: both for a worklist study, from the header copy the store keeps of each series
  (:meth:`ich.worklist.Worklist.header`), its slice scores and its volume; :func:`study_results_zip`
  packs them as two ``.dcm`` files for a download.
- One result per exam in PACS: the first send opens an SR series and a key-image series for the exam
  (Study Instance UID); each later one (the series grew, a sender delivered in batches) goes into the same
  two series with the next Instance Number, and its SR names the last one sent in its Predecessor
  Documents Sequence, so PACS and viewers show it as the replacement. What was last sent is kept per exam
  in ``<worklist directory>/results/<hash>.json`` (:class:`Sent`, :func:`last_sent`, :func:`record_sent`;
  the name hashes the Study Instance UID), recorded only once PACS accepted every object
  (:class:`ich.listener.SendResults`): after a failed send the retry replaces the last accepted one. A
  download is built the same way but is not a send and records nothing: imported into PACS by hand, it
  too replaces the last results sent.
- :func:`send`: C-STORE to ``AE@host:port`` (pynetdicom), calling as the listener's AE title.
- Building results logs no identifier: highdicom and pydicom quote header values in their warnings
  (a patient name they find odd) and highdicom logs SOP Instance UIDs; while results are built, those
  warnings are logged by category only and those libraries' log records below ERROR are dropped.

Codes without a standard one use the private scheme :data:`SCHEME` ("99ICH"), declared in the SR's Coding
Scheme Identification Sequence.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeVar

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, generate_uid

from ich import __version__
from ich.files import atomic_write
from ich.labels import CLASSES
from ich.windowing import (
    BRAIN,
    render,  # not ich.explain: no torch for a queue-mode listener
)

if TYPE_CHECKING:
    from ich.worklist import Worklist

__all__ = [
    "FINDINGS",
    "NOT_FOR_DIAGNOSIS",
    "NO_HEADER",
    "SCHEME",
    "Sent",
    "key_image",
    "last_sent",
    "parse_destination",
    "record_sent",
    "send",
    "structured_report",
    "study_objects",
    "study_results_zip",
]

log = logging.getLogger(__name__)

SCHEME = "99ICH"  # private coding scheme of this product
MANUFACTURER = "ich (research software)"
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE - research software, not a medical device"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
KEY_SLICES = 3
RESULTS_DIR = "results"  # under the worklist's directory: one record per exam of what PACS holds
NO_HEADER = (
    "no DICOM results for this study: it was stored before headers were kept for them; "
    "upload it again (or send it again over DICOM)"
)
_FRAME = re.compile(r"(.+)\[(\d+)\]")  # how ich.dicom names a frame of a multi-frame object: "<SOP UID>[k]"


def _code(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, SCHEME, meaning)


# The finding of each class. SNOMED CT where the code was checked: 1386000 in pydicom's DICOM code
# dictionary (PS3.16), 274100004 and 21454007 in a SNOMED CT International (2025-02) value set expansion.
# The other subtypes keep private codes until a checked SNOMED CT code replaces them: a wrong standard
# code (230706003, sometimes given for intraventricular, is "hemorrhagic cerebral infarction") is worse than none.
FINDINGS: Mapping[str, hd.sr.CodedConcept] = MappingProxyType(
    {
        "any": hd.sr.CodedConcept.from_code(codes.SCT.IntracranialHemorrhage),
        "epidural": _code("epidural-hem", "Epidural hemorrhage"),
        "intraparenchymal": hd.sr.CodedConcept("274100004", "SCT", "Cerebral hemorrhage"),
        "intraventricular": _code("ventricular-hem", "Intraventricular hemorrhage"),
        "subarachnoid": hd.sr.CodedConcept("21454007", "SCT", "Subarachnoid intracranial hemorrhage"),
        "subdural": _code("subdural-hem", "Subdural hemorrhage"),
    }
)
_UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
_LIKELIHOOD = _code("likelihood", "Hemorrhage likelihood of the series")
_HIGHEST = _code("max-slice-p", "Highest slice probability")
_FLAG = _code("flag", "Triage flag")
_FLAGGED, _NOT_FLAGGED = _code("flagged", "Flagged"), _code("not-flagged", "Not flagged")
_DISCLAIMER = _code("disclaimer", "Disclaimer")
# TID 1500 row 12, the report's own qualitative evaluations (as DCMTK's TID 1500 names it; not in pydicom)
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")


# Patient and study attributes that a new instance copies and that may be empty (type 2), but not absent;
# anonymised files (RSNA's) drop some of them.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip

# warnings.catch_warnings and logger levels are process-wide: one build at a time.
_BUILDING = threading.Lock()
_QUOTING_LIBRARIES = ("highdicom", "pydicom")


@contextlib.contextmanager
def _no_identifiers_logged() -> Iterator[None]:
    """While results are built, keep header values out of logs: highdicom and pydicom quote them in warnings
    (``The string "CQ500-CT-0" is unlikely to represent the intended person name``) and highdicom logs SOP
    Instance UIDs at INFO. Their warnings are logged by category only, their records below ERROR dropped."""
    loggers = [logging.getLogger(name) for name in _QUOTING_LIBRARIES]
    with _BUILDING, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        levels = [logger.level for logger in loggers]
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
    for category in sorted({w.category.__name__ for w in caught}):
        log.debug(
            "a DICOM library warned while building results (%s; text withheld, it may quote the header)", category
        )


@dataclass(frozen=True)
class Sent:
    """The results PACS last accepted for one exam: where the next ones go and which SR they replace."""

    sr_series_uid: str
    sc_series_uid: str
    sr_sop_uid: str  # named in the next SR's Predecessor Documents Sequence
    sr_sop_class_uid: str
    instance_number: int  # of the last objects sent; the next ones take the one after


def _record_path(worklist: Worklist, study_uid: str) -> Path:
    return worklist.directory / RESULTS_DIR / f"{hashlib.sha256(study_uid.encode()).hexdigest()[:24]}.json"


def last_sent(worklist: Worklist, study_uid: str) -> Sent | None:
    """What PACS last accepted for the exam ``study_uid``; ``None`` before its first send."""
    path = _record_path(worklist, study_uid)
    if not path.exists():
        return None
    try:
        return Sent(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:  # the next send then opens new series, as a first one
        log.warning("results record %s unreadable (%s); the next results start new series", path.name, exc)
        return None


def record_sent(worklist: Worklist, report: Dataset, key: Dataset) -> None:
    """Record ``[report, key]`` (:func:`study_objects`) as accepted by PACS: the exam's next results replace them."""
    path = _record_path(worklist, str(report.StudyInstanceUID))
    path.parent.mkdir(exist_ok=True)
    sent = Sent(
        str(report.SeriesInstanceUID),
        str(key.SeriesInstanceUID),
        str(report.SOPInstanceUID),
        str(report.SOPClassUID),
        int(report.InstanceNumber),
    )
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(asdict(sent))))


def _completed(source: Dataset) -> Dataset:
    """A header copy of ``source`` (no pixels) with every type-2 patient/study attribute present."""
    header = Dataset()
    header.update({tag: element for tag, element in source.items() if tag != 0x7FE00010})
    if hasattr(source, "file_meta"):
        header.file_meta = source.file_meta
    for keyword in _TYPE2:
        if keyword not in header:
            setattr(header, keyword, "")
    if not header.get("SOPClassUID"):  # anonymised files (RSNA's) lack it; the reader took them as CT images
        header.SOPClassUID = (
            getattr(getattr(source, "file_meta", None), "MediaStorageSOPClassUID", None) or CTImageStorage
        )
    return header


def _probability(p: float) -> float:
    return round(float(p), 4)  # four decimals, not the float32 noise of the stored scores


_Reference = TypeVar("_Reference", hd.sr.SourceImageForMeasurement, hd.sr.SourceImageForMeasurementGroup)


def _reference(cls: type[_Reference], source: Dataset) -> _Reference:
    return cls(source.SOPClassUID, source.SOPInstanceUID)


def structured_report(
    sources: Sequence[Dataset],
    probs: np.ndarray,
    score: float,
    flagged: bool,
    thresholds: Mapping[str, float],
    model: str,
    aggregation: str,
    previous: Sent | None = None,
) -> hd.sr.ComprehensiveSR:
    """The SR for one scored series; ``sources[i]`` is the header of the slice ``probs[i]`` scored.

    With ``previous`` (what PACS holds for the exam) it replaces that SR: same series, next instance number.
    """
    if len(sources) != len(probs) or not len(sources):
        raise ValueError(f"{len(sources)} source images for {len(probs)} probability rows")
    sources = [_completed(s) for s in sources]
    p_any = np.nan_to_num(probs[:, CLASSES.index("any")], nan=-1.0)
    key: dict[str, int] = {}  # the most suspicious slices, by SOP instance (the frames of one object count once)
    for i in np.argsort(-p_any, kind="stable"):
        key.setdefault(sources[i].SOPInstanceUID, int(i))
        if len(key) == KEY_SLICES:
            break
    series_uid = previous.sr_series_uid if previous else generate_uid()
    model = model or "unnamed model"

    def highest(column: np.ndarray) -> list[hd.sr.Measurement]:
        """A class's highest slice probability with its slice; none for a class the model does not predict."""
        if not np.isfinite(column).any():
            return []
        top = int(np.nanargmax(column))
        source = _reference(hd.sr.SourceImageForMeasurement, sources[top])
        return [hd.sr.Measurement(_HIGHEST, _probability(column[top]), _UNITLESS, referenced_images=[source])]

    def group(
        name: str,
        measurements: list[hd.sr.Measurement],
        evaluations: list[hd.sr.QualitativeEvaluation] | None = None,
        images: list[hd.sr.SourceImageForMeasurementGroup] | None = None,
    ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
        algorithm = hd.sr.AlgorithmIdentification(
            model,
            __version__,
            parameters=[
                f"series likelihood: {aggregation or 'from the slice probabilities'}",
                f"operating point: flagged at series likelihood >= {thresholds.get('any', float('nan')):.3f}, "
                "the threshold chosen for 95 % series sensitivity on validation data",
            ],
        )
        # The tracking UID follows the SR series: a replacement tracks the same finding as the SR it replaces.
        tracking = hd.sr.TrackingIdentifier(generate_uid(entropy_srcs=[series_uid, name]), f"ICH triage: {name}")
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking,
            finding_type=FINDINGS[name],
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=evaluations,
            source_images=images,
        )

    groups = [
        group(
            "any",
            [hd.sr.Measurement(_LIKELIHOOD, _probability(score), _UNITLESS), *highest(probs[:, CLASSES.index("any")])],
            [hd.sr.QualitativeEvaluation(_FLAG, _FLAGGED if flagged else _NOT_FLAGGED)],
            [_reference(hd.sr.SourceImageForMeasurementGroup, sources[i]) for i in key.values()],
        )
    ]
    groups += [
        group(name, found) for c, name in enumerate(CLASSES) if name != "any" and (found := highest(probs[:, c]))
    ]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[MANUFACTURER, model]), name=model, manufacturer_name=MANUFACTURER
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(codes.cid270.Device, device)
        ),
        procedure_reported=codes.SCT.ComputedTomographyOfHead,
        imaging_measurements=groups,
    )
    evaluations = hd.sr.ContainerContentItem(_QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
    evaluations.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.TextContentItem(_DISCLAIMER, NOT_FOR_DIAGNOSIS, relationship_type="CONTAINS")]
    )
    report[0].ContentSequence.append(evaluations)
    predecessors = None
    if previous is not None:
        predecessor = Dataset()
        predecessor.StudyInstanceUID = sources[0].StudyInstanceUID
        predecessor.SeriesInstanceUID = previous.sr_series_uid
        predecessor.SOPInstanceUID = previous.sr_sop_uid
        predecessor.SOPClassUID = previous.sr_sop_class_uid
        predecessors = [predecessor]
    sr = hd.sr.ComprehensiveSR(
        evidence=list({s.SOPInstanceUID: s for s in sources}.values()),
        content=report[0],
        series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=previous.instance_number + 1 if previous else 1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="ICH triage result (not for diagnosis)",
        previous_versions=predecessors,
    )
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "ICH triage (private codes of this research software)"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _orientation(source: Dataset) -> tuple[str, str]:
    """Patient Orientation (row, column directions) from Image Orientation (Patient); axial L/P if absent."""
    cosines = np.asarray(source.get("ImageOrientationPatient") or (1, 0, 0, 0, 1, 0), float).reshape(2, 3)
    letters = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, +y, +z of the patient frame, then their opposites
    out = []
    for vector in cosines:
        axis = int(np.argmax(np.abs(vector)))
        out.append(letters[axis][0] if vector[axis] > 0 else letters[axis][1])
    return out[0], out[1]


def key_image(source: Dataset, rgb: np.ndarray, caption: str, previous: Sent | None = None) -> hd.sc.SCImage:
    """A Secondary Capture of ``rgb`` (the rendered slice, heatmap over it) with the warning burned in.

    With ``previous`` (what PACS holds for the exam) it joins that key image's series with the next number.
    """
    image = np.ascontiguousarray(rgb, dtype=np.uint8).copy()
    scale = max(0.4, image.shape[1] / 900)
    for row, text in enumerate((NOT_FOR_DIAGNOSIS, caption)):
        y = int((row + 1) * 28 * scale)
        cv2.putText(image, text, (8, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(image, text, (8, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, (255, 255, 0), 1, cv2.LINE_AA)
    source = _completed(source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=image,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=_orientation(source),
        series_instance_uid=previous.sc_series_uid if previous else generate_uid(),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=previous.instance_number + 1 if previous else 1,
        manufacturer=MANUFACTURER,
        series_description="ICH triage key image (not for diagnosis)",
    )
    sc.BurnedInAnnotation = "YES"  # the warning is in the pixels
    sc.BodyPartExamined = "HEAD"  # an unpaired part: Laterality (type 2C) stays absent
    reference = Dataset()  # highdicom does not name the slice a secondary capture was made from
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    sc.SourceImageSequence = [reference]
    return sc


def _slice_headers(header: Dataset, sop_uids: Sequence[str]) -> list[Dataset]:
    """One header per slice: the series' first header with each slice's SOP Instance UID (a frame of a
    multi-frame object, named ``<SOP UID>[k]`` by :mod:`ich.dicom`, stands for its object)."""
    out = []
    for uid in sop_uids:
        ds = Dataset(dict(header.items()))
        frame = _FRAME.fullmatch(uid)
        ds.SOPInstanceUID = frame.group(1) if frame else uid
        out.append(ds)
    return out


def study_objects(
    worklist: Worklist,
    study_id: int,
    heatmap: Callable[[np.ndarray], np.ndarray] | None = None,
    aggregation: str = "",
) -> list[Dataset]:
    """``[SR, secondary capture]`` of a worklist study, in its scanned study.

    Built from the header copy the store keeps of the series, its stored slice scores and its volume;
    ``heatmap(hu)`` gives the key image's overlay (e.g. Grad-CAM of "any"), without it the slice is
    plain. They replace what PACS last accepted for the exam (:func:`last_sent`), or open its result
    series. Nothing is recorded here: :func:`record_sent` once PACS has accepted them.
    ``LookupError`` (:data:`NO_HEADER`) for a study stored before headers were kept.
    """
    with _no_identifiers_logged():  # reading the header copy may warn too
        header = worklist.header(study_id)
        if header is None:
            raise LookupError(NO_HEADER)
        entry, slices = worklist.study(study_id), worklist.slices(study_id)
        previous = last_sent(worklist, str(header.StudyInstanceUID))
        sources = _slice_headers(header, list(slices["sop_uid"]))
        probs = slices[[f"p_{c}" for c in CLASSES]].to_numpy(np.float64)
        report = structured_report(
            sources,
            probs,
            entry.score or 0.0,
            entry.flagged,
            entry.thresholds,
            entry.model or "",
            aggregation,
            previous,
        )
    # The heatmap (Grad-CAM: seconds on a CPU) is made outside: it reads no header, and builds wait on each other.
    top = int(np.nanargmax(np.nan_to_num(probs[:, CLASSES.index("any")], nan=-1.0)))
    hu = worklist.volume(study_id)[top].astype(np.float32)
    image = render(hu, BRAIN, heatmap(hu) if heatmap else None)
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    caption = f"slice {top + 1} of {len(slices)}: hemorrhage {probs[top, 0]:.2f}, series {entry.score or 0:.2f}"
    with _no_identifiers_logged():
        return [report, key_image(sources[top], rgb, caption, previous)]


def study_results_zip(
    worklist: Worklist,
    study_id: int,
    heatmap: Callable[[np.ndarray], np.ndarray] | None = None,
    aggregation: str = "",
) -> bytes:
    """:func:`study_objects` as a ``.zip`` of two DICOM files (named by worklist id, no UIDs).

    A download is not a send: nothing is recorded, and the objects replace the results PACS last accepted.
    """
    objects = study_objects(worklist, study_id, heatmap, aggregation)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf, _no_identifiers_logged():  # pydicom warns on write
        for ds, name in zip(objects, ("report-SR", "key-image-SC")):
            encoded = io.BytesIO()
            ds.save_as(encoded, enforce_file_format=True)
            zf.writestr(f"ich-study-{study_id}-{name}.dcm", encoded.getvalue())
    return buffer.getvalue()


def parse_destination(text: str) -> tuple[str, str, int]:
    """``AE@host:port`` -> ``(ae_title, host, port)``."""
    try:
        ae_title, address = text.split("@", 1)
        host, port = address.rsplit(":", 1)
        if not ae_title or not host:
            raise ValueError
        return ae_title, host, int(port)
    except ValueError:
        raise ValueError(f"destination must look like AE@host:port, got {text!r}") from None


def send(datasets: Sequence[Dataset], destination: str, calling_ae: str = "ICH") -> list[int]:
    """C-STORE each dataset to ``destination`` in one association as ``calling_ae``; their statuses (-1: no answer)."""
    from pynetdicom import AE

    ae_title, host, port = parse_destination(destination)
    ae = AE(ae_title=calling_ae)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        raise ConnectionError(f"{destination} refused the association or did not answer")
    try:
        statuses = [int(s.Status) if s else -1 for s in (assoc.send_c_store(ds) for ds in datasets)]
    finally:
        assoc.release()
    log.info("sent %d result object(s) to %s: statuses %s", len(datasets), ae_title, statuses)
    return statuses
