"""The dashboard's shared resources: the model, the store and study volumes, cached once per server."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import streamlit as st

import ich.worklist
from ich import explain, viewer
from ich.inference import STUDY_AGGREGATION, Predictor, aggregation_text, default_weights
from ich.viewer.component import data_id
from ich.viewer.planes import Planes
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


@st.cache_resource(max_entries=16, show_spinner=False)
def affine(directory: str, study_id: int, version: str, series_uid: str | None = None) -> np.ndarray | None:
    """The series' voxel-to-LPS affine (read from its volume file once, not on every rerun)."""
    return worklist(directory).affine(study_id, series_uid)


@st.cache_resource(max_entries=16, show_spinner=False)
def planes(directory: str, study_id: int, version: str, thin: bool, series_uid: str | None = None) -> Planes:
    """What the viewer steps through: a thin series' slabs (unless ``thin``), else its slices."""
    vol = volume(directory, study_id, version, series_uid)
    locations = worklist(directory).locations(study_id, series_uid)
    return Planes.of(len(vol), affine(directory, study_id, version, series_uid), thin=thin, locations=locations)


@st.cache_resource(max_entries=4, show_spinner=False)
def shown_volume(directory: str, study_id: int, version: str, thin: bool, series_uid: str | None = None) -> np.ndarray:
    """The HU of :func:`planes`: the series, or its slab means (as the model scored them)."""
    shown = planes(directory, study_id, version, thin, series_uid).volume(
        volume(directory, study_id, version, series_uid)
    )
    shown.flags.writeable = False
    return shown


@st.cache_resource(max_entries=4, show_spinner=False)
def volume_file(directory: str, study_id: int, version: str, thin: bool, series_uid: str | None = None) -> bytes:
    """The viewer's planes as ``.nii.gz`` bytes (sent to a browser only while it does not hold them)."""
    to_lps = planes(directory, study_id, version, thin, series_uid).affine(
        affine(directory, study_id, version, series_uid)
    )
    return viewer.volume_nifti(shown_volume(directory, study_id, version, thin, series_uid), to_lps)


@dataclass(frozen=True)
class ViewerVolume:
    """A series as the viewer gets it: its id, its bytes on demand, and where each plane lies."""

    volume_id: str
    data: Callable[[], bytes]
    hu: Callable[[], np.ndarray]  # the planes' HU (P, H, W)
    planes: Planes
    normal: list[float]
    locations: list[float]  # each plane's position on the NIfTI grid, by which the browser names it
    positions: list[float]  # each plane's true centre, shown on the image
    known: bool  # whether the headers gave positions


def viewer_volume(
    directory: str, study_id: int, version: str, thin: bool = False, series_uid: str | None = None
) -> ViewerVolume:
    """A series for the viewer, as slabs when it is thin and ``thin`` is not asked for."""
    to_lps = affine(directory, study_id, version, series_uid)
    shown = planes(directory, study_id, version, thin, series_uid)
    normal, locations = viewer.slice_axis(shown.affine(to_lps), len(shown))
    _, slice_locations = viewer.slice_axis(to_lps, len(shown.of_slice))
    return ViewerVolume(
        data_id(f"volume:{directory}:{study_id}:{version}:{series_uid or ''}:{'thin' if thin else ''}"),
        lambda: volume_file(directory, study_id, version, thin, series_uid),
        lambda: shown_volume(directory, study_id, version, thin, series_uid),
        shown,
        normal,
        locations,
        shown.centres(slice_locations),
        to_lps is not None,
    )


# The NIfTI bytes, not the float maps: a 238-slice study's maps are 250 MB, its compressed file a few MB.
@st.cache_resource(max_entries=8, show_spinner=False)
def heatmap_file(directory: str, study_id: int, version: str, target: str, weights: str, thin: bool) -> bytes:
    """The Grad-CAM for ``target`` of the viewer's planes (one scale for the whole study), as ``.nii.gz`` bytes."""
    vol = shown_volume(directory, study_id, version, thin)
    bar = st.progress(0.0, f"Computing the heatmap for {target} on {len(vol)} planes…")
    cams = explain.study_heatmap(predictor(weights), vol, target, progress=bar.progress)
    bar.empty()
    to_lps = planes(directory, study_id, version, thin).affine(affine(directory, study_id, version))
    return viewer.heatmap_nifti(cams, to_lps)


def store() -> Worklist:
    return worklist(str(data_dir()))


class DemoSeeding:
    """The first-start demo, seeded in a background thread so that no page waits for it.

    ``fraction`` and ``text`` say how far it got; once ``done``, ``problems`` says what could not be prepared.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.fraction, self.text = 0.0, "starting"
        self.problems: list[str] = []
        self.done = False

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def running(self) -> bool:
        return self.started and not self.done

    def start(self, wl: Worklist, pred: Predictor) -> None:
        """Seed ``wl`` with ``pred``'s scores, once: a second call (another session, a rerun) finds it started."""
        with self._lock:
            if self._thread is None:
                # A daemon: stopping the server does not wait for the demo (the store's writes are transactions).
                self._thread = threading.Thread(target=self._seed, args=(wl, pred), name="demo-seeding", daemon=True)
                self._thread.start()

    def _step(self, fraction: float, text: str) -> None:
        self.fraction, self.text = fraction, text

    def _seed(self, wl: Worklist, pred: Predictor) -> None:
        try:
            # ich.worklist.seed_demo is looked up when called: tests make it faster.
            report = ich.worklist.seed_demo(wl, pred, progress=self._step)
            self.problems = [str(p) for p in report.problems] if report is not None else []
        except Exception as exc:  # a failed demo is a warning on the page, never a traceback
            log.exception("the demo studies could not be prepared")
            self.problems = [f"{type(exc).__name__}: {exc}"]
        self.done = True


@st.cache_resource(show_spinner=False)
def demo_seeding(directory: str) -> DemoSeeding:
    """The demo seeding of the store in ``directory``: one per server process, shared by every session."""
    return DemoSeeding()


def load_model() -> tuple[Predictor | None, str | None]:
    """``(predictor, None)``, or ``(None, why)`` when the checkpoint cannot be loaded."""
    try:
        return predictor(str(default_weights())), None
    except Exception as exc:  # a missing or corrupt checkpoint must not hide the worklist
        log.exception("the model could not be loaded")
        return None, f"{type(exc).__name__}: {exc}"


def model() -> Predictor | None:
    return load_model()[0]


def aggregation(top_k: int | None = None) -> str:
    """How a study scored with ``top_k`` was scored, in words; for a study stored without its rule, the
    loaded model's (or the default's when no model loads)."""
    if top_k:
        return aggregation_text(top_k)
    pred = model()
    return pred.aggregation if pred is not None else STUDY_AGGREGATION


def pred_metadata() -> dict:
    """The loaded checkpoint's metadata (empty when no model could be loaded)."""
    pred = model()
    return pred.metadata if pred is not None else {}
