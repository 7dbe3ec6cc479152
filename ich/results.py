"""Results back to PACS as DICOM (highdicom): a Structured Report and a Secondary Capture key image.

Both go into the scanned study (its Study Instance UID, patient and study modules copied from the
source images by highdicom) as new series, so PACS files them with the scan:

- :func:`structured_report`: a Comprehensive SR, "Diagnostic Imaging Report", holding the study
  likelihood and flag with the operating point, the highest calibrated probability of each class,
  the model's name and version, the key slices (references to the source images) and the plain
  statement that this is not a diagnosis.
- :func:`key_image`: the slice most likely to bleed, brain window, the model's heatmap over it and
  "NOT FOR DIAGNOSTIC USE" burned into the pixels (a secondary capture is seen without its header).
- :func:`study_objects`: both for a worklist study, from the header copy the store keeps of each series
  (:meth:`ich.worklist.Worklist.header`), its slice scores and its volume; :func:`study_results_zip`
  packs them as two ``.dcm`` files for a download.
- :func:`send`: C-STORE to ``AE@host:port`` (pynetdicom).

Codes without a standard one use the private scheme :data:`SCHEME` ("99ICH").
"""

from __future__ import annotations

import io
import logging
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, generate_uid

from ich import __version__
from ich.explain import render
from ich.labels import CLASSES
from ich.windowing import BRAIN

if TYPE_CHECKING:
    from ich.worklist import Worklist

