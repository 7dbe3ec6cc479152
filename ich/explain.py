"""Grad-CAM heatmaps: where in a slice the model looked for a class.

The heatmap is computed on the model's input (head crop, resized) and mapped back onto the
original slice, so it lies over the image the radiologist scrolls through. Hooks live only for one
call and the model's parameters are never touched; the forward pass runs under the predictor's
lock, like every other use of the shared model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
import torchvision
from torch import nn

from ich.models import unwrap

__all__ = ["target_layer", "grad_cam", "study_heatmap", "pointing_hit"]


OUTSIDE_HEAD_HU = -300.0  # air and the scanner's padding: the map is cleared there


def target_layer(model: nn.Module) -> nn.Module:
    """ResNet ``layer2``; DenseNet, AlexNet, EfficientNet ``features`` (their last convolutional stage).

    ResNet's last stage, ``layer4``, is 6x6 cells at 192 px: its map cannot point at a bleed. On the
    bundled model and the 196 masked bleed slices of ``physionet-series`` (never trained on), the map's
    peak lands on the bleed / within 8 px of it on 5 / 40 slices from ``layer1``, 11 / 46 from ``layer2``
    (24x24 cells), 11 / 34 from ``layer3`` and 2 / 23 from ``layer4`` (chance 0.025): ``layer2`` is best
    or tied on both counts, though all are low. ``python -m train.bundle --checks-only`` remeasures it;
    see the model card's "Does the heatmap point at the bleed?".
    """
    net = unwrap(model)
    if isinstance(net, torchvision.models.ResNet):
        return net.layer2
    if isinstance(net, (torchvision.models.DenseNet, torchvision.models.AlexNet, torchvision.models.EfficientNet)):
        return net.features
    raise TypeError(f"no Grad-CAM layer known for {type(net).__name__}")


def _to_slice(cam: np.ndarray, shape: tuple[int, int], box: tuple[int, int, int] | None) -> np.ndarray:
    """Resize the input-space map over the crop square and paste it into a zero map of ``shape``."""
    if box is None:
        return cv2.resize(cam, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    top, left, side = box
    square = cv2.resize(cam, (side, side), interpolation=cv2.INTER_LINEAR)
    out = np.zeros(shape, np.float32)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + side, shape[0]), min(left + side, shape[1])
    out[y0:y1, x0:x1] = square[y0 - top : y1 - top, x0 - left : x1 - left]
    return out


def _cams(predictor, hus: Sequence[np.ndarray], target: str, layer: nn.Module | None = None) -> list[np.ndarray]:
    """Grad-CAM of ``target``'s logit for each HU slice, unscaled, on the slice's own grid and zero over air.

    ``layer``: the module whose activations are weighted (default :func:`target_layer`).

    One batched pass: in eval mode a slice's logit depends on that slice alone, so the gradient of
    the batch's summed logits is each slice's own gradient.
    """
    if target not in predictor.model_classes:
        raise ValueError(f"the model does not predict {target!r}; it predicts {', '.join(predictor.model_classes)}")
    column = predictor.model_classes.index(target)
    images = np.stack([predictor.preprocess(hu) for hu in hus])
    layer = target_layer(predictor.model) if layer is None else layer
    captured: list[torch.Tensor] = []
    with predictor.lock:
        handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(output))
        try:
            with torch.enable_grad():
                # Parameters are frozen; a grad-requiring input still puts the activations on the graph.
                x = predictor.to_input(images).requires_grad_(True)
                logits = predictor.model(x)[:, column]
                (grads,) = torch.autograd.grad(logits.sum(), captured[-1])
        finally:
            handle.remove()
    weights = grads.float().mean(dim=(2, 3), keepdim=True)
    cams = torch.relu((weights * captured[-1].detach().float()).sum(dim=1)).cpu().numpy()
    crop = predictor.preprocess.crop
    out = []
    for cam, hu in zip(cams, hus):
        hu = np.asarray(hu, np.float32)
        box = crop.square(hu) if crop is not None else None
        mapped = np.maximum(_to_slice(cam.astype(np.float32), hu.shape[:2], box), 0.0)
        out.append(np.where(hu > OUTSIDE_HEAD_HU, mapped, 0.0).astype(np.float32))  # no colour over air
    return out


def _scaled(cam: np.ndarray, peak: float) -> np.ndarray:
    return (cam / peak).astype(np.float32) if peak > 0 else np.zeros_like(cam)


def grad_cam(predictor, hu: np.ndarray, target: str = "any", layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM of ``target``'s logit for one HU slice: float32 ``hu.shape`` in [0, 1], scaled to its
    peak in the head.

    ``predictor`` is an :class:`ich.inference.Predictor`; ``layer`` a module of its model (default
    :func:`target_layer`: what the viewer shows). All zeros when nothing in the slice raises the logit.
    """
    (cam,) = _cams(predictor, [hu], target, layer)
    return _scaled(cam, float(cam.max()))


def study_heatmap(
    predictor,
    volume: np.ndarray,
    target: str = "any",
    batch: int = 16,
    progress: Callable[[float], object] | None = None,
) -> np.ndarray:
    """Grad-CAM of every slice of ``volume`` ``(N, H, W)``, scaled to the study's peak: float32 in [0, 1].

    One scale for the study, so a slice the model barely looked at stays faint instead of being
    stretched to full colour as a per-slice scale would.
    """
    cams: list[np.ndarray] = []
    for start in range(0, len(volume), batch):
        cams += _cams(predictor, list(volume[start : start + batch]), target)
        if progress is not None:
            progress(len(cams) / len(volume))
    stack = np.stack(cams)
    return _scaled(stack, float(stack.max()))


def pointing_hit(cam: np.ndarray, mask: np.ndarray, tolerance_px: int = 0) -> bool:
    """The pointing game (Zhang et al. 2016): does the map's peak fall on the lesion, within ``tolerance_px``?

    An all-zero map points nowhere and misses.
    """
    if cam.shape != mask.shape:
        raise ValueError(f"map {cam.shape} and mask {mask.shape} differ in size")
    if not np.any(cam > 0):
        return False
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    t = tolerance_px
    return bool(np.any(mask[max(0, y - t) : y + t + 1, max(0, x - t) : x + t + 1]))
