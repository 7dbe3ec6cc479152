"""Model checkpoints: ``<stem>.safetensors`` (weights) + ``<stem>.json`` (everything else).

The JSON records what inference must reproduce (architecture, class order, windows, input size,
normalisation, thresholds) and how the model was made (data, metrics, version, time), plus the
sha256 of the weight file. Loading checks that hash and reads weights with safetensors only:
a checkpoint can never run code, unlike a pickled ``torch.load`` file.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ich import __version__
from ich.files import atomic_write
from ich.models import build_model, unwrap

__all__ = [
    "CheckpointError",
    "REQUIRED_KEYS",
    "FORMAT_VERSION",
    "save",
    "load",
    "load_model",
    "paths",
    "ich_version",
    "json_ready",
]

FORMAT_VERSION = 1
# What inference needs to rebuild the network and its input exactly.
REQUIRED_KEYS = ("arch", "num_classes", "classes", "task", "windows", "input_size", "mean", "std", "thresholds")
TASKS = ("binary", "multilabel")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not match its recorded hash."""


def ich_version() -> str:
    return __version__


def paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(weights, metadata)`` paths for a stem, a ``.safetensors`` or a ``.json`` path."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def json_ready(value: Any) -> Any:
    """Strict JSON: numpy scalars to Python, NaN/inf to ``null``, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, 0-d tensors
        return json_ready(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _validate(metadata: dict) -> None:
    if not isinstance(metadata, dict):
        raise CheckpointError(f"checkpoint metadata must be a JSON object, got {type(metadata).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in metadata]
    if missing:
        raise CheckpointError(f"checkpoint metadata lacks {', '.join(missing)}")
    if metadata["task"] not in TASKS:
        raise CheckpointError(f"task must be one of {TASKS}, got {metadata['task']!r}")
    if len(metadata["classes"]) != metadata["num_classes"]:
        raise CheckpointError(f"{len(metadata['classes'])} classes listed for num_classes={metadata['num_classes']}")


def save(model: nn.Module, path_stem: str | os.PathLike, metadata: dict, half: bool = False) -> tuple[Path, Path]:
    """Write the weights and metadata; returns ``(weights_path, json_path)``.

    ``metadata`` must hold :data:`REQUIRED_KEYS`; ``sha256``, ``ich_version``, ``created``,
    ``format`` and ``weights_dtype`` are filled in here. DDP / ``torch.compile`` wrappers are removed first.
    ``half`` stores floating-point tensors as float16, half the bytes (a shipped model: the repository,
    a download, what travels to a GPU machine); loading casts them back to the model's float32 (the
    bundled model's probabilities on the 235 rsna-sample slices moved by 0.0005 at most). Training runs
    keep float32, the precision a continued run starts from.
    """
    _validate(metadata)
    weights_path, json_path = paths(path_stem)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    # channels_last weights are strided views; safetensors stores dense row-major tensors.
    state = {k: v.detach().to("cpu").contiguous() for k, v in unwrap(model).state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    blob = st_save(state)
    meta = dict(metadata)
    meta.update(
        format=FORMAT_VERSION,
        weights=weights_path.name,
        weights_dtype="float16" if half else "float32",
        sha256=hashlib.sha256(blob).hexdigest(),
        ich_version=ich_version(),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    # Renamed into place: a crash never leaves a half-written checkpoint.
    atomic_write(weights_path, lambda tmp: tmp.write_bytes(blob))
    text = json.dumps(json_ready(meta), indent=2, allow_nan=False) + "\n"
    atomic_write(json_path, lambda tmp: tmp.write_text(text))
    return weights_path, json_path


def load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict on CPU, metadata)``, after checking the weight file's sha256."""
    weights_path, json_path = paths(path)
    for p in (weights_path, json_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint file not found: {p}")
    try:
        metadata = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{json_path}: not valid JSON ({exc})") from None
    _validate(metadata)
    # Hash and parse the same bytes, so the file cannot change between check and use.
    blob = weights_path.read_bytes()
    digest = hashlib.sha256(blob).hexdigest()
    if digest != metadata.get("sha256"):
        raise CheckpointError(
            f"{weights_path}: sha256 {digest} does not match {metadata.get('sha256')} recorded in {json_path.name}; "
            "the weights were modified or belong to another checkpoint"
        )
    return st_load(blob), metadata


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The network rebuilt with :func:`ich.models.build_model`, weights loaded, in eval mode."""
    state, metadata = load(path)
    model = build_model(metadata["arch"], int(metadata["num_classes"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{paths(path)[0]}: weights do not fit {metadata['arch']}: {exc}") from None
    return model.to(device).eval(), metadata
