"""CBAM and BAM as their papers define them, and the attention factory."""

import pytest
import torch

from san.attention import BAM, CBAM, SAN, create_attention


def test_cbam_applies_channel_then_spatial_attention():
    torch.manual_seed(0)
    module = CBAM(32).eval()
    x = torch.randn(2, 32, 8, 8)
    mlp = module.channel.mlp
    channel = torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    refined = x * channel
    pooled = torch.cat([refined.amax(1, keepdim=True), refined.mean(1, keepdim=True)], 1)
    spatial = torch.sigmoid(module.spatial.bn(module.spatial.conv(pooled)))
    assert torch.allclose(module(x), refined * spatial, atol=1e-6)
    assert module.channel.mlp[0].out_channels == 2  # reduction 16
    assert module.spatial.conv.kernel_size == (7, 7)
    assert module.spatial.bn.momentum == 0.01 and module.spatial.bn.eps == 1e-5  # the authors' BasicConv


@pytest.mark.parametrize("combine", ["sum", "product"])
def test_bam_combines_branches_as_paper_or_reference_code(combine):
    torch.manual_seed(1)
    module = BAM(64, combine=combine).eval()
    x = torch.randn(2, 64, 9, 9)
    channel, spatial = module.channel(x.mean((2, 3)))[:, :, None, None], module.spatial(x)
    assert channel.shape == (2, 64, 1, 1) and spatial.shape == (2, 1, 9, 9)
    logits = channel + spatial if combine == "sum" else channel * spatial
    assert torch.allclose(module(x), x * (1 + torch.sigmoid(logits)), atol=1e-6)


def test_bam_spatial_branch_has_two_dilated_3x3_convs_after_a_16x_reduction():
    module = BAM(64)
    dilated = [m for m in module.spatial.body if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert [(m.dilation, m.in_channels) for m in dilated] == [((4, 4), 4), ((4, 4), 4)]
    with pytest.raises(ValueError, match="unknown BAM combine 'max'"):
        BAM(64, combine="max")


def test_factory_builds_each_module_by_name():
    assert create_attention("none", 16) is None
    assert isinstance(create_attention("cbam", 16), CBAM)
    assert isinstance(create_attention("bam", 16), BAM)
    san_c, san_d = create_attention("san-c", 16), create_attention("san-d", 16)
    assert isinstance(san_c, SAN) and san_c.smooth.dilation == (1, 1)
    assert isinstance(san_d, SAN) and san_d.smooth.dilation == (2, 2)
    assert create_attention("san-d", 16, dilation=3).smooth.dilation == (3, 3)


def test_factory_routes_position_hints_only_to_two_input_modules():
    san = create_attention("san-c", 16, prev_channels=8, feature_kernel_size=5)
    assert san.smooth.kernel_size == (5, 5)
    assert create_attention("san-c", 16, feature_kernel_size=5, kernel_size=3).smooth.kernel_size == (3, 3)
    assert isinstance(create_attention("cbam", 16, prev_channels=8, feature_kernel_size=5), CBAM)


def test_factory_rejects_unknown_names_listing_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown attention 'sanc'; choose one of: none, san-c, san-d, cbam, bam"):
        create_attention("sanc", 16)
