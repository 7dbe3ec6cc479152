"""Helpers the tests import (fixtures stay in ``conftest.py``)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def make_checkpoint(
    stem: Path, classes: tuple[str, ...] | None = None, arch: str = "resnet18", size: int = 64, **extra
) -> Path:
    """A randomly initialised checkpoint, small enough for fast tests; returns its JSON path.

    ``extra`` metadata (``calibration``, ``tta_flip``, ``study_top_k``, input ``windows``/``clip``...) overrides the defaults.
    """
    import torch

    from ich import checkpoint
    from ich.labels import CLASSES
    from ich.models import build_model
    from ich.windowing import MODEL_WINDOWS

    classes = tuple(classes or CLASSES)
    torch.manual_seed(0)
    model = build_model(arch, len(classes))
    metadata = {
        "arch": arch,
        "num_classes": len(classes),
        "classes": list(classes),
        "task": "multilabel" if len(classes) > 1 else "binary",
        "windows": [[w.name, w.level, w.width] for w in MODEL_WINDOWS],
        "input_size": size,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "thresholds": {c: 0.5 for c in classes},
    } | extra
    return checkpoint.save(model, stem, metadata)[1]
