"""How a batch of preprocessed slices becomes logits: PyTorch or ONNX Runtime.

- :class:`TorchEngine`: the reference, and the GPU path (CUDA in bf16). Forward passes are serialised by
  the predictor's lock, which Grad-CAM (:mod:`ich.explain`) shares.
- :class:`OnnxEngine`: the same graph (normalisation, network, test-time flip) exported to ONNX and run by
  ONNX Runtime on the CPU, in float32 like the reference: 1.5 times torch's speed on a 2-core CPU, and far
  less slowed than torch when other work shares the cores (README, "Benchmarks").
  The export takes seconds, so it is made once per checkpoint and kept in
  ``<data dir>/engines/<weights sha256>-<graph settings>.onnx``; every load checks it against torch on a
  probe batch (:data:`LOGIT_TOLERANCE`), so a stale or damaged file can never change a score.

:func:`build` picks one (``auto``: ONNX Runtime on the CPU when it is installed, torch otherwise and on
CUDA; ``$ICH_ENGINE`` or an explicit name overrides). Any failure to export, load or verify the ONNX
graph logs one warning and scores with torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ich.files import atomic_write, data_dir, private_dir
from ich.models import ModelInput, flip_averaged_logits

__all__ = [
    "AUTO",
    "ENGINES",
    "ENGINE_ENV",
    "LOGIT_TOLERANCE",
    "ONNXRUNTIME",
    "TORCH",
    "Engine",
    "OnnxEngine",
    "TorchEngine",
    "build",
    "cpu_threads",
    "onnx_path",
    "requested",
]

log = logging.getLogger(__name__)

ENGINE_ENV = "ICH_ENGINE"
AUTO, TORCH, ONNXRUNTIME = "auto", "torch", "onnxruntime"
ENGINES = (AUTO, TORCH, ONNXRUNTIME)
ENGINES_DIR = "engines"
# Bumped when the exported graph changes meaning, so files written by an older version are not used.
GRAPH_FORMAT = 1
INPUT_NAME, OUTPUT_NAME = "slices", "logits"
EXPORT_BATCH = 2  # the traced example; the batch axis stays dynamic (a batch of 1 would be specialised)
PROBE_SLICES = 2
# float32 on both sides: the bundled model's logits differ by ~4e-6 (oneDNN vs MLAS summation order).
LOGIT_TOLERANCE = 1e-4


class Engine(Protocol):
    """uint8 slices ``(B, C, S, S)`` -> float32 logits ``(B, classes)``, flip-averaged when the checkpoint says."""

    name: str
    threads: int  # CPU threads one call keeps busy (the listener sizes its pool of scoring workers by it)

    def logits(self, batch: np.ndarray) -> np.ndarray: ...


def cpu_threads() -> int:
    """Cores this process may run on: its affinity, which a container or ``taskset`` may narrow."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def requested(choice: str | None = None) -> str:
    """``choice``, else ``$ICH_ENGINE``, else ``auto``; an unknown name is refused."""
    name = choice or os.environ.get(ENGINE_ENV) or AUTO
    if name not in ENGINES:
        raise ValueError(f"engine {name!r}: choose one of {', '.join(ENGINES)} (from --engine or ${ENGINE_ENV})")
    return name


class TorchEngine:
    """The model in PyTorch on its device (CUDA in bf16, the CPU in float32)."""

    name = TORCH

    def __init__(self, model: nn.Module, to_input: ModelInput, tta_flip: bool, lock: threading.Lock) -> None:
        self.model, self.to_input, self.tta_flip, self.lock = model, to_input, tta_flip, lock
        self.device = to_input.device
        self.threads = torch.get_num_threads() if self.device.type == "cpu" else 1  # on CUDA the GPU does the work

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """The graph itself (also what is exported): normalise, then the (flip-averaged) float32 logits."""
        return flip_averaged_logits(self.model, self.to_input(batch), self.tta_flip)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        # bf16 on GPU: the H100/H200 tensor cores. fp32 on CPU: bf16 is faster only where the CPU has native
        # bf16 (0.61 -> 0.34 s on one), and moves probabilities by up to 0.003, so it would differ by machine.
        with (
            self.lock,
            torch.inference_mode(),
            torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"),
        ):
            return self.forward(torch.from_numpy(batch)).cpu().numpy()


class _Graph(nn.Module):
    """:meth:`TorchEngine.forward` as a module, so ``torch.onnx.export`` finds the weights."""

    def __init__(self, reference: TorchEngine) -> None:
        super().__init__()
        self.model = reference.model
        self.reference = reference

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.reference.forward(batch)


class OnnxEngine:
    """An exported graph run by ONNX Runtime on the CPU; ``Run`` is thread-safe, so no lock."""

    name = ONNXRUNTIME

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch)})[0]


def onnx_path(metadata: dict) -> Path:
    """Where the checkpoint's graph is kept: named by its weights' hash and what else the graph holds."""
    settings = {k: metadata.get(k) for k in ("arch", "classes", "mean", "std", "tta_flip")} | {"format": GRAPH_FORMAT}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return data_dir() / ENGINES_DIR / f"{metadata['sha256']}-{digest}.onnx"


def export(reference: TorchEngine, channels: int, size: int, path: Path) -> Path:
    """Write the reference's graph as ONNX to ``path`` (renamed into place: concurrent loads never see half)."""
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # its optimiser logs a line per merged weight at INFO
    example = torch.zeros((EXPORT_BATCH, channels, size, size), dtype=torch.uint8)
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        _Graph(reference).eval(),
        (example,),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        verbose=False,
    )
    assert program is not None  # dynamo=True always returns the program
    private_dir(path.parent)
    return atomic_write(path, program.save)


def verify(engine: Engine, reference: Engine, channels: int, size: int) -> None:
    """Raise when ``engine``'s logits differ from the reference's by more than :data:`LOGIT_TOLERANCE` on a fixed
    random batch (a graph made from other weights or settings, or by a faulty exporter)."""
    probe = np.random.default_rng(0).integers(0, 256, (PROBE_SLICES, channels, size, size), dtype=np.uint8)
    gap = float(np.abs(engine.logits(probe) - reference.logits(probe)).max())
    if not gap <= LOGIT_TOLERANCE:  # NaN fails too
        raise ValueError(f"its logits differ from torch's by {gap:.2g} on a probe batch (tolerance {LOGIT_TOLERANCE})")


def _onnx_engine(reference: TorchEngine, metadata: dict) -> OnnxEngine:
    channels, size = len(metadata["windows"]), int(metadata["input_size"])
    path = onnx_path(metadata)
    if not path.is_file():
        log.info("exporting %s to ONNX (once per checkpoint): %s", metadata.get("name", "the checkpoint"), path)
        export(reference, channels, size, path)
    engine = OnnxEngine(path, cpu_threads())
    verify(engine, reference, channels, size)
    return engine


def build(choice: str | None, reference: TorchEngine, metadata: dict) -> Engine:
    """The engine :func:`requested` names, for a checkpoint whose torch engine is ``reference``."""
    name = requested(choice)
    if name == TORCH:
        return reference
    if reference.device.type != "cpu":  # ONNX Runtime is the CPU path here; torch runs CUDA
        if name == ONNXRUNTIME:
            log.warning("engine onnxruntime runs on the CPU only: scoring with torch on %s", reference.device)
        return reference
    try:
        return _onnx_engine(reference, metadata)
    except Exception as exc:  # noqa: BLE001 - the exporter and ONNX Runtime raise many types; torch scores instead
        log.warning("ONNX Runtime engine not used (%s: %s): scoring with torch", type(exc).__name__, exc)
        return reference
