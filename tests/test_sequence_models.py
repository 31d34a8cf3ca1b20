"""The time-series half: SAN on sequences (dims=1) against hand-computed values, RAN, and LSTM-4 with every
attention module and placement (Section IV-B4, IV-D, Tables VI–VII)."""

import itertools

import pytest
import torch
from torch import nn

from san.attention import (
    RAN,
    SAN,
    IncompatibleConfiguration,
    attention_modules,
    create_attention,
    reference_formulation,
)
from san.attention.functional import extrema_count
from san.masks import capture_masks
from san.registry import build_model, list_models


def taps_of(module: nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    maps: dict[str, torch.Tensor] = {}
    handles = [
        tap.register_forward_hook(lambda _m, _i, out, name=name: maps.__setitem__(name, out.detach()))
        for name, tap in module.taps().items()
    ]
    out = module(*inputs)
    for handle in handles:
        handle.remove()
    return out, maps


# --- SAN on sequences: N×C×T, a 3-step extrema window, a Conv1d smoothing ------------------------------------

# C' = 2 features whose mean over features is [2, 2, 3, 4, 2]; C = 3 features, T = 5 steps.
Y_PREV = torch.tensor([[1.0, 3.0, 5.0, 7.0, 0.0], [3.0, 1.0, 1.0, 1.0, 4.0]])[None]
Y = torch.tensor([[2.0, 0.0, 3.0, 10.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0], [3.0, 3.0, 4.0, 5.0, 3.0]])[None]
DOC = torch.tensor([[0.0, 2, 0, 6, 0], [2, 2, 3, 4, 2], [1, 1, 1, 1, 1]])[None]
# 1 (the centre) + in-sequence neighbours <= the centre: ties count (feature 1 at t=0, t=1), steps outside the
# sequence do not (feature 2 is constant: 2 at both ends, 3 inside).
COUNT = torch.tensor([[1, 3, 1, 3, 1], [2, 2, 2, 3, 1], [2, 3, 3, 3, 2]], dtype=torch.uint8)[None]
WEIGHTED = torch.tensor([[0.0, 6, 0, 18, 0], [4, 4, 6, 12, 2], [2, 3, 3, 3, 2]])[None] / 3  # DOC * COUNT / 3
# The smoothing conv below: each feature's [1, -2, 1] over time (zero padded), feature 1's centre added to
# feature 0, biases [0, 1, -1].
SMOOTHED = torch.tensor([[10.0, -8, 30, -24, 20], [-1, 5, 7, -13, 11], [-4, -4, -3, -4, -4]])[None] / 3


def known_smoothing(module: SAN) -> SAN:
    with torch.no_grad():
        module.smooth.weight.zero_()
        for feature in range(3):
            module.smooth.weight[feature, feature] = torch.tensor([1.0, -2.0, 1.0])
        module.smooth.weight[0, 1, 1] = 1.0
        module.smooth.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    return module


def test_san_1d_steps_match_hand_computed_values():
    module = known_smoothing(SAN(3, kernel_size=3, dims=1))
    assert isinstance(module.smooth, nn.Conv1d) and module.smooth.weight.shape == (3, 3, 3)
    out, maps = taps_of(module, Y, Y_PREV)
    assert torch.equal(maps["doc"], DOC)
    assert torch.equal(extrema_count(DOC, dims=1), COUNT)
    torch.testing.assert_close(maps["extrema"], WEIGHTED)
    torch.testing.assert_close(maps["smoothed"], SMOOTHED)
    torch.testing.assert_close(maps["mask"], torch.sigmoid(SMOOTHED))
    torch.testing.assert_close(out, Y * torch.sigmoid(SMOOTHED))


def test_san_1d_extrema_count_matches_a_brute_force_window_with_ties():
    torch.manual_seed(0)
    doc = torch.randint(0, 3, (2, 4, 9)).float()  # few values: many ties
    count = extrema_count(doc, dims=1)
    for t in range(9):
        window = doc[..., max(0, t - 1) : t + 2]
        assert torch.equal(count[..., t], (doc[..., t : t + 1] >= window).sum(-1).to(torch.uint8))


def test_san_1d_alpha_is_count_over_three_and_outside_steps_are_not_smaller():
    assert torch.equal(extrema_count(torch.ones(1, 1, 4), dims=1), torch.tensor([[[2, 3, 3, 2]]], dtype=torch.uint8))
    assert torch.equal(extrema_count(torch.ones(1, 1, 1), dims=1), torch.ones(1, 1, 1, dtype=torch.uint8))
    module = SAN(1, use_cca=False, use_smoothing=False, dims=1)
    y = torch.tensor([[[0.0, 1.0, 3.0]]])
    _, maps = taps_of(module, y, torch.zeros_like(y))
    torch.testing.assert_close(maps["extrema"], torch.tensor([[[0.0, 2 / 3, 2.0]]]))


def test_san_1d_average_pools_the_feature_mean_to_a_shorter_sequence():
    y_prev = torch.arange(8.0).reshape(1, 1, 8).repeat(1, 2, 1)  # feature mean = the ramp 0..7
    _, maps = taps_of(SAN(3, dims=1), torch.zeros(1, 3, 4), y_prev)
    assert torch.equal(maps["doc"], torch.tensor([0.5, 2.5, 4.5, 6.5]).expand(1, 3, 4))


def test_san_1d_smoothing_follows_kernel_dilation_and_groups():
    module = SAN(8, kernel_size=5, dilation=2, dims=1)
    assert module.smooth.weight.shape == (8, 8, 5) and module.smooth.dilation == (2,)
    assert module(torch.randn(2, 8, 11), torch.randn(2, 3, 11)).shape == (2, 8, 11)
    assert SAN(8, smoothing_groups="depthwise", dims=1).smooth.weight.shape == (8, 1, 3)
    assert isinstance(SAN(8, smoothing_activation="tanh", dims=1).smooth_act, nn.Tanh)


def test_san_1d_takes_the_stepwise_path_and_checks_its_input_layout():
    torch.manual_seed(1)
    module = SAN(4, dims=1)
    y, y_prev = torch.randn(2, 4, 7), torch.randn(2, 5, 7)
    with reference_formulation():
        expected = module(y, y_prev)
    assert torch.equal(module(y, y_prev), expected)
    with pytest.raises(ValueError, match=r"SAN\(dims=1\) takes N×C×T inputs"):
        module(torch.randn(2, 4, 7, 7), torch.randn(2, 5, 7, 7))
    with pytest.raises(ValueError, match="dims=3"):
        SAN(4, dims=3)


@pytest.mark.parametrize("switches", list(itertools.product([True, False], repeat=4)), ids=str)
def test_san_1d_every_ablation_switch_runs_forward_and_backward(switches):
    use_cca, use_abs, use_extrema, use_smoothing = switches
    torch.manual_seed(2)
    module = SAN(
        4, use_cca=use_cca, use_abs=use_abs, use_extrema=use_extrema, use_smoothing=use_smoothing, dims=1, dilation=2
    )
    y = torch.randn(3, 4, 9, requires_grad=True)
    y_prev = torch.randn(3, 4, 9, requires_grad=True)
    out, maps = taps_of(module, y, y_prev)
    out.square().sum().backward()
    assert out.shape == y.shape and torch.isfinite(out).all()
    assert y.grad.abs().sum() > 0 and y_prev.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert ("smoothed" in maps) == use_smoothing
    if not use_extrema:
        assert torch.equal(maps["extrema"], maps["doc"])
    if not use_abs and use_cca:
        assert torch.equal(maps["doc"], y.detach() - y_prev.detach().mean(1, keepdim=True))


def test_san_1d_without_cca_unequal_features_are_incompatible():
    with pytest.raises(IncompatibleConfiguration, match=r"C'=6 .*C=64"):
        SAN(64, use_cca=False, prev_channels=6, dims=1)
    with pytest.raises(IncompatibleConfiguration, match=r"C'=2 .*C=3"):
        SAN(3, use_cca=False, dims=1)(Y, Y_PREV)


# --- RAN -------------------------------------------------------------------------------------------------------


def test_ran_mask_is_sigmoid_of_current_features_and_previous_state():
    torch.manual_seed(3)
    module = RAN(5)
    h = torch.randn(2, 5, 8)
    out, maps = taps_of(module, h)
    mask = maps["mask"]
    assert mask.shape == (2, 5, 8) and mask.min() > 0 and mask.max() < 1
    assert torch.equal(out, h * mask)
    w_x, b, w_s = module.w_x.weight.detach(), module.w_x.bias.detach(), module.w_s.weight.detach()
    previous = torch.zeros(2, 5)  # h_{-1} = 0
    for t in range(8):
        expected = torch.sigmoid(h[:, :, t] @ w_x.T + previous @ w_s.T + b)
        torch.testing.assert_close(mask[:, :, t], expected)
        previous = h[:, :, t]


def test_ran_mask_at_t_depends_on_the_previous_step_and_not_on_the_next():
    torch.manual_seed(4)
    module = RAN(4)
    h = torch.randn(1, 4, 6)
    _, base = taps_of(module, h)
    t = 3
    earlier, later = h.clone(), h.clone()
    earlier[:, :, t - 1] += 1.0
    later[:, :, t + 1] += 1.0
    _, after_earlier = taps_of(module, earlier)
    _, after_later = taps_of(module, later)
    assert not torch.allclose(after_earlier["mask"][:, :, t], base["mask"][:, :, t])
    assert torch.equal(after_later["mask"][:, :, : t + 1], base["mask"][:, :, : t + 1])


def test_ran_gradients_reach_both_maps_and_the_input():
    torch.manual_seed(5)
    module = RAN(4)
    h = torch.randn(2, 4, 5, requires_grad=True)
    module(h).square().sum().backward()
    assert module.w_x.weight.grad.abs().sum() > 0 and module.w_x.bias.grad.abs().sum() > 0
    assert module.w_s.weight.grad.abs().sum() > 0 and h.grad.abs().sum() > 0
    assert module.w_s.bias is None  # b lives in w_x


def test_ran_takes_sequences_only():
    assert RAN.takes_previous is False
    with pytest.raises(ValueError, match="RAN takes N×C×T sequences"):
        RAN(4)(torch.randn(1, 4, 3, 3))


# --- LSTM-4 ----------------------------------------------------------------------------------------------------

ATTENTION = ["none", "san-c", "san-d", "ran"]
PLACEMENTS = ["bottleneck", "full", "reference"]
MODULES = {"bottleneck": 2, "full": 4, "reference": 2}


def test_lstm4_is_registered_and_is_the_papers_four_layer_network():
    assert "lstm4" in list_models()
    net = build_model("lstm4", 4, in_chans=6)
    lstms = [m for m in net.modules() if isinstance(m, nn.LSTM)]
    assert [(m.input_size, m.hidden_size, m.batch_first) for m in lstms] == [(6, 64, True)] + [(64, 64, True)] * 3
    assert [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, nn.Linear)] == [(64, 4)]


