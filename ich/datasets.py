"""Readers for labelled head-CT datasets (training layouts and labelled evaluation folders), as manifests.

| layout | how it is recognised | labels |
| --- | --- | --- |
| ``rsna-dicom`` | ``stage_2_train.csv`` + ``stage_2_train/*.dcm`` (RSNA 2019) | six per slice; patient from the header |
| ``rsna-png`` | ``stage_2_train.csv`` + ``stage_2_train_png/*.png`` (brain-window 8-bit) | six per slice; no patient |
| ``phe-sich`` | ``labels.csv`` with ``hemorrhage`` + ``images/*.png`` + ``masks/*.png`` | bleed / intraparenchymal only |
| ``roboflow-ich`` | ``labels.csv`` with subtype flags + ``images/*.jpg`` + ``labels/*.txt`` YOLO boxes | six per slice |

The RSNA label CSV of either RSNA layout may label only some classes (:func:`read_labels`): the others are
:data:`UNKNOWN`. A ``series.csv`` beside ``stage_2_train_png/`` (``ID``, ``series`` or ``patient``, ``slice``)
says which slices form a series: they share a ``patient_id`` and come in slice order; an optional
``masks/<ID>.png`` beside them is the slice's bleed mask.

A manifest is a DataFrame with one row per image: ``path`` (absolute), ``source``, ``kind``
(``dicom`` or ``image``), ``image_id``, ``patient_id`` (``None`` where the DICOM header has it),
``rotate`` (quarter turns that bring the image to radiological orientation), ``mask`` and one
int8 column per class: 1, 0, or :data:`UNKNOWN` where the source does not say (PHE-SICH labels
bleeds, not which subtypes besides the intraparenchymal one). The loss and the metrics skip
unknown cells.

Every mismatch between images and label files is reported as an :class:`ich.dicom.Problem` rather than
skipped silently: an image without a label row, a label row without an image, flags that disagree
with the boxes, counts that differ from the data's README.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from ich.dicom import Problem
from ich.labels import CLASSES, SUBTYPES, from_rsna
from ich.windowing import BRAIN, window_to_hu

__all__ = [
    "UNKNOWN",
    "LAYOUTS",
    "EXPECTED",
    "Source",
    "detect_layout",
    "read_source",
    "load_image",
    "load_hu",
    "read_labels",
]

UNKNOWN = -1
LAYOUTS = ("rsna-dicom", "rsna-png", "phe-sich", "roboflow-ich")
# (images, images with hemorrhage) as ../shared/data/README.md states them; a difference is reported.
EXPECTED: dict[str, tuple[int, int]] = {"rsna-png": (3987, 602), "phe-sich": (1156, 676), "roboflow-ich": (355, 257)}
# PHE-SICH images are turned 90 degrees against radiological orientation (face left, table right).
PHE_ROTATE = -1  # np.rot90 k: a quarter turn clockwise brings the face to the top
MANIFEST_COLUMNS = ("path", "source", "kind", "image_id", "patient_id", "rotate", "mask", *CLASSES)


@dataclass
class Source:
    layout: str
    root: Path
    manifest: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)

    @property
    def positives(self) -> int:
        return int((self.manifest["any"] == 1).sum())


def detect_layout(root: str | os.PathLike) -> str:
    """Which of :data:`LAYOUTS` the folder ``root`` holds; ``ValueError`` naming what was looked for."""
    root = Path(root)
    if (root / "stage_2_train.csv").is_file():
        if (root / "stage_2_train").is_dir():
            return "rsna-dicom"
        if (root / "stage_2_train_png").is_dir():
            return "rsna-png"
    if (root / "labels.csv").is_file() and (root / "images").is_dir():
        header = pd.read_csv(root / "labels.csv", nrows=0).columns
        if "hemorrhage" in header and (root / "masks").is_dir():
            return "phe-sich"
        if set(SUBTYPES) <= set(header) and (root / "labels").is_dir():
            return "roboflow-ich"
    raise ValueError(
        f"{root}: not a known training layout; expected stage_2_train.csv with stage_2_train/*.dcm (RSNA DICOM) or "
        "stage_2_train_png/*.png (RSNA PNG), or labels.csv with images/ and masks/ (PHE-SICH) or labels/ (Roboflow boxes)"
    )


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    for c in CLASSES:
        frame[c] = frame[c].astype(np.int8)
    frame["rotate"] = frame["rotate"].astype(np.int8)
    return frame


def _match(root: Path, images: dict[str, Path], labelled: set[str], label_file: str) -> tuple[list[str], list[Problem]]:
    """Image ids present on both sides; a problem for each id on one side only."""
    problems = [Problem(str(images[i]), f"no label row in {label_file}") for i in sorted(set(images) - labelled)]
    problems += [
        Problem(str(root / label_file), f"label row for {i} but no image file") for i in sorted(labelled - set(images))
    ]
    return sorted(set(images) & labelled), problems


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """Wide labels from an RSNA ``ID,Label`` CSV that may label only some classes, or some images of a class:
    every (image, class) without a row is :data:`UNKNOWN` (public test sets often give only "any")."""
    long = pd.read_csv(path, dtype={"ID": str})
    if "ID" in long:
        images = long["ID"].str.rsplit("_", n=1).str[0].unique()
        given = set(long["ID"])
        missing = [f"{i}_{c}" for i in images for c in CLASSES if f"{i}_{c}" not in given]
        long = pd.concat([long, pd.DataFrame({"ID": missing, "Label": UNKNOWN})], ignore_index=True)
    return from_rsna(long)


def _series(root: Path) -> dict[str, tuple[str, int]]:
    """``{image id: (series, slice)}`` from ``root/series.csv`` (empty without one)."""
    path = root / "series.csv"
    if not path.is_file():
        return {}
    table = pd.read_csv(path, dtype={"ID": str, "series": str, "patient": str})
    column = "series" if "series" in table else "patient"
    if not {"ID", column, "slice"} <= set(table.columns):
        raise ValueError(f"{path}: expected columns ID, series (or patient), slice; got {list(table.columns)}")
    return {i: (f"{root.name}:{s}", int(k)) for i, s, k in zip(table["ID"], table[column], table["slice"])}


def _rsna(root: Path, layout: str) -> Source:
    folder, suffix = ("stage_2_train", ".dcm") if layout == "rsna-dicom" else ("stage_2_train_png", ".png")
    labels = read_labels(root / "stage_2_train.csv")
    images = {p.stem: p for p in (root / folder).glob(f"*{suffix}")}
    if not images:
        raise FileNotFoundError(f"no {suffix} files in {root / folder}")
    ids, problems = _match(root, images, set(labels.index), "stage_2_train.csv")
    if layout == "rsna-dicom":
        # Unlabelled DICOMs stay as rows (with the problem) so the cache lists every file it saw.
        ids = sorted(images)
        labels = labels.reindex(ids).fillna(0).astype(int)
    series = {} if layout == "rsna-dicom" else _series(root)
    problems += [Problem(str(images[i]), "no row in series.csv") for i in ids if series and i not in series]
    masks = root / "masks"
    if series:  # each series together, in slice order
        ids = sorted(ids, key=lambda i: series.get(i, (i, 0)))
    rows = [
        {"path": str(images[i]), "source": layout, "kind": "dicom" if layout == "rsna-dicom" else "image", "image_id": i,
         # rsna-png slices are a random draw from ~20,000 series: without a series.csv each is its own group.
         "patient_id": None if layout == "rsna-dicom" else series.get(i, (f"{layout}:{i}", 0))[0], "rotate": 0,
         "mask": str(masks / f"{i}.png") if (masks / f"{i}.png").is_file() else None,
         **{c: int(labels.at[i, c]) for c in CLASSES}}
        for i in ids
    ]  # fmt: skip
    return Source(layout, root, _frame(rows), problems)


def _phe(root: Path) -> Source:
    table = pd.read_csv(root / "labels.csv", dtype={"image": str, "patient": str})
    images = {p.stem: p for p in (root / "images").glob("*.png")}
    ids, problems = _match(root, images, set(table["image"]), "labels.csv")
    masks = {p.stem for p in (root / "masks").glob("*.png")}
    problems += [Problem(str(images[i]), "no mask in masks/") for i in ids if i not in masks]
    by_id = table.set_index("image")
    rows = []
    for i in ids:
        bleed = int(by_id.at[i, "hemorrhage"])
        # A bleed here is intraparenchymal; its intraventricular (or other) extension is not labelled.
        subtypes = {c: (UNKNOWN if bleed else 0) for c in SUBTYPES} | {"intraparenchymal": bleed}
        rows.append(
            {"path": str(images[i]), "source": "phe-sich", "kind": "image", "image_id": i,
             "patient_id": f"phe-sich:{by_id.at[i, 'patient']}", "rotate": PHE_ROTATE,
             "mask": str(root / "masks" / f"{i}.png") if i in masks else None, "any": bleed, **subtypes}
        )  # fmt: skip
    return Source("phe-sich", root, _frame(rows), problems)


def _boxes(path: Path) -> set[str]:
    """Subtypes with at least one YOLO box in ``path`` (class ids in :data:`SUBTYPES` order)."""
    found = set()
    for line in path.read_text().split("\n"):
        if line.strip():
            found.add(SUBTYPES[int(line.split()[0])])
    return found


def _roboflow(root: Path) -> Source:
    table = pd.read_csv(root / "labels.csv", dtype={"image": str, "patient": str})
    images = {p.stem: p for p in (root / "images").glob("*.jpg")}
    ids, problems = _match(root, images, set(table["image"]), "labels.csv")
    by_id = table.set_index("image")
    rows = []
    for i in ids:
        flags = {c: int(by_id.at[i, c]) for c in SUBTYPES}
        box_file = root / "labels" / f"{i}.txt"
        if box_file.is_file():
            boxed = _boxes(box_file)
            if boxed != {c for c, v in flags.items() if v}:
                problems.append(
                    Problem(
                        str(box_file),
                        f"boxes show {sorted(boxed) or 'none'}, labels.csv says {sorted(c for c, v in flags.items() if v) or 'none'}",
                    )
                )
        elif any(flags.values()):
            problems.append(Problem(str(box_file), "labels.csv flags a bleed but there is no box file"))
        any_ = int(by_id.at[i, "any"])
        if any_ != max(flags.values()):
            problems.append(Problem(str(root / "labels.csv"), f"{i}: any={any_} disagrees with its subtype flags"))
        rows.append(
            {"path": str(images[i]), "source": "roboflow-ich", "kind": "image", "image_id": i,
             "patient_id": f"roboflow-ich:{by_id.at[i, 'patient']}", "rotate": 0, "mask": None, "any": max(flags.values()), **flags}
        )  # fmt: skip
    return Source("roboflow-ich", root, _frame(rows), problems)


def read_source(root: str | os.PathLike) -> Source:
    """The manifest of one training folder (absolute paths), with every mismatch found in its label files."""
    root = Path(root).resolve()
    layout = detect_layout(root)
    source = (
        _rsna(root, layout) if layout.startswith("rsna") else _phe(root) if layout == "phe-sich" else _roboflow(root)
    )
    expected = EXPECTED.get(layout)
    if expected and root.name == layout and (len(source.manifest), source.positives) != expected:
        source.problems.append(
            Problem(
                str(root),
                f"{len(source.manifest)} images / {source.positives} bleeds, the data README says {expected[0]} / {expected[1]}",
            )
        )
    return source


def load_image(path: str | os.PathLike, rotate: int = 0) -> np.ndarray:
    """A pre-windowed training image as uint8 ``(H, W)`` in radiological orientation.

    Colour JPEGs of grey CT (equal channels) are read as grey. ``ValueError`` when it does not decode.
    """
    image = cv2.imread(os.fspath(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError("cannot decode the image (not a PNG/JPEG, or truncated)")
    return np.ascontiguousarray(np.rot90(image, rotate)) if rotate else image


def load_hu(path: str | os.PathLike, rotate: int = 0) -> np.ndarray:
    """A pre-windowed (brain-window) training image back in HU within that window: float32 ``(H, W)``."""
    return window_to_hu(load_image(path, rotate), BRAIN)
