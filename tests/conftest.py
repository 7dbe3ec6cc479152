from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real scans beside the checkout (../shared/data); absent in a user's fresh clone."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real head-CT data not found at {SHARED_DATA} (only present beside the project in CI/dev)")
    return SHARED_DATA


def make_checkpoint(stem: Path, classes: tuple[str, ...] | None = None, arch: str = "resnet18", size: int = 64, **extra) -> Path:
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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("weights") / "tiny")
