"""ich.explain: Grad-CAM per architecture, mapped back onto the original slice, model untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ich import explain
from ich.inference import Predictor
from ich.labels import CLASSES
from ich.models import head_module
from ich.windowing import CropHead, crop_square, overlay
from tests.helpers import head, make_checkpoint


@pytest.mark.parametrize("centre", [(70, 90), (30, 20), (130, 180)])  # middle, and squares running off the edge
def test_crop_box_matches_crophead(centre):
    hu = head(centre=centre)
    crop = CropHead()
    top, left, side = crop_square(hu, crop.margin)
    pad = side
    padded = np.pad(hu, pad, constant_values=np.float32(-1024))
    np.testing.assert_array_equal(padded[top + pad : top + pad + side, left + pad : left + pad + side], crop(hu))


def test_crop_box_none_for_empty_slice():
    assert crop_square(np.full((64, 64), -1000.0, np.float32), 8) is None


@pytest.mark.parametrize("arch", ["resnet18", "densenet121", "alexnet", "efficientnet_b0"])
def test_grad_cam_every_architecture(tmp_path, arch):
    pred = Predictor.from_checkpoint(make_checkpoint(tmp_path / arch, arch=arch, size=64), device="cpu")
    # A seeded network whose subdural logit grows with every feature of the last block: its map
    # cannot be empty, so an all-zero answer is a bug, not bad luck with the initialisation.
    classifier = head_module(pred.model)
    with torch.no_grad():
        classifier.weight[CLASSES.index("subdural")] = 0.01
    before = {k: v.clone() for k, v in pred.model.state_dict().items()}
    layer = explain.target_layer(pred.model)
    locked: list[bool] = []
    pred.model.register_forward_pre_hook(lambda module, args: locked.append(pred.lock.locked()))

    hu = head()
    cam = explain.grad_cam(pred, hu, "subdural")

    assert cam.shape == hu.shape and cam.dtype == np.float32
    # The checkpoint is seeded, so its map is fixed: it must show something, scaled to its peak.
    assert cam.min() >= 0.0 and cam.max() == 1.0 and (cam > 0.1).mean() > 0.01
    top, left, side = crop_square(hu, pred.preprocess.crop.margin)
    outside = np.ones(hu.shape, bool)
    outside[max(top, 0) : top + side, max(left, 0) : left + side] = False
    assert not cam[outside].any()  # nothing outside the crop the model saw
    assert locked == [True] and not pred.lock.locked()
    assert not layer._forward_hooks and not layer._backward_hooks
    assert all(torch.equal(before[k], v) for k, v in pred.model.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in pred.model.parameters())
    assert not pred.model.training


def test_cam_is_pasted_over_the_crop_square():
    """An input-space map lands on the crop square in the slice's pixels, clipped where the square runs off the edge."""
    cam = np.zeros((8, 8), np.float32)
    cam[:4, :4] = 1.0  # top-left quarter of what the model saw
    out = explain._to_slice(cam, (50, 100), (-10, 20, 40))  # square rows -10..30, cols 20..60
    assert out.shape == (50, 100)
    assert (out[:5, 22:35] > 0.99).all()  # top-left quarter of the square: rows -10..10, cols 20..40
    assert not out[:, :20].any() and not out[:, 60:].any() and not out[30:].any()  # outside the square
    assert (out[15:30, 45:60] < 0.01).all()  # the square's cold bottom-right quarter
    whole = explain._to_slice(cam, (16, 32), None)  # no crop: the map is stretched over the slice
    assert whole.shape == (16, 32) and whole[:6, :14].min() > 0.99 and whole[10:, 18:].max() < 0.01


def test_grad_cam_from_another_layer(tmp_path):
    """The layer the viewer shows is the default; another (train.bundle compares them) gives its own map, hooks gone."""
    pred = Predictor.from_checkpoint(make_checkpoint(tmp_path / "resnet18", size=64), device="cpu")
    net = pred.model
    hu = head()
    shown = explain.grad_cam(pred, hu, "any")
    assert np.array_equal(explain.grad_cam(pred, hu, "any", explain.target_layer(net)), shown)
    other = explain.grad_cam(pred, hu, "any", net.layer4)
    assert other.shape == hu.shape and other.max() <= 1.0 and not np.array_equal(other, shown)
    assert not net.layer4._forward_hooks


def test_grad_cam_unknown_class(tmp_path):
    pred = Predictor.from_checkpoint(make_checkpoint(tmp_path / "binary", classes=("any",)), device="cpu")
    assert explain.grad_cam(pred, head(), "any").shape == (160, 200)
    with pytest.raises(ValueError, match="does not predict 'subdural'"):
        explain.grad_cam(pred, head(), "subdural")


def test_overlay_keeps_grey_below_floor():
    grey = np.full((4, 4), 100, np.uint8)
    cam = np.zeros((4, 4), np.float32)
    cam[0, 0] = 1.0
    rgb = overlay(grey, cam)
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    assert (rgb[1:, :] == 100).all() and tuple(rgb[0, 0]) != (100, 100, 100)


def test_grad_cam_follows_a_brain_window_checkpoint(tmp_path):
    """A clipped brain-window checkpoint crops where its own preprocessing does, and the map stays inside that crop."""
    from ich.windowing import BRAIN_INPUT

    windows = [[w.name, w.level, w.width] for w in BRAIN_INPUT.windows]
    pred = Predictor.from_checkpoint(make_checkpoint(tmp_path / "brain", windows=windows, clip=True), device="cpu")
    hu = head()
    hu[hu < -500] = -3000.0  # padding outside the scan circle, which the brain input clips away
    cam = explain.grad_cam(pred, hu, "any")
    top, left, side = pred.preprocess.crop.square(hu)
    assert (top, left, side) == crop_square(np.clip(hu, 0, 80), 8, pred.preprocess.crop.body_hu)
    outside = np.ones(hu.shape, bool)
    outside[max(top, 0) : top + side, max(left, 0) : left + side] = False
    assert cam.shape == hu.shape and not cam[outside].any()


def test_pointing_game():
    cam = np.zeros((20, 20), np.float32)
    cam[5, 5] = 1.0
    mask = np.zeros((20, 20), bool)
    mask[5:8, 5:8] = True
    assert explain.pointing_hit(cam, mask)
    far = np.zeros_like(mask)
    far[12:15, 12:15] = True
    assert not explain.pointing_hit(cam, far) and explain.pointing_hit(cam, far, tolerance_px=8)
    assert not explain.pointing_hit(np.zeros_like(cam), mask)  # a blank map points nowhere
    with pytest.raises(ValueError, match="differ in size"):
        explain.pointing_hit(cam, mask[:10])


def test_the_map_stays_off_the_air(tmp_path):
    pred = Predictor.from_checkpoint(make_checkpoint(tmp_path / "r", size=64), device="cpu")
    hu = head()
    cam = explain.grad_cam(pred, hu, "any")
    assert not cam[hu < explain.OUTSIDE_HEAD_HU].any()
