"""The worklist: scored studies kept on disk (:mod:`.store`) and the uploads put on it (:mod:`.intake`).

The store holds studies, their slices, volumes and radiologists' reads in one data directory;
:func:`ingest` reads uploaded series one at a time, scores them and stores them, and
:func:`seed_demo` fills a fresh worklist with synthetic demo studies once.
"""

from __future__ import annotations

from ich.worklist.intake import DEMO_CASES, IngestReport, ingest, seed_demo
from ich.worklist.store import (
    INTAKE_FAILED,
    INTAKE_RECEIVING,
    STATUS_CLEAR,
    STATUS_HEMORRHAGE,
    STATUS_NEW,
    STATUSES,
    TRUTH_SOURCES,
    StoreError,
    StudyRecord,
    Worklist,
    data_dir,
)

# The names both modules export, in one place for `from ich.worklist import ...`.
__all__ = [
    "DEMO_CASES",
    "INTAKE_FAILED",
    "INTAKE_RECEIVING",
    "STATUSES",
    "STATUS_CLEAR",
    "STATUS_HEMORRHAGE",
    "STATUS_NEW",
    "TRUTH_SOURCES",
    "IngestReport",
    "StoreError",
    "StudyRecord",
    "Worklist",
    "data_dir",
    "ingest",
    "seed_demo",
]
