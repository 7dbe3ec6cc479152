"""Slice and study predictions from a checkpoint.

:class:`Predictor` loads a checkpoint once, keeps the model resident on the best device (CUDA in
bf16 when present, else CPU in fp32) and scores every slice of a series in batches, through an
:mod:`ich.engine` (on the CPU ONNX Runtime when installed, else PyTorch; PyTorch on CUDA). It is shared
between threads (Streamlit sessions, listener workers): the model is never modified after loading and
PyTorch forward passes are serialised by :attr:`Predictor.lock`.

Study score (the worklist's likelihood) = the mean of the ``k`` highest per-slice ``any``
probabilities (fewer for a shorter series). ``k`` is the checkpoint's ``study_top_k`` (2 when it
does not say); :mod:`train.bundle` chooses it on out-of-fold predictions. Probabilities are the
checkpoint's calibrated ones (``calibration``: :class:`ich.calibration.Platt`), averaged over the
slice and its mirror image when the checkpoint was validated that way (``tta_flip``).

A thin series (spacing under :data:`ich.slabs.THIN_MM`) is scored on ~5 mm slab means, the thickness
the model learned from (:mod:`ich.slabs`); each thin slice gets its slab's row, and the study score
counts each slab once.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ich import checkpoint, engine, review, slabs
from ich.calibration import Platt
from ich.dicom import Series
from ich.files import default_weights
from ich.labels import CLASSES, DEFAULT_THRESHOLD
from ich.models import ModelInput
from ich.windowing import Preprocess, Window

__all__ = [
    "Predictor",
    "StudyPrediction",
    "default_weights",
    "resolve_device",
    "study_score",
    "aggregation_text",
    "TOP_K",
    "STUDY_AGGREGATION",
]

TOP_K = 2


def aggregation_text(k: int) -> str:
    """How a study score is made from its slices, in words."""
    return "highest slice 'any' probability" if k == 1 else f"mean of the {k} highest slice 'any' probabilities"


STUDY_AGGREGATION = aggregation_text(TOP_K)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no CUDA GPU is available")
    return device


def study_score(any_probs: np.ndarray, k: int = TOP_K) -> float:
    """Mean of the ``k`` highest slice probabilities (see module docstring)."""
    if len(any_probs) == 0:
        return float("nan")
    top = np.sort(np.asarray(any_probs, dtype=np.float64))[-k:]
    return float(top.mean())


@dataclass
class StudyPrediction:
    sop_uids: list[str]
    probs: np.ndarray  # float32 (N, len(CLASSES)); NaN for classes the checkpoint does not predict
    score: float
    top_subtype: str | None
    flagged: bool
    timings: dict[str, float] = field(default_factory=dict)
    slab_of_slice: np.ndarray | None = None  # a thin series' slab of each slice (ich.slabs); None: scored per slice


class Predictor:
    """A loaded checkpoint ready to score slices. Build with :meth:`from_checkpoint`."""

    def __init__(
        self,
        model: torch.nn.Module,
        metadata: dict,
        device: torch.device,
        batch_size: int = 32,
        engine_name: str | None = engine.TORCH,  # from_checkpoint's default is auto: its metadata names the weights
    ) -> None:
        self.model = model
        self.metadata = metadata
        self.device = device
        self.batch_size = batch_size
        self.model_classes: tuple[str, ...] = tuple(metadata["classes"])
        unknown = set(self.model_classes) - set(CLASSES)
        if unknown:
            raise checkpoint.CheckpointError(f"checkpoint predicts unknown classes {sorted(unknown)}")
        if "any" not in self.model_classes:  # the study score, the flag and the worklist order come from it
            raise checkpoint.CheckpointError(
                f"checkpoint predicts {list(self.model_classes)} but not 'any', which studies are scored and flagged by"
            )
        self._columns = [CLASSES.index(c) for c in self.model_classes]
        thresholds = metadata["thresholds"]
        self.thresholds: dict[str, float] = (
            {c: float(thresholds[c]) for c in self.model_classes}
            if isinstance(thresholds, dict)
            else dict(zip(self.model_classes, map(float, thresholds)))
        )
        self.top_k = int(metadata.get("study_top_k", TOP_K))
        self.tta_flip = bool(metadata.get("tta_flip", False))
        calibration = metadata.get("calibration")
        self.calibration = Platt.from_json(calibration, self.model_classes) if calibration else None
        windows = tuple(Window(str(n), float(lv), float(w)) for n, lv, w in metadata["windows"])
        self.preprocess = Preprocess(
            size=int(metadata["input_size"]),
            windows=windows,
            crop=metadata.get("crop", True),
            clip=metadata.get("clip", False),
        )
        # channels_last everywhere: cuDNN's and oneDNN's fast layout (on the 2-core CPU, 36 slices with
        # flip: 0.83 -> 0.61 s, same probabilities to 4 decimals).
        self.to_input = ModelInput(device, metadata["mean"], metadata["std"], channels_last=True)
        self.lock = threading.Lock()
        reference = engine.TorchEngine(model, self.to_input, self.tta_flip, self.lock)
        self.engine: engine.Engine = engine.build(engine_name, reference, metadata)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike | None = None,
        device: str | torch.device = "auto",
        batch_size: int = 32,
        engine_name: str | None = None,
    ) -> Predictor:
        """``engine_name``: an :data:`ich.engine.ENGINES` name; ``None``: ``$ICH_ENGINE``, else ``auto``."""
        engine.requested(engine_name)  # a wrong name fails before the model loads
        dev = resolve_device(device)
        model, metadata = checkpoint.load_model(path or default_weights(), dev)
        model = model.to(memory_format=torch.channels_last)
        for p in model.parameters():
            p.requires_grad_(False)
        predictor = cls(model, metadata, dev, batch_size, engine_name)
        if dev.type == "cuda":
            predictor.warm_up()
        return predictor

    def warm_up(self) -> None:
        """One blank slice through the model. CUDA sets up cuBLAS/cuDNN and loads kernels on the first
        batch (0.3-0.5 s on an H200): better paid once at load than on the first study read."""
        size = int(self.metadata["input_size"])
        self.predict_batch(np.zeros((1, len(self.metadata["windows"]), size, size), np.uint8))

    @property
    def name(self) -> str:
        return f"{self.metadata['arch']} ({self.metadata.get('name', 'checkpoint')})"

    @property
    def aggregation(self) -> str:
        return aggregation_text(self.top_k)

    @property
    def threads(self) -> int:
        """CPU threads one batch keeps busy (the listener runs ``cores // threads`` exams at once)."""
        return self.engine.threads

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """(Calibrated) probabilities ``(B, len(model_classes))`` for preprocessed uint8 slices."""
        raw = self.engine.logits(batch).astype(np.float64)
        if self.calibration is not None:
            return self.calibration.apply_logits(raw).astype(np.float32)
        return (1 / (1 + np.exp(-raw))).astype(np.float32)

    def predict_volume(
        self, volume: Sequence[np.ndarray] | np.ndarray, progress: Callable[[float], None] | None = None
    ) -> tuple[np.ndarray, dict]:
        """``(probs (N, len(CLASSES)), timings)`` for a sequence of HU slices or an ``(N, H, W)`` volume."""
        start = time.perf_counter()
        inputs = np.stack([self.preprocess(hu) for hu in volume]) if len(volume) else np.zeros((0, 3, 1, 1), np.uint8)
        prep = time.perf_counter()
        out = np.full((len(inputs), len(CLASSES)), np.nan, dtype=np.float32)
        for i in range(0, len(inputs), self.batch_size):
            out[i : i + self.batch_size, self._columns] = self.predict_batch(inputs[i : i + self.batch_size])
            if progress is not None:
                progress(min(1.0, (i + self.batch_size) / len(inputs)))
        end = time.perf_counter()
        return out, {"preprocess_s": prep - start, "infer_s": end - prep}

    def summarize(
        self,
        sop_uids: list[str],
        probs: np.ndarray,
        timings: dict | None = None,
        slab_of_slice: np.ndarray | None = None,
    ) -> StudyPrediction:
        """Study score, flag and top subtype of per-slice ``probs``.

        With ``slab_of_slice`` (:func:`ich.slabs.slab_of_slice`) each row repeats its slab's, and the
        score is over slabs: top-k of the repeated rows would count one slab k times.
        """
        any_col = probs[:, CLASSES.index("any")]
        if slab_of_slice is not None:
            any_col = any_col[np.unique(slab_of_slice, return_index=True)[1]]
        score = study_score(any_col, self.top_k)
        # The headline subtype is one the viewer names on some slice (review.calls: at its threshold, on a slice
        # called bleeding), the one with the highest such probability; none where no slice names one, so the
        # worklist never shows a subtype at a probability the viewer calls too low to name.
        called = review.calls(probs, self.thresholds)
        peaks = {
            c: float(probs[called[:, i], i].max()) for i, c in enumerate(CLASSES) if c != "any" and called[:, i].any()
        }
        top = max(peaks, key=lambda c: peaks[c]) if peaks else None
        flagged = bool(score >= self.thresholds.get("any", DEFAULT_THRESHOLD))
        return StudyPrediction(sop_uids, probs, score, top, flagged, dict(timings or {}), slab_of_slice)

    def predict_series(self, series: Series, progress: Callable[[float], None] | None = None) -> StudyPrediction:
        """One row per slice of ``series``; a thin one is scored on its slab means (module docstring)."""
        pixels = [s.pixels for s in series.slices]
        locations = series.locations()
        slab = None if locations is None else slabs.slab_of_slice(locations, series.spacing)
        if slab is None:
            probs, timings = self.predict_volume(pixels, progress)
            return self.summarize(series.sop_uids, probs, timings)
        start = time.perf_counter()
        means = slabs.slab_means(pixels, slab)
        average_s = time.perf_counter() - start
        slab_probs, timings = self.predict_volume(means, progress)
        timings["preprocess_s"] += average_s
        note = f"thin series ({series.spacing:.1f} mm): scored on {len(slab_probs)} slabs of ~{slabs.SLAB_MM:g} mm"
        if note not in series.notes:  # scoring the same series again says it once
            series.notes.append(note)
        return self.summarize(series.sop_uids, slab_probs[slab], timings, slab)
