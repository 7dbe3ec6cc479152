"""ich.models: every architecture trains a few steps on CPU for both tasks; freezing; offline weights."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from ich import models


# resnet18 stays in the quick run; the bigger networks take 5-30 s each on a busy 2-core CPU.
@pytest.mark.parametrize(
    "arch", [a if a == "resnet18" else pytest.param(a, marks=pytest.mark.slow) for a in models.ARCHITECTURES]
)
def test_each_architecture_takes_optimiser_steps(arch):
    torch.manual_seed(0)
    for num_classes in (1, 6):  # binary and multilabel heads
        model = models.build_model(arch, num_classes)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randn(4, 3, 64, 64)
        y = torch.randint(0, 2, (4, num_classes)).float()
        before = models.head_module(model).weight.detach().clone()
        for _ in range(2):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert torch.isfinite(loss)
        assert models.head_module(model).out_features == num_classes
        assert not torch.equal(before, models.head_module(model).weight)


def test_alexnet_smallest_input():
    model = models.build_model("alexnet", 2).eval()
    size = models.MIN_INPUT_SIZE["alexnet"]
    assert model(torch.zeros(1, 3, size, size)).shape == (1, 2)
    with pytest.raises(RuntimeError):
        model(torch.zeros(1, 3, size - 1, size - 1))


def test_unknown_architecture():
    with pytest.raises(ValueError, match="resnet18"):
        models.build_model("vgg16", 2)


def test_freeze_backbone_keeps_head_and_batchnorm():
    model = models.build_model("resnet18", 6)
    models.freeze_backbone(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"fc.weight", "fc.bias", "bn1.weight"} <= trainable
    assert "conv1.weight" not in trainable
    models.freeze_backbone(model, train_bn=False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}
    assert [id(p) for p in models.head_parameters(model)] == [id(model.fc.weight), id(model.fc.bias)]
    models.freeze_backbone(model, frozen=False)
    assert all(p.requires_grad for p in model.parameters())


def test_head_of_sequential_classifiers():
    eff = models.build_model("efficientnet_b0", 3)
    assert models.head_module(eff) is eff.classifier[-1]
    alex = models.build_model("alexnet", 3)
    assert models.head_module(alex) is alex.classifier[-1]


def test_unwrap_sees_through_wrappers():
    model = models.build_model("resnet18", 1)
    wrapper = torch.nn.DataParallel(model)
    assert models.unwrap(wrapper) is model
    assert models.head_module(wrapper) is model.fc


def test_pretrained_offline_raises_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(models.PretrainedUnavailable) as info:
        models.build_model("resnet18", 1, pretrained=True)
    message = str(info.value)
    assert "ImageNet weights for resnet18 could not be downloaded" in message
    assert "omit --pretrained" in message and str(tmp_path) in message and "resnet18-" in message
