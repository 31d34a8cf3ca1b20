"""The registry's models: torchvision-exact sizes, documented attention counts, forward and backward everywhere."""

import pytest
import torch
from torch import nn

from san.attention import SAN, attention_for, attention_modules
from san.profile import count_params, model_stats
from san.registry import build_model, list_models, list_placements

# torchvision's published parameter counts at 1000 classes.
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "vgg16": 138_357_544,
    "vgg16_bn": 138_365_992,
    "vgg19": 143_667_240,
    "vgg19_bn": 143_678_248,
}

# Attention modules per placement, as documented in san/placement.py (small stems for VGG/ResNet).
MODULE_COUNTS = {
    "lenet5": {"bottleneck": 2, "full": 2, "reference-cbam": 2, "reference-bam": 1},
    "vgg16": {"bottleneck": 5, "full": 13, "reference-cbam": 13, "reference-bam": 4},
    "vgg16_bn": {"bottleneck": 5, "full": 13, "reference-cbam": 13, "reference-bam": 4},
    "vgg16_c": {"bottleneck": 5, "full": 13, "reference-cbam": 13, "reference-bam": 4},
    "vgg19": {"bottleneck": 5, "full": 16, "reference-cbam": 16, "reference-bam": 4},
    "vgg19_bn": {"bottleneck": 5, "full": 16, "reference-cbam": 16, "reference-bam": 4},
    "resnet18": {"bottleneck": 4, "full": 17, "reference-cbam": 8, "reference-bam": 3},
    "resnet50": {"bottleneck": 4, "full": 49, "reference-cbam": 16, "reference-bam": 3},
}


def small_kwargs(name: str) -> dict:
    return {} if name == "lenet5" else {"stem": "small"}


def expected_count(model: str, attention: str, placement: str) -> int:
    if attention == "none":
        return 0
    if placement == "reference":
        placement = {"cbam": "reference-cbam", "bam": "reference-bam"}.get(attention, "bottleneck")
    return MODULE_COUNTS[model][placement]


CNNS = [model for model in list_models() if model in MODULE_COUNTS]  # lstm4: tests/test_sequence_models.py
COMBINATIONS = [
    (model, attention, placement)
    for model in CNNS
    for attention in attention_for(2)  # ran works on sequences only
    for placement in (["bottleneck"] if attention == "none" else list_placements())
]


@pytest.mark.parametrize(("model", "attention", "placement"), COMBINATIONS)
def test_every_model_attention_and_placement_trains(model, attention, placement):
    torch.manual_seed(0)
    net = build_model(model, 10, attention, placement, **small_kwargs(model))
    assert len(attention_modules(net)) == expected_count(model, attention, placement)
    size = 28 if model == "lenet5" else 32
    in_chans = next(m for m in net.modules() if isinstance(m, nn.Conv2d)).in_channels
    x = torch.randn(2, in_chans, size, size)
    logits = net(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    first_conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    for module in attention_modules(net).values():
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads)


@pytest.mark.parametrize("name", list(TORCHVISION_PARAMS))
def test_base_models_match_torchvision_parameter_for_parameter(name):
    with torch.device("meta"):
        assert count_params(build_model(name, 1000)) == TORCHVISION_PARAMS[name]


def test_lenet5_is_the_papers_two_conv_three_dense_network():
    net = build_model("lenet5", 10)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    dense = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    assert [d.out_features for d in dense] == [120, 84, 10]
    assert sum(isinstance(m, nn.Tanh) for m in net.modules()) == 4
    assert sum(isinstance(m, nn.AvgPool2d) for m in net.modules()) == 2
    assert count_params(net) == 61_706


