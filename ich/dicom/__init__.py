"""Read head-CT DICOM into Hounsfield-unit series.

Sources are file paths, folders (walked recursively), ``.zip`` archives (members inflated in memory one
at a time, never extracted) and :class:`Upload` objects (bytes with a file name, as a browser sends them).
Every file that cannot be used becomes a :class:`Problem` naming the file and the reason; the rest still
load. So does a decompression bomb, refused while it inflates: a zip member or a Deflated-syntax file may
inflate to at most ``MAX_COMPRESSION_RATIO`` times its compressed size and ``MAX_FILE_BYTES``, an archive
as a whole to ``MAX_COMPRESSION_RATIO`` times its size and ``MAX_ARCHIVE_BYTES`` (:mod:`.sources`). And so
does a slice that differs from the rest of its series in size, pixel spacing or orientation.

Only :mod:`numpy` and :mod:`pydicom` are needed here, so ``python -m ich info`` starts quickly.

The modules, each importing only those listed before it: :mod:`.series` (slices, series, problems),
:mod:`.sources` (uploads, folders, zip archives), :mod:`.reader` (one file into slices),
:mod:`.stream` (:func:`load`, :func:`iter_series`) and :mod:`.metadata` (:func:`metadata_frame`).
"""

from __future__ import annotations

from ich.dicom.metadata import metadata_frame
from ich.dicom.reader import MAX_DIM as MAX_DIM
from ich.dicom.reader import MAX_FRAMES as MAX_FRAMES
from ich.dicom.reader import other_object, quiet_invalid_values, read_file, read_slice
from ich.dicom.series import DicomError, LoadResult, OtherObject, Problem, Series, Slice
from ich.dicom.sources import MAX_ARCHIVE_BYTES as MAX_ARCHIVE_BYTES
from ich.dicom.sources import MAX_COMPRESSION_RATIO as MAX_COMPRESSION_RATIO
from ich.dicom.sources import MAX_FILE_BYTES as MAX_FILE_BYTES
from ich.dicom.sources import MAX_ZIP_DEPTH as MAX_ZIP_DEPTH
from ich.dicom.sources import SKIPPED_NAMES as SKIPPED_NAMES
from ich.dicom.sources import SKIPPED_SUFFIXES as SKIPPED_SUFFIXES
from ich.dicom.sources import Source as Source
from ich.dicom.sources import Upload, iter_sources, read_member
from ich.dicom.stream import iter_series, load

# `Source` and the MAX_*/SKIPPED_* limits stay package attributes outside __all__, as before the split
# (imported `X as X` above). The limits are read in .reader and .sources: patch them there
# (MAX_FILE_BYTES in both: a zip member's limit in .sources, a Deflated file's in .reader).
__all__ = [
    "Upload",
    "Problem",
    "OtherObject",
    "DicomError",
    "Slice",
    "Series",
    "LoadResult",
    "read_slice",
    "other_object",
    "read_file",
    "quiet_invalid_values",
    "iter_sources",
    "load",
    "iter_series",
    "read_member",
    "metadata_frame",
]