__all__ = [
    "NOT_FOR_DIAGNOSIS",
    "NO_HEADER",
    "SCHEME",
    "key_image",
    "parse_destination",
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
_UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
NO_HEADER = (
    "no DICOM results for this study: it was stored before headers were kept for them; "
    "upload it again (or send it again over DICOM)"
)
_FRAME = re.compile(r"(.+)\[(\d+)\]")  # how ich.dicom names a frame of a multi-frame object: "<SOP UID>[k]"


# Patient and study attributes that a new instance copies and that may be empty (type 2), but not absent;
# anonymised files (RSNA's) drop some of them.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")  # fmt: skip


def _code(value: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value, SCHEME, meaning)


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


def structured_report(
    sources: Sequence[Dataset],
    probs: np.ndarray,
    score: float,
    flagged: bool,
    thresholds: Mapping[str, float],
    model: str,
    aggregation: str,
) -> hd.sr.ComprehensiveSR:
    """The SR for one scored series; ``sources[i]`` is the header of the slice ``probs[i]`` scored."""
    if len(sources) != len(probs) or not len(sources):
        raise ValueError(f"{len(sources)} source images for {len(probs)} probability rows")
    sources = [_completed(s) for s in sources]
    p_any = np.nan_to_num(probs[:, CLASSES.index("any")], nan=-1.0)
    key: dict[str, int] = {}  # the most suspicious slices, by SOP instance (the frames of one object count once)
    for i in np.argsort(-p_any, kind="stable"):
        key.setdefault(sources[i].SOPInstanceUID, int(i))
        if len(key) == KEY_SLICES:
            break
    items: list[hd.sr.ContentItem] = [
        hd.sr.TextContentItem(_code("disclaimer", "Disclaimer"), NOT_FOR_DIAGNOSIS, relationship_type="CONTAINS"),
        hd.sr.TextContentItem(codes.DCM.AlgorithmName, model, relationship_type="CONTAINS"),
        hd.sr.TextContentItem(codes.DCM.AlgorithmVersion, __version__, relationship_type="CONTAINS"),
        hd.sr.NumContentItem(
            _code("study-likelihood", "Hemorrhage likelihood of the series"),
            float(score),
            _UNITLESS,
            relationship_type="CONTAINS",
        ),
        hd.sr.TextContentItem(
            _code("study-score", "How the series likelihood is made"),
            aggregation or "from the slice probabilities",
            relationship_type="CONTAINS",
        ),
        hd.sr.TextContentItem(
            _code("flag", "Triage flag"),
            ("FLAGGED" if flagged else "not flagged")
            + f": likelihood {'>=' if flagged else '<'} {thresholds.get('any', float('nan')):.3f}, "
            "the threshold chosen for 95 % series sensitivity on validation data",
            relationship_type="CONTAINS",
        ),
    ]
    for i, name in enumerate(CLASSES):
        column = probs[:, i]
        if np.isfinite(column).any():
            items.append(
                hd.sr.NumContentItem(
                    _code(f"max-p-{name}", f"Highest slice probability: {name}"),
                    float(np.nanmax(column)),
                    _UNITLESS,
                    relationship_type="CONTAINS",
                )
            )
    for i in key.values():
        items.append(
            hd.sr.ImageContentItem(
                codes.DCM.KeyImages,
                sources[i].SOPClassUID,
                sources[i].SOPInstanceUID,
                relationship_type="CONTAINS",
            )
        )
    root = hd.sr.ContainerContentItem(codes.LN.DiagnosticImagingReport)
    root.ContentSequence = hd.sr.ContentSequence(items)
    return hd.sr.ComprehensiveSR(
        evidence=list({s.SOPInstanceUID: s for s in sources}.values()),
        content=root,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="ICH triage result (not for diagnosis)",
    )


def _orientation(source: Dataset) -> tuple[str, str]:
    """Patient Orientation (row, column directions) from Image Orientation (Patient); axial L/P if absent."""
    cosines = np.asarray(source.get("ImageOrientationPatient") or (1, 0, 0, 0, 1, 0), float).reshape(2, 3)
    letters = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, +y, +z of the patient frame, then their opposites
    out = []
    for vector in cosines:
        axis = int(np.argmax(np.abs(vector)))
        out.append(letters[axis][0] if vector[axis] > 0 else letters[axis][1])
    return out[0], out[1]


def key_image(source: Dataset, rgb: np.ndarray, caption: str) -> hd.sc.SCImage:
    """A Secondary Capture of ``rgb`` (the rendered slice, heatmap over it) with the warning burned in."""
    image = np.ascontiguousarray(rgb, dtype=np.uint8).copy()
    scale = max(0.4, image.shape[1] / 900)
    for row, text in enumerate((NOT_FOR_DIAGNOSIS, caption)):
        y = int((row + 1) * 28 * scale)
        cv2.putText(image, text, (8, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(image, text, (8, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale, (255, 255, 0), 1, cv2.LINE_AA)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=_completed(source),
        pixel_array=image,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=_orientation(source),
        series_instance_uid=generate_uid(),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description="ICH triage key image (not for diagnosis)",
    )
    sc.BurnedInAnnotation = "YES"  # the warning is in the pixels
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
    """``[SR, secondary capture]`` of a worklist study, in its scanned study (new series).

    Built from the header copy the store keeps of the series, its stored slice scores and its volume;
    ``heatmap(hu)`` gives the key image's overlay (e.g. Grad-CAM of "any"), without it the slice is
    plain. ``LookupError`` (:data:`NO_HEADER`) for a study stored before headers were kept.
    """
    header = worklist.header(study_id)
    if header is None:
        raise LookupError(NO_HEADER)
    entry, slices = worklist.study(study_id), worklist.slices(study_id)
    sources = _slice_headers(header, list(slices["sop_uid"]))
    probs = slices[[f"p_{c}" for c in CLASSES]].to_numpy(np.float64)
    report = structured_report(
        sources, probs, entry.score or 0.0, entry.flagged, entry.thresholds, entry.model or "", aggregation
    )
    top = int(np.nanargmax(np.nan_to_num(probs[:, CLASSES.index("any")], nan=-1.0)))
    hu = worklist.volume(study_id)[top].astype(np.float32)
    image = render(hu, BRAIN, heatmap(hu) if heatmap else None)
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    caption = f"slice {top + 1} of {len(slices)}: hemorrhage {probs[top, 0]:.2f}, series {entry.score or 0:.2f}"
    return [report, key_image(sources[top], rgb, caption)]


def study_results_zip(
    worklist: Worklist,
    study_id: int,
    heatmap: Callable[[np.ndarray], np.ndarray] | None = None,
    aggregation: str = "",
) -> bytes:
    """:func:`study_objects` as a ``.zip`` of two DICOM files (named by worklist id, no UIDs)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for ds, name in zip(study_objects(worklist, study_id, heatmap, aggregation), ("report-SR", "key-image-SC")):
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
    """C-STORE each dataset to ``destination`` in one association; their statuses (-1: no answer)."""
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
