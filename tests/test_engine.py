"""ich.engine: ONNX Runtime gives torch's probabilities, is exported once, and any failure falls back to torch."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from ich import dicom, engine
from ich.inference import Predictor
from ich.labels import CLASSES
from tests.helpers import head, make_checkpoint

# Calibrated probabilities of every engine against torch's (the reference), on the same slices.
PROBABILITY_TOLERANCE = 1e-4
CALIBRATION = {"method": "platt", "a": dict.fromkeys(CLASSES, 1.5), "b": dict.fromkeys(CLASSES, -0.5)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One data directory for the module, so each checkpoint's graph is exported once."""
    path = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ICH_DATA_DIR", str(path))
        patch.delenv(engine.ENGINE_ENV, raising=False)
        yield path


@pytest.fixture(scope="module")
def flipped(tmp_path_factory, data_dir) -> Path:
    """The tiny test network with the bundled model's test-time flip and calibration."""
    return make_checkpoint(tmp_path_factory.mktemp("weights") / "flipped", tta_flip=True, calibration=CALIBRATION)


def slices(n: int = 5) -> list[np.ndarray]:
    """Head-like HU slices, each a little different."""
    return [head(centre=(70 + 4 * i, 90 - 3 * i)) for i in range(n)]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ich.engine" and r.levelno >= logging.WARNING]


def test_onnxruntime_gives_torch_probabilities(flipped):
    torch_predictor = Predictor.from_checkpoint(flipped, device="cpu", engine_name="torch")
    onnx_predictor = Predictor.from_checkpoint(flipped, device="cpu", engine_name="onnxruntime")
    assert (torch_predictor.engine.name, onnx_predictor.engine.name) == ("torch", "onnxruntime")
    reference, _ = torch_predictor.predict_volume(slices())
    probs, _ = onnx_predictor.predict_volume(slices())
    np.testing.assert_allclose(probs, reference, rtol=0, atol=PROBABILITY_TOLERANCE)
    one, _ = onnx_predictor.predict_volume(slices(1))  # the batch axis is dynamic: a batch of one too
    np.testing.assert_allclose(one, reference[:1], rtol=0, atol=PROBABILITY_TOLERANCE)
    assert onnx_predictor.threads == engine.cpu_threads()


def test_auto_is_onnxruntime_on_the_cpu_and_the_environment_can_force_torch(flipped, monkeypatch):
    assert Predictor.from_checkpoint(flipped, device="cpu").engine.name == "onnxruntime"
    monkeypatch.setenv(engine.ENGINE_ENV, "torch")
    assert Predictor.from_checkpoint(flipped, device="cpu").engine.name == "torch"
    monkeypatch.setenv(engine.ENGINE_ENV, "tensorrt")
    with pytest.raises(ValueError, match="engine 'tensorrt': choose one of auto, torch, onnxruntime"):
        Predictor.from_checkpoint(flipped, device="cpu")


def test_the_graph_is_exported_once_under_the_data_directory(flipped, data_dir, monkeypatch):
    metadata = Predictor.from_checkpoint(flipped, device="cpu", engine_name="onnxruntime").metadata  # exported now
    path = engine.onnx_path(metadata)
    assert path.parent == data_dir / "engines" and path.name.startswith(metadata["sha256"]) and path.is_file()

    def no_export(*args: object) -> Path:
        raise AssertionError("exported again")

    monkeypatch.setattr(engine, "export", no_export)
    assert Predictor.from_checkpoint(flipped, device="cpu", engine_name="onnxruntime").engine.name == "onnxruntime"
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]


def test_a_failed_export_scores_with_torch_and_says_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ICH_DATA_DIR", str(tmp_path))
    checkpoint = make_checkpoint(tmp_path / "fresh", tta_flip=True)

    def broken(*args: object) -> Path:
        raise RuntimeError("exporter unavailable")

    monkeypatch.setattr(engine, "export", broken)
    with caplog.at_level(logging.WARNING, logger="ich"):
        predictor = Predictor.from_checkpoint(checkpoint, device="cpu", engine_name="onnxruntime")
    assert predictor.engine.name == "torch"
    (line,) = warnings(caplog)
    assert line == "ONNX Runtime engine not used (RuntimeError: exporter unavailable): scoring with torch"


def test_a_stale_or_damaged_graph_is_never_used(flipped, tiny_checkpoint, caplog):
    """Another checkpoint's graph (here: the same weights without test-time flip) in this one's place, then junk."""
    metadata = Predictor.from_checkpoint(flipped, device="cpu", engine_name="onnxruntime").metadata
    plain = Predictor.from_checkpoint(tiny_checkpoint, device="cpu", engine_name="onnxruntime").metadata
    assert plain["sha256"] == metadata["sha256"] and not plain.get("tta_flip")  # same weights, another graph
    shutil.copyfile(engine.onnx_path(plain), engine.onnx_path(metadata))
    with caplog.at_level(logging.WARNING, logger="ich"):
        assert Predictor.from_checkpoint(flipped, device="cpu").engine.name == "torch"
        engine.onnx_path(metadata).write_bytes(b"not an ONNX model")
        assert Predictor.from_checkpoint(flipped, device="cpu").engine.name == "torch"
    differs, damaged = warnings(caplog)
    assert "its logits differ from torch's" in differs and "scoring with torch" in differs
    assert "scoring with torch" in damaged
    engine.onnx_path(metadata).unlink()  # the next load exports it again
    assert Predictor.from_checkpoint(flipped, device="cpu").engine.name == "onnxruntime"


@pytest.mark.slow
def test_bundled_model_on_real_series_same_probabilities_and_flags(shared_data, data_dir):
    found = dicom.load(shared_data / "rsna-sample")
    assert len(found.series) == 7
    predictors = [Predictor.from_checkpoint(device="cpu", engine_name=name) for name in ("torch", "onnxruntime")]
    assert [p.engine.name for p in predictors] == ["torch", "onnxruntime"]
    for series in found.series:
        reference, onnx = (p.predict_series(series) for p in predictors)
        np.testing.assert_allclose(onnx.probs, reference.probs, rtol=0, atol=PROBABILITY_TOLERANCE)
        assert onnx.flagged == reference.flagged and onnx.top_subtype == reference.top_subtype
