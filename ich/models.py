"""Classification networks: torchvision backbones with a new ``num_classes`` head.

``build_model`` is the only way the product makes a network, so a checkpoint's ``arch`` string is
all :mod:`ich.checkpoint` needs to rebuild it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MIN_INPUT_SIZE",
    "ModelInput",
    "PretrainedUnavailable",
    "build_model",
    "flip_averaged_logits",
    "head_module",
    "head_parameters",
    "freeze_backbone",
    "unwrap",
]

ARCHITECTURES: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "densenet121",
    "alexnet",
    "efficientnet_b0",
)

# Every network here normalises its input with ImageNet's statistics (for [0, 1] images); each
# checkpoint records them, so a future recipe may change them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Smallest square input each network accepts: AlexNet's three stride-2 max-pools leave no pixel
# below 63 px; the others end in an adaptive pool and work from 32 px.
MIN_INPUT_SIZE: dict[str, int] = {arch: 32 for arch in ARCHITECTURES} | {"alexnet": 63}


class PretrainedUnavailable(RuntimeError):
    """ImageNet weights were asked for but could not be downloaded or read."""


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the ImageNet classifier's last linear layer for a fresh ``num_classes`` one."""
    parent, name = _head_slot(model)
    setattr(parent, name, nn.Linear(getattr(parent, name).in_features, num_classes))


def _head_slot(model: nn.Module) -> tuple[nn.Module, str]:
    """``(parent module, attribute name)`` of the final linear layer (Sequential names are "0", "1"...)."""
    if isinstance(model, torchvision.models.ResNet):
        return model, "fc"
    if isinstance(model, torchvision.models.DenseNet):
        return model, "classifier"
    if isinstance(model, (torchvision.models.AlexNet, torchvision.models.EfficientNet)):
        return model.classifier, str(len(model.classifier) - 1)  # Sequential(dropout..., Linear)
    raise TypeError(f"unsupported model type {type(model).__name__}: build it with ich.models.build_model")


def flip_averaged_logits(model: nn.Module, x: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """float32 logits of ``x``; with ``flip`` the mean of the image's and its left-right mirror's (test-time flip)."""
    logits = model(x).float()
    return (logits + model(x.flip(-1)).float()) / 2 if flip else logits


def build_model(arch: str, num_classes: int, pretrained: bool = False) -> nn.Module:
    """A torchvision ``arch`` whose classifier outputs ``num_classes`` logits.

    ``pretrained=True`` loads torchvision's ImageNet weights (from ``$TORCH_HOME`` when cached,
    else downloaded) and raises :class:`PretrainedUnavailable` when that fails.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    weights = None
    if pretrained:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        model = torchvision.models.get_model(arch, weights=weights)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError; bad files raise RuntimeError
        if weights is None:
            raise
        folder = Path(torch.hub.get_dir()) / "checkpoints"  # where torchvision looks first ($TORCH_HOME/hub/...)
        raise PretrainedUnavailable(
            f"ImageNet weights for {arch} could not be downloaded (no network?): {exc}. "
            f"Train from scratch (omit --pretrained) or place the torchvision weight file "
            f"{weights.url.rsplit('/', 1)[-1]} in {folder}"
        ) from exc
    _replace_head(model, num_classes)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside DistributedDataParallel and/or ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None)  # DDP / DataParallel
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)  # torch.compile
        if isinstance(inner, nn.Module):
            model = inner
        else:
            return model


def head_module(model: nn.Module) -> nn.Linear:
    """The new classifier layer that :func:`build_model` put in."""
    parent, name = _head_slot(unwrap(model))
    return getattr(parent, name)


def head_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters of the new head only (what ``--freeze-epochs`` trains)."""
    return head_module(model).parameters()


def freeze_backbone(model: nn.Module, frozen: bool = True, train_bn: bool = True) -> None:
    """Stop (or restart) gradients to everything but the head.

    As fastai's ``freeze``: BatchNorm layers stay trainable by default (``train_bn``) so their
    statistics and affine terms adapt to CT while the convolutions are held.
    """
    net = unwrap(model)
    head = {id(p) for p in head_parameters(net)}
    bn = {id(p) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    for p in net.parameters():
        keep = id(p) in head or (train_bn and id(p) in bn)
        p.requires_grad_(keep or not frozen)


class ModelInput:
    """uint8 batch -> normalised float model input, on ``device``: the one normalisation of training and prediction.

    Copies (non-blocking from pinned memory), converts to float, applies ``augment`` (training
    only; it works on the 0-255 scale, where 0 is air), normalises with ``mean``/``std`` (given
    for [0, 1] images, folded with the 1/255 into one pass) and, when asked, goes channels_last.
    """

    def __init__(
        self,
        device: torch.device,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        channels_last: bool = False,
    ) -> None:
        self.device = device
        self.shift = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.scale = 1 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255)
        self.augment = augment
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images: torch.Tensor | np.ndarray, train: bool = False) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        x = images.to(self.device, non_blocking=True).float()
        if train and self.augment is not None:
            x = self.augment(x)
        x = x.sub_(self.shift).mul_(self.scale)
        return x.contiguous(memory_format=self.memory_format)
