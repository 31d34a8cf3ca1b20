"""SAN (Section III-C) checked against hand-computed values of eqs 6–12."""

import pytest
import torch
from torch import nn

from san.attention import SAN, reference_formulation
from san.attention.functional import extrema_count


def taps_of(module: SAN, y: torch.Tensor, y_prev: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The output and every tap's map; taps see the stepwise path, which a reader asks for explicitly."""
    maps: dict[str, torch.Tensor] = {}
    handles = [
        tap.register_forward_hook(lambda _m, _i, out, name=name: maps.__setitem__(name, out.detach()))
        for name, tap in module.taps().items()
    ]
    with reference_formulation():
        out = module(y, y_prev)
    for handle in handles:
        handle.remove()
    return out, maps


def identity_smoothing(module: SAN) -> SAN:
    """Make the smoothing conv the identity: a Dirac kernel and zero bias."""
    with torch.no_grad():
        nn.init.dirac_(module.smooth.weight)
        module.smooth.bias.zero_()
    return module


# C' = 2 channels whose mean is [[2, 2], [3, 4]]; C = 3 channels.
Y_PREV = torch.tensor([[[1.0, 3.0], [5.0, 7.0]], [[3.0, 1.0], [1.0, 1.0]]])[None]
Y = torch.tensor([[[2.0, 0.0], [3.0, 10.0]], [[0.0, 0.0], [0.0, 0.0]], [[-1.0, 5.0], [3.0, 4.0]]])[None]


def test_doc_is_absolute_difference_to_channel_mean():
    _, maps = taps_of(SAN(3), Y, Y_PREV)
    expected = torch.tensor([[[0.0, 2.0], [0.0, 6.0]], [[2.0, 2.0], [3.0, 4.0]], [[3.0, 3.0], [0.0, 0.0]]])[None]
    assert torch.equal(maps["doc"], expected)


def test_doc_average_pools_the_channel_mean_to_a_smaller_current_map():
    y_prev = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(1, 2, 1, 1)  # channel mean = the same 4x4 ramp
    y = torch.zeros(1, 3, 2, 2)
    _, maps = taps_of(SAN(3), y, y_prev)
    pooled = torch.tensor([[2.5, 4.5], [10.5, 12.5]])  # 2x2 means of the ramp 0..15
    assert torch.equal(maps["doc"], pooled.expand(1, 3, 2, 2))


# Counts worked out by hand: 1 (the centre) + in-map neighbours <= the centre; ties count, outside cells don't.
DOC_4X4 = torch.tensor([[0.0, 1, 1, 0], [2, 5, 1, 3], [2, 5, 4, 0], [1, 0, 2, 2]])
COUNT_4X4 = torch.tensor([[1, 4, 4, 1], [4, 9, 5, 5], [4, 9, 7, 1], [2, 1, 4, 3]], dtype=torch.uint8)


def test_alpha_counts_neighbours_not_greater_with_borders_and_ties():
    assert torch.equal(extrema_count(DOC_4X4[None, None]), COUNT_4X4[None, None])


def test_alpha_counts_cells_outside_the_map_as_not_smaller():
    count = extrema_count(torch.ones(1, 1, 4, 4))
    expected = torch.tensor([[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]], dtype=torch.uint8)
    assert torch.equal(count, expected[None, None])


def test_alpha_is_per_channel_and_per_sample():
    doc = torch.stack([DOC_4X4, -DOC_4X4, torch.zeros(4, 4)])[None].repeat(2, 1, 1, 1)
    count = extrema_count(doc)
    assert torch.equal(count[1, 0], COUNT_4X4)
    assert torch.equal(count[0, 2], extrema_count(torch.ones(1, 1, 4, 4))[0, 0])
    assert count[0, 1, 1, 1] == 2  # -5 is the window's minimum, tied only with the -5 below it


def test_extrema_weights_doc_by_alpha():
    module = SAN(1, use_cca=False)
    y = DOC_4X4[None, None]
    _, maps = taps_of(module, y, torch.zeros_like(y))
    assert torch.allclose(maps["extrema"], DOC_4X4 * COUNT_4X4 / 9)


def test_identity_smoothing_gives_y_times_sigmoid_of_alpha_weighted_doc():
    torch.manual_seed(0)
    y, y_prev = torch.randn(2, 4, 6, 5), torch.randn(2, 7, 6, 5)
    module = identity_smoothing(SAN(4, kernel_size=3))
    doc = (y - y_prev.mean(1, keepdim=True)).abs()
    alpha = extrema_count(doc).float() / 9
    assert torch.allclose(module(y, y_prev), y * torch.sigmoid(alpha * doc), atol=1e-6)


def test_output_is_y_times_mask_and_mask_is_in_unit_interval():
    torch.manual_seed(1)
    y, y_prev = 50 * torch.randn(2, 8, 7, 7), 50 * torch.randn(2, 3, 14, 14)
    out, maps = taps_of(SAN(8, dilation=2), y, y_prev)
    assert torch.equal(out, y * maps["mask"])
    assert maps["mask"].min() >= 0 and maps["mask"].max() <= 1
    assert torch.allclose(maps["mask"], torch.sigmoid(maps["smoothed"]))


def test_without_abs_the_doc_is_the_signed_difference():
    _, maps = taps_of(SAN(3, use_abs=False), Y, Y_PREV)
    assert torch.equal(maps["doc"], Y - torch.tensor([[2.0, 2.0], [3.0, 4.0]]))


def test_without_cca_the_doc_compares_with_the_previous_output_itself():
    y_prev = torch.randn(1, 3, 2, 2)
    _, maps = taps_of(SAN(3, use_cca=False), Y, y_prev)
    assert torch.equal(maps["doc"], (Y - y_prev).abs())


def test_without_cca_unequal_channels_raise_naming_both_counts():
    with pytest.raises(ValueError, match=r"C'=2 .*C=3"):
        SAN(3, use_cca=False)(Y, Y_PREV)
    with pytest.raises(ValueError, match=r"C'=64 .*C=128"):
        SAN(128, use_cca=False, prev_channels=64)


def test_without_extrema_the_doc_goes_straight_to_smoothing():
    _, maps = taps_of(SAN(3, use_extrema=False), Y, Y_PREV)
    assert torch.equal(maps["extrema"], maps["doc"])


def test_without_smoothing_the_mask_is_sigmoid_of_the_extrema():
    module = SAN(3, use_smoothing=False)
    out, maps = taps_of(module, Y, Y_PREV)
    assert not hasattr(module, "smooth") and sum(p.numel() for p in module.parameters()) == 0
    assert "smoothed" not in maps
    assert torch.equal(maps["mask"], torch.sigmoid(maps["extrema"]))
    assert torch.equal(out, Y * maps["mask"])


def test_smoothing_conv_is_c_to_c_same_padding_with_the_given_kernel_and_dilation():
    module = SAN(16, kernel_size=5, dilation=2)
    assert isinstance(module.smooth, nn.Conv2d)
    assert module.smooth.weight.shape == (16, 16, 5, 5) and module.smooth.dilation == (2, 2)
    assert module(torch.randn(1, 16, 9, 9), torch.randn(1, 4, 9, 9)).shape == (1, 16, 9, 9)
    assert SAN(16, smoothing_groups=16).smooth.weight.shape == (16, 1, 3, 3)
    assert SAN(16, smoothing_groups="depthwise").smooth.weight.shape == (16, 1, 3, 3)
    with pytest.raises(ValueError, match="smoothing_groups=3 must be 'depthwise' or a positive divisor"):
        SAN(16, smoothing_groups=3)


def test_smoothing_activation_is_identity_by_default_and_selectable():
    assert isinstance(SAN(4).smooth_act, nn.Identity)
    assert isinstance(SAN(4, smoothing_activation="tanh").smooth_act, nn.Tanh)
    with pytest.raises(ValueError, match="unknown smoothing_activation 'elu'"):
        SAN(4, smoothing_activation="elu")


def test_gradients_reach_the_smoothing_conv_and_the_inputs():
    torch.manual_seed(2)
    y = torch.randn(2, 4, 6, 6, requires_grad=True)
    y_prev = torch.randn(2, 3, 6, 6, requires_grad=True)
    module = SAN(4)
    module(y, y_prev).square().sum().backward()
    assert module.smooth.weight.grad.abs().sum() > 0 and module.smooth.bias.grad.abs().sum() > 0
    assert y.grad.abs().sum() > 0 and y_prev.grad.abs().sum() > 0


def test_alpha_passes_no_gradient():
    torch.manual_seed(3)
    doc = torch.rand(1, 2, 5, 5, requires_grad=True)
    assert not extrema_count(doc).requires_grad
    # y_prev = 0 makes doc = y >= 0; out = y * sigmoid(alpha * y): dout/dy with alpha held constant.
    module = SAN(2, use_smoothing=False)
    y = doc.detach().clone().requires_grad_(True)
    module(y, torch.zeros_like(y)).sum().backward()
    alpha = extrema_count(y.detach()).float() / 9
    s = torch.sigmoid(alpha * y.detach())
    assert torch.allclose(y.grad, s + y.detach() * s * (1 - s) * alpha, atol=1e-6)