def test_vgg16_c_has_1x1_convs_as_layers_7_10_and_13():
    net = build_model("vgg16_c", 1000)
    kernels = [m.kernel_size[0] for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [i + 1 for i, k in enumerate(kernels) if k == 1] == [7, 10, 13] and len(kernels) == 13


@pytest.mark.parametrize(("attention", "paper_params"), [("cbam", 28.09e6), ("bam", 25.92e6)])
def test_resnet50_reference_placement_matches_the_competitors_papers(attention, paper_params):
    with torch.device("meta"):
        params = count_params(build_model("resnet50", 1000, attention, "reference"))
    assert abs(params - paper_params) / paper_params < 0.005


BOTTLENECK_PATHS = {
    "resnet18": ["stem.attn", "layer1.1.attn_out", "layer2.1.attn_out", "layer3.1.attn_out", "layer4.1.attn_out"],
    "resnet50": ["stem.attn", "layer1.2.attn_out", "layer2.3.attn_out", "layer3.5.attn_out", "layer4.2.attn_out"],
}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_bottleneck_places_one_module_per_stage_with_the_imagenet_stem(name):
    net = build_model(name, 10, "san-c", "bottleneck")
    assert list(attention_modules(net)) == BOTTLENECK_PATHS[name]
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_san_smoothing_kernel_follows_the_feature_branch():
    lenet = build_model("lenet5", 10, "san-c")
    assert {m.smooth.kernel_size for m in attention_modules(lenet).values()} == {(5, 5)}
    resnet = build_model("resnet18", 10, "san-d", "bottleneck")
    kernels = [m.smooth.kernel_size[0] for m in attention_modules(resnet).values()]
    assert kernels == [7, 3, 3, 3, 3]
    assert all(m.smooth.dilation == (2, 2) for m in attention_modules(resnet).values())
    vgg_c = build_model("vgg16_c", 10, "san-c", "full", stem="small")
    assert {m.smooth.kernel_size for m in attention_modules(vgg_c).values()} == {(3, 3)}  # 1x1 layers take 3
    override = build_model("resnet18", 10, "san-c", attention_kwargs={"kernel_size": 5})
    assert {m.smooth.kernel_size for m in attention_modules(override).values()} == {(5, 5)}


def test_san_compares_a_unit_output_with_its_input():
    """At a bottleneck after a residual block, SAN's previous layer is the block's input."""
    net = build_model("resnet18", 10, "san-c", "bottleneck", stem="small").eval()
    seen = {}
    block = net.layer2[1]
    block.register_forward_pre_hook(lambda _m, args: seen.__setitem__("block_in", args[0]))
    block.attn_out.register_forward_pre_hook(lambda _m, args: seen.__setitem__("attn_args", args))
    net(torch.randn(1, 3, 32, 32))
    assert seen["attn_args"][1] is seen["block_in"]


def test_ablation_without_cca_fails_at_build_where_channels_differ():
    with pytest.raises(ValueError, match=r"C'=3 .*C=64"):
        build_model("resnet18", 10, "san-c", "bottleneck", attention_kwargs={"use_cca": False})


def test_unknown_names_raise_with_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet34'; choose one of: lenet5"):
        build_model("resnet34", 10)
    with pytest.raises(ValueError, match="unknown attention 'sanc'; choose one of: none, san-c, san-d, cbam, bam"):
        build_model("resnet18", 10, "sanc")
    with pytest.raises(ValueError, match="unknown placement 'middle'; choose one of: bottleneck, full, reference"):
        build_model("resnet18", 10, "san-c", "middle")
    with pytest.raises(ValueError, match="unknown stem 'tiny'"):
        build_model("vgg16", 10, stem="tiny")


def test_flops_count_the_backbone_and_each_smoothing_conv():
    base = model_stats("resnet18", 224)
    assert abs(base.flops / 2 - 1.814e9) / 1.814e9 < 0.005  # torchvision: 1.81 G multiply-adds
    san = model_stats("resnet18", 224, attention="san-c")
    # One C->C conv per position: the stem's 7x7 at 112 px, then 3x3 at each stage's resolution.
    smoothing = 2 * (
        64 * 64 * 49 * 112**2 + sum(c * c * 9 * s * s for c, s in [(64, 56), (128, 28), (256, 14), (512, 7)])
    )
    assert san.flops - base.flops == smoothing
    assert san.attention_modules == 5 and san.params - base.params == san.attention_params


def test_san_modules_in_models_are_san():
    net = build_model("vgg16", 10, "san-d", "full", stem="small")
    assert all(isinstance(m, SAN) for m in attention_modules(net).values())