@pytest.mark.parametrize(("attention", "placement"), list(itertools.product(ATTENTION, PLACEMENTS)))
def test_lstm4_every_attention_and_placement_trains(attention, placement):
    torch.manual_seed(6)
    net = build_model("lstm4", 4, attention, placement, in_chans=6)
    modules = attention_modules(net)
    assert len(modules) == (0 if attention == "none" else MODULES[placement])
    out = net(torch.randn(3, 100, 6))
    assert out.shape == (3, 4) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    assert net.units[0].lstm.weight_ih_l0.grad.abs().sum() > 0
    for module in modules.values():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_lstm4_sites_sit_after_layers_2_and_4_or_after_every_layer():
    bottleneck = build_model("lstm4", 2, "san-c", "bottleneck", in_chans=6)
    assert list(attention_modules(bottleneck)) == ["units.1.attn", "units.3.attn"]
    full = build_model("lstm4", 2, "ran", "full", in_chans=6)
    assert list(attention_modules(full)) == [f"units.{i}.attn" for i in range(4)]
    assert all(isinstance(m, RAN) for m in attention_modules(full).values())


def test_lstm4_san_compares_a_layer_output_with_its_input_with_a_kernel_3_conv_over_time():
    net = build_model("lstm4", 2, "san-d", "full", in_chans=6).eval()
    modules = attention_modules(net)
    assert all(m.dims == 1 and m.smooth.kernel_size == (3,) and m.smooth.dilation == (2,) for m in modules.values())
    seen: dict[str, tuple] = {}
    net.units[0].attn.register_forward_pre_hook(lambda _m, args: seen.__setitem__("first", args))
    net.units[2].attn.register_forward_pre_hook(lambda _m, args: seen.__setitem__("third", args))
    x = torch.randn(2, 9, 6)
    net(x)
    y, y_prev = seen["first"]
    assert y.shape == (2, 64, 9) and torch.equal(y_prev, x.transpose(1, 2))  # layer 1 compares with the input
    y, y_prev = seen["third"]
    assert y.shape == y_prev.shape == (2, 64, 5)  # after the first pooling: ceil(9 / 2) steps


