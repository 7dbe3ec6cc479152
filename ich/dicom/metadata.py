"""Header fields of many slices as one pandas DataFrame, patient identifiers left out by default."""

from __future__ import annotations

from collections.abc import Iterable

from ich.dicom.series import LoadResult
from ich.dicom.sources import Source
from ich.dicom.stream import load


def metadata_frame(sources: Iterable[Source] | Source | LoadResult, identifiers: bool = False):
    """One row per slice of header fields (no pixels decoded) as a pandas DataFrame.

    Patient-identifying columns (``patient_id``, name, birth date, accession, institution) are left
    out unless ``identifiers=True``.
    """
    import pandas as pd  # imported here so `ich info` stays light

    result = sources if isinstance(sources, LoadResult) else load(sources, pixels=False)
    rows = []
    for series in result.series:
        for index, s in enumerate(series.slices):
            row = {"path": s.path, "slice_index": index, **s.header_row()}
            if identifiers:
                row.update(patient_id=s.patient_id, **s.identifiers)
            rows.append(row)
    return pd.DataFrame(rows)
