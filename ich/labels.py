"""Class order and the RSNA 2019 label CSV.

The RSNA file is "long": one row per (image, class), ``ID = <SOPInstanceUID>_<class>``, six rows
per image, e.g. ``ID_000012eaf_subdural,0``. Everywhere else in ``ich`` labels are "wide": a
DataFrame indexed by SOPInstanceUID (index name ``sop_uid``) with one int 0/1 column per class in
:data:`CLASSES` order.
"""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike
from typing import IO

import pandas as pd

__all__ = [
    "CLASSES",
    "SUBTYPES",
    "INDEX_NAME",
    "DEFAULT_THRESHOLD",
    "NOT_NAMED",
    "from_rsna",
    "to_rsna",
    "read_rsna_csv",
    "write_rsna_csv",
]

CLASSES: tuple[str, ...] = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
SUBTYPES: tuple[str, ...] = CLASSES[1:]
INDEX_NAME = "sop_uid"
# A class is called present at probability >= this when a checkpoint names no threshold of its own
# (the paper's fixed cut-off; the bundled model ships thresholds chosen for triage).
DEFAULT_THRESHOLD = 0.5
# A threshold that calls nothing: the checkpoint does not name this class (out of fold, naming it
# was no better than chance). A probability can reach 1.0 in float32, so this is checked, not compared.
NOT_NAMED = 1.0

# Row order of the competition's own file within each image: the subtypes, then "any".
_RSNA_ROW_ORDER: tuple[str, ...] = (*SUBTYPES, "any")


def from_rsna(long: pd.DataFrame) -> pd.DataFrame:
    """RSNA long frame (columns ``ID``, ``Label``) -> wide labels indexed by SOPInstanceUID.

    The real ``stage_2_train.csv`` repeats some rows; exact duplicates are dropped, conflicting
    ones raise. SOPInstanceUIDs contain underscores themselves (``ID_000012eaf``), so the class is
    split off at the last one.
    """
    if not {"ID", "Label"} <= set(long.columns):
        raise ValueError(f"expected columns ID, Label; got {list(long.columns)}")
    parts = long["ID"].astype(str).str.rsplit("_", n=1, expand=True)
    if parts.shape[1] != 2 or parts[1].isna().any():
        raise ValueError("every ID must look like <SOPInstanceUID>_<class>")
    frame = pd.DataFrame({INDEX_NAME: parts[0], "cls": parts[1], "label": long["Label"].astype(int)})
    unknown = sorted(set(frame["cls"]) - set(CLASSES))
    if unknown:
        raise ValueError(f"unknown classes in IDs: {unknown}")
    frame = frame.drop_duplicates()
    if frame.duplicated([INDEX_NAME, "cls"]).any():
        raise ValueError("conflicting labels for the same ID")
    wide = frame.pivot(index=INDEX_NAME, columns="cls", values="label")
    missing = wide.columns[wide.isna().any()].tolist() + [c for c in CLASSES if c not in wide.columns]
    if missing:
        raise ValueError(f"images without a row for: {sorted(set(missing))}")
    wide = wide.reindex(columns=list(CLASSES)).astype(int)
    wide.columns.name = None
    return wide


def to_rsna(labels: pd.DataFrame) -> pd.DataFrame:
    """Wide labels (index SOPInstanceUID, columns :data:`CLASSES`) -> RSNA long frame ``ID, Label``."""
    missing = [c for c in CLASSES if c not in labels.columns]
    if missing:
        raise ValueError(f"labels lack columns {missing}")
    values = labels[list(_RSNA_ROW_ORDER)].astype(int)
    long = values.stack()  # image-major, classes in _RSNA_ROW_ORDER within each image
    ids = [f"{sop}_{cls}" for sop, cls in long.index]
    return pd.DataFrame({"ID": ids, "Label": long.to_numpy()})


def read_rsna_csv(path: str | PathLike | IO[str]) -> pd.DataFrame:
    """Read an RSNA ``ID,Label`` CSV into wide labels (see :func:`from_rsna`)."""
    return from_rsna(pd.read_csv(path, dtype={"ID": str}))


def write_rsna_csv(labels: pd.DataFrame | Iterable[pd.DataFrame], path: str | PathLike | IO[str]) -> None:
    """Write wide labels (or several frames, concatenated in order) as an RSNA ``ID,Label`` CSV."""
    frame = labels if isinstance(labels, pd.DataFrame) else pd.concat(list(labels))
    to_rsna(frame).to_csv(path, index=False)