@pytest.mark.parametrize(("features", "steps"), [(1, 29), (1, 7), (1, 1), (12, 29), (6, 2)])
@pytest.mark.parametrize("attention", ["san-c", "ran"])
def test_lstm4_takes_any_number_of_features_and_steps(attention, features, steps):
    torch.manual_seed(7)
    net = build_model("lstm4", 1, attention, "full", in_chans=features)  # 1 output: univariate forecasting
    out = net(torch.randn(2, steps, features))
    assert out.shape == (2, 1) and torch.isfinite(out).all()
    out.sum().backward()


def test_lstm4_refuses_images_and_arguments_it_has_no_use_for():
    net = build_model("lstm4", 3, in_chans=1)
    with pytest.raises(ValueError, match="lstm4 takes N×T×F sequences"):
        net(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"lstm4 takes no argument 'stem' .*no stem"):
        build_model("lstm4", 3, stem="small")


def test_lstm4_without_cca_is_incompatible_where_features_differ_from_the_hidden_units():
    with pytest.raises(IncompatibleConfiguration, match=r"C'=6 .*C=64"):
        build_model("lstm4", 4, "san-c", "full", in_chans=6, attention_kwargs={"use_cca": False})
    net = build_model("lstm4", 4, "san-c", "bottleneck", in_chans=6, attention_kwargs={"use_cca": False})
    assert net(torch.randn(2, 10, 6)).shape == (2, 4)


