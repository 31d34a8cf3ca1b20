"""san.masks: every attention module's intermediate maps through forward hooks, with no effect on the model."""

import torch

from san.attention import attention_modules
from san.masks import capture_masks
from san.registry import build_model


def test_capture_masks_returns_each_san_modules_maps_by_path():
    torch.manual_seed(0)
    model = build_model("vgg16", 10, "san-c", "bottleneck", stem="small")
    x = torch.randn(2, 3, 32, 32)
    maps = capture_masks(model, x)
    assert list(maps) == list(attention_modules(model)) and len(maps) == 5
    first = maps["features.1.attn"]
    assert list(first) == ["doc", "extrema", "smoothed", "mask"]
    assert first["mask"].shape == (2, 64, 32, 32)
    assert maps["features.16.attn"]["mask"].shape == (2, 512, 2, 2)  # the fifth group runs at 32 / 16 px
    for module_maps in maps.values():
        assert torch.allclose(module_maps["mask"], torch.sigmoid(module_maps["smoothed"]))
        assert (module_maps["doc"] >= 0).all()


def test_capture_masks_leaves_outputs_mode_and_hooks_unchanged():
    torch.manual_seed(1)
    model = build_model("resnet18", 10, "san-d", "full", stem="small")
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    before = model(x)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    capture_masks(model, x)
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # BN statistics untouched
    assert all(not m._forward_hooks for m in model.modules())
    model.eval()
    assert torch.equal(model(x), before)


def test_capture_masks_reads_competitors_and_ablations():
    x = torch.randn(2, 1, 28, 28)
    cbam = capture_masks(build_model("lenet5", 10, "cbam"), x)
    assert list(cbam["features.0.attn"]) == ["channel_mask", "mask"]
    assert cbam["features.0.attn"]["mask"].shape == (2, 1, 28, 28)
    bam = capture_masks(build_model("lenet5", 10, "bam"), x)
    assert bam["features.0.attn"]["mask"].shape == (2, 6, 28, 28)
    ablated = capture_masks(build_model("lenet5", 10, "san-c", attention_kwargs={"use_smoothing": False}), x)
    assert list(ablated["features.2.attn"]) == ["doc", "extrema", "mask"]
