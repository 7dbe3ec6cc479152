"""The dashboard's shared resources: the model, the store and study volumes, cached once per server."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import streamlit as st

from ich import explain, viewer
from ich.inference import Predictor, default_weights
from ich.viewer.component import data_id
from ich.worklist import Worklist, data_dir

log = logging.getLogger(__name__)


@st.cache_resource(show_spinner="Loading the model…")
def predictor(weights: str) -> Predictor:
    return Predictor.from_checkpoint(weights, device="auto")


@st.cache_resource(show_spinner=False)
def worklist(directory: str) -> Worklist:
    return Worklist(directory)


# A volume is shared read-only by every session; cache_resource hands out the same array, where
# cache_data would unpickle 18 MB on every slider move.
@st.cache_resource(max_entries=4, show_spinner="Loading images…")
def volume(directory: str, study_id: int, version: str, series_uid: str | None = None) -> np.ndarray:
    """The scored series' HU, or (``series_uid``) another series of the exam kept for the viewer."""
    vol = worklist(directory).volume(study_id, series_uid)
    vol.flags.writeable = False
    return vol


@st.cache_resource(max_entries=4, show_spinner=False)
def volume_file(directory: str, study_id: int, version: str, series_uid: str | None = None) -> bytes:
    """A series as ``.nii.gz`` bytes for the viewer (sent to a browser only while it does not hold them)."""
    affine = worklist(directory).affine(study_id, series_uid)
    return viewer.volume_nifti(volume(directory, study_id, version, series_uid), affine)


def viewer_volume(
    directory: str, study_id: int, version: str, series_uid: str | None = None
) -> tuple[str, Callable[[], bytes], list[float], list[float], bool]:
    """A series for the viewer: (its id, its ``.nii.gz`` bytes on demand, slice normal, slice positions,
    whether the headers gave them)."""
    affine = worklist(directory).affine(study_id, series_uid)
    normal, locations = viewer.slice_axis(affine, len(volume(directory, study_id, version, series_uid)))
    return (
        data_id(f"volume:{directory}:{study_id}:{version}:{series_uid or ''}"),
        lambda: volume_file(directory, study_id, version, series_uid),
        normal,
        locations,
        affine is not None,
    )


# The NIfTI bytes, not the float maps: a 238-slice study's maps are 250 MB, its compressed file a few MB.
@st.cache_resource(max_entries=8, show_spinner=False)
def heatmap_file(directory: str, study_id: int, version: str, target: str, weights: str) -> bytes:
    """The study's Grad-CAM for ``target`` (one scale for the whole study) as ``.nii.gz`` bytes."""
    vol = volume(directory, study_id, version)
    bar = st.progress(0.0, f"Computing the heatmap for {target} on {len(vol)} slices…")
    cams = explain.study_heatmap(predictor(weights), vol, target, progress=bar.progress)
    bar.empty()
    return viewer.heatmap_nifti(cams, worklist(directory).affine(study_id))


def store() -> Worklist:
    return worklist(str(data_dir()))


def load_model() -> tuple[Predictor | None, str | None]:
    """``(predictor, None)``, or ``(None, why)`` when the checkpoint cannot be loaded."""
    try:
        return predictor(str(default_weights())), None
    except Exception as exc:  # a missing or corrupt checkpoint must not hide the worklist
        log.exception("the model could not be loaded")
        return None, f"{type(exc).__name__}: {exc}"


def model() -> Predictor | None:
    return load_model()[0]


def pred_metadata() -> dict:
    """The loaded checkpoint's metadata (empty when no model could be loaded)."""
    pred = model()
    return pred.metadata if pred is not None else {}