# --- what works on what ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["lenet5", "vgg16", "resnet18"])
def test_a_cnn_with_ran_is_incompatible(model):
    assert issubclass(IncompatibleConfiguration, ValueError)
    with pytest.raises(
        IncompatibleConfiguration,
        match=r"^(LeNet5|VGG|ResNet) carries 2-D .*'ran' works on sequences .*: none, san-c, san-d, cbam, bam$",
    ):
        build_model(model, 10, "ran", "bottleneck")


@pytest.mark.parametrize("attention", ["cbam", "bam"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_lstm4_with_an_image_module_is_incompatible(attention, placement):
    message = (
        rf"^lstm4 carries sequences .* attention '{attention}' works on 2-D feature maps .*: none, san-c, san-d, ran$"
    )
    with pytest.raises(IncompatibleConfiguration, match=message):
        build_model("lstm4", 4, attention, placement, in_chans=6)


def test_dims_is_the_positions_not_a_keyword():
    assert create_attention("san-c", 8, prev_channels=8, dims=1).dims == 1
    assert create_attention("san-c", 8, prev_channels=8).dims == 2
    with pytest.raises(ValueError, match="dims is set by the model at each position, not by attention_kwargs"):
        build_model("lstm4", 4, "san-c", in_chans=6, attention_kwargs={"dims": 2})


# --- masks ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["san-c", "ran"])
def test_capture_masks_reads_the_sequence_maps(attention):
    torch.manual_seed(8)
    net = build_model("lstm4", 4, attention, "bottleneck", in_chans=6)
    captured = capture_masks(net, torch.randn(2, 100, 6), inputs=True)
    assert list(captured) == ["units.1.attn", "units.3.attn"]
    names = (
        ["current", "previous", "doc", "extrema", "smoothed", "mask"] if attention == "san-c" else ["current", "mask"]
    )
    for path, steps in zip(captured, [100, 50], strict=True):
        assert list(captured[path]) == names
        assert all(m.shape == (2, 64, steps) for m in captured[path].values())
        assert captured[path]["mask"].min() >= 0 and captured[path]["mask"].max() <= 1
