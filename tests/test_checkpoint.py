"""ich.checkpoint: safetensors + JSON round trip, hash check, refusal of incomplete metadata."""

from __future__ import annotations

import json

import pytest
import torch

from ich import checkpoint, models


def _metadata(**extra) -> dict:
    return {
        "arch": "resnet18",
        "num_classes": 2,
        "classes": ["any", "epidural"],
        "task": "multilabel",
        "windows": [["brain", 40, 80], ["subdural", 80, 200], ["bone", 600, 2800]],
        "input_size": 64,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "thresholds": {"any": 0.5, "epidural": 0.3},
        "training": {"train_slices": 10},
        "metrics": {"mean_auc": float("nan"), "accuracy": 0.9},
        **extra,
    }


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = models.build_model("resnet18", 2).to(memory_format=torch.channels_last).eval()
    weights, meta = checkpoint.save(model, tmp_path / "model", _metadata())
    return model, weights, meta


def test_round_trip(saved, tmp_path):
    model, weights, meta = saved
    assert weights == tmp_path / "model.safetensors" and meta == tmp_path / "model.json"
    state, metadata = checkpoint.load(weights)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert metadata["classes"] == ["any", "epidural"] and metadata["thresholds"]["epidural"] == 0.3
    assert len(metadata["sha256"]) == 64 and metadata["ich_version"] and metadata["created"]
    assert metadata["metrics"]["mean_auc"] is None  # NaN is not JSON: stored as null
    json.loads(meta.read_text())  # strict JSON

    loaded, _ = checkpoint.load_model(tmp_path / "model")  # a stem works too
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert not loaded.training


def test_half_stores_half_the_bytes_and_loads_back_as_float32(saved, tmp_path):
    model, weights, _ = saved
    half, meta = checkpoint.save(model, tmp_path / "half", _metadata(), half=True)
    assert half.stat().st_size < 0.51 * weights.stat().st_size
    state, metadata = checkpoint.load(half)
    assert metadata["weights_dtype"] == "float16" and checkpoint.load(weights)[1]["weights_dtype"] == "float32"
    assert {v.dtype for v in state.values()} == {torch.float16, torch.int64}  # BatchNorm's counters stay integers
    loaded, _ = checkpoint.load_model(meta)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        assert (torch.sigmoid(loaded(x)) - torch.sigmoid(model(x))).abs().max() < 2e-3


def test_tampered_weights_are_refused(saved):
    _, weights, _ = saved
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="sha256"):
        checkpoint.load(weights)


def test_missing_files_and_keys(tmp_path, saved):
    _, weights, meta = saved
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.load(tmp_path / "nothing")
    metadata = json.loads(meta.read_text())
    meta.write_text("[]")
    with pytest.raises(checkpoint.CheckpointError, match="JSON object"):
        checkpoint.load(weights)
    del metadata["windows"]
    meta.write_text(json.dumps(metadata))
    with pytest.raises(checkpoint.CheckpointError, match="windows"):
        checkpoint.load(weights)
    model = models.build_model("resnet18", 2)
    with pytest.raises(checkpoint.CheckpointError, match="num_classes"):
        checkpoint.save(model, tmp_path / "bad", _metadata(num_classes=3))
    with pytest.raises(checkpoint.CheckpointError, match="task"):
        checkpoint.save(model, tmp_path / "bad", _metadata(task="regression"))


def test_wrong_architecture_is_a_checkpoint_error(saved):
    _, weights, meta = saved
    metadata = json.loads(meta.read_text())
    metadata["arch"] = "resnet34"
    meta.write_text(json.dumps(metadata))
    with pytest.raises(checkpoint.CheckpointError, match="do not fit resnet34"):
        checkpoint.load_model(weights)
