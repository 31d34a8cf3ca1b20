"""The fused fast paths against the step-by-step reference formulation: outputs and every gradient (input, the
previous layer, parameters) agree to float32 rounding, for every ablation switch of Table IX."""

import contextlib
import itertools

import pytest
import torch
from torch import nn

from san.attention import BAM, CBAM, SAN, reference_formulation, use_fused_paths
from san.masks import capture_masks
from san.registry import build_model

SWITCHES = ("use_cca", "use_abs", "use_extrema", "use_smoothing")


def outputs_and_grads(module: nn.Module, inputs: tuple[torch.Tensor, ...], reference: bool):
    inputs = tuple(t.detach().clone().requires_grad_() for t in inputs)
    module.zero_grad(set_to_none=True)
    if reference:
        with reference_formulation():
            out = module(*inputs)
    else:
        out = module(*inputs)
    # A non-uniform upstream gradient, so every position's gradient path is exercised.
    upstream = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    (out * upstream).sum().backward()
    grads = {f"input{i}": t.grad for i, t in enumerate(inputs)}
    grads |= {name: p.grad for name, p in module.named_parameters()}
    return out.detach(), grads


def assert_fast_equals_reference(module: nn.Module, *inputs: torch.Tensor) -> None:
    state = {k: v.clone() for k, v in module.state_dict().items()}
    fast_out, fast_grads = outputs_and_grads(module, inputs, reference=False)
    fast_state = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(state)
    ref_out, ref_grads = outputs_and_grads(module, inputs, reference=True)
    torch.testing.assert_close(fast_out, ref_out, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == ref_grads.keys()
    # Absolute tolerance on the scale of the module's largest gradient: a bias before batch norm has a true
    # gradient of 0, which both paths only approximate by a cancelling sum of terms of that scale.
    scale = max(grad.abs().max().item() for grad in ref_grads.values() if grad is not None)
    tolerance = 1e-5 * max(scale, 1.0) if ref_out.dtype == torch.float32 else 1e-10 * max(scale, 1.0)
    for name, grad in ref_grads.items():
        assert grad is not None and fast_grads[name] is not None, name
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=tolerance, msg=lambda m, n=name: f"{n}: {m}")
    # Batch-norm running statistics move alike too.
    for key, value in module.state_dict().items():
        torch.testing.assert_close(fast_state[key], value, msg=lambda m, k=key: f"{k}: {m}")


def tied_maps(*shape: int, seed: int = 0) -> torch.Tensor:
    """Values on a coarse grid, so 3x3 windows hold ties (and the DoC exact zeros) like ReLU outputs do."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, shape, generator=generator).float() / 2


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute-smoothing", "keep-smoothing"])
@pytest.mark.parametrize("dilation", [1, 2], ids=["san-c", "san-d"])
@pytest.mark.parametrize("switches", list(itertools.product([True, False], repeat=4)), ids=str)
def test_san_fast_path_equals_reference_for_every_switch(
    dilation: int, switches: tuple[bool, ...], recompute: bool
) -> None:
    torch.manual_seed(0)
    module = SAN(4, kernel_size=3, dilation=dilation, **dict(zip(SWITCHES, switches, strict=True)))
    module.recompute_smoothing = recompute
    y = torch.randn(2, 4, 7, 9)
    y_prev = torch.randn(2, 4, 7, 9)
    assert_fast_equals_reference(module, y, y_prev)


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (2, 3, 1, 5), (2, 3, 2, 2), (1, 5, 6, 3)], ids=str)
def test_san_fast_path_at_tensor_borders_and_ties(shape: tuple[int, ...]) -> None:
    torch.manual_seed(1)
    module = SAN(shape[1], kernel_size=3)
    assert_fast_equals_reference(
        module, tied_maps(*shape, seed=1).relu(), tied_maps(2 * shape[0], 2, *shape[2:])[: shape[0]]
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 5, "dilation": 2},
        {"kernel_size": 7},
        {"kernel_size": 1},
        {"kernel_size": 4},  # even: the stepwise path, still equal
        {"smoothing_groups": "depthwise"},
        {"smoothing_groups": 2},
        {"smoothing_activation": "relu"},
        {"smoothing_activation": "tanh"},
        {"smoothing_activation": "sigmoid"},
    ],
    ids=str,
)
def test_san_fast_path_equals_reference_for_each_setting(kwargs: dict) -> None:
    torch.manual_seed(2)
    module = SAN(4, prev_channels=6, **kwargs)
    assert_fast_equals_reference(module, torch.randn(3, 4, 8, 8), torch.randn(3, 6, 8, 8))


def test_san_fast_path_with_a_larger_previous_map_and_ties() -> None:
    torch.manual_seed(3)
    module = SAN(4, prev_channels=2)
    assert_fast_equals_reference(module, tied_maps(2, 4, 5, 5).relu(), tied_maps(2, 2, 10, 10, seed=2))


def test_taps_still_see_every_map() -> None:
    model = build_model("lenet5", 10, attention="san-c")
    maps = capture_masks(model, torch.randn(2, 1, 28, 28))
    assert all(set(m) == {"doc", "extrema", "smoothed", "mask"} for m in maps.values())


@pytest.mark.parametrize("channels", [1, 6, 64])
def test_cbam_fast_path_equals_reference(channels: int) -> None:
    torch.manual_seed(4)
    module = CBAM(channels)
    assert_fast_equals_reference(module, torch.randn(3, channels, 6, 7))
    assert_fast_equals_reference(module, tied_maps(3, channels, 5, 5))


@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("channels", [1, 6, 64])
def test_bam_fast_path_equals_reference(channels: int, combine: str) -> None:
    torch.manual_seed(5)
    module = BAM(channels, combine=combine)
    assert_fast_equals_reference(module, torch.randn(3, channels, 9, 9))


@pytest.mark.parametrize("attention", ["san-c", "san-d", "cbam", "bam"])
@pytest.mark.parametrize("model_name", ["lenet5", "resnet18"])
def test_whole_models_train_alike_on_either_path(model_name: str, attention: str) -> None:
    """In float64: through a deep net with batch norm, float32 rounding differences grow past any fixed
    tolerance (to ~1 % of a gradient here), so the equality of the two formulations is checked where
    rounding is negligible."""
    torch.manual_seed(6)
    stem = {} if model_name == "lenet5" else {"stem": "small"}
    model = build_model(model_name, 10, attention=attention, placement="full", **stem).double()
    channels, size = (1, 28) if model_name == "lenet5" else (3, 32)
    assert_fast_equals_reference(model, torch.randn(4, channels, size, size, dtype=torch.float64))


def test_the_path_is_chosen_once_and_a_hook_does_not_change_it() -> None:
    module = SAN(4)
    y, y_prev = torch.randn(2, 4, 6, 6, requires_grad=True), torch.randn(2, 3, 6, 6)
    # the registered op san::san_mask, in float32 (C passes) and float64 (torch's formulation of the same op) alike
    assert type(module(y, y_prev).grad_fn).__name__ == "SanMaskOpBackward"
    assert type(module.double()(y.double(), y_prev.double()).grad_fn).__name__ == "SanMaskOpBackward"
    module.float()
    with reference_formulation():
        assert type(module(y, y_prev).grad_fn).__name__ == "MulBackward0"
    handle = module.mask.register_forward_hook(lambda *_: None)
    assert type(module(y, y_prev).grad_fn).__name__ == "SanMaskOpBackward"
    handle.remove()
    assert type(use_fused_paths(module, False)(y, y_prev).grad_fn).__name__ == "MulBackward0"
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    # CBAM and BAM: their registered ops, C passes in float32 and torch's formulation of the same ops in float64
    assert type(CBAM(8)(x).grad_fn).__name__ == "CbamOpBackward"
    assert type(CBAM(8).double()(x.double()).grad_fn).__name__ == "CbamOpBackward"
    assert type(BAM(8)(x).grad_fn).__name__ == "BamOpBackward"
    assert type(BAM(8).double()(x.double()).grad_fn).__name__ == "BamOpBackward"


def test_recompute_or_keep_follows_the_smoothing_conv_cost() -> None:
    assert SAN(6, kernel_size=5).recompute_smoothing  # LeNet's first site: 150 multiply-adds per output
    assert not SAN(64, kernel_size=7).recompute_smoothing  # ResNet's stem: 3,136
    assert SAN(64, kernel_size=7, smoothing_groups="depthwise").recompute_smoothing


@pytest.mark.parametrize("attention", ["san-c", "san-d", "cbam", "bam"])
def test_channels_last_inputs_take_the_fast_path_alike(attention: str) -> None:
    torch.manual_seed(8)
    model = build_model("lenet5", 10, attention=attention).double().to(memory_format=torch.channels_last)
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert_fast_equals_reference(model, x)


def gradients_under(module: nn.Module, inputs: tuple[torch.Tensor, ...], formulation, dtype, autocast: bool):
    state = {k: v.clone() for k, v in module.state_dict().items()}
    module = module.to(dtype)
    inputs = tuple(t.to(dtype).requires_grad_() for t in inputs)
    module.zero_grad(set_to_none=True)
    with formulation, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(*inputs)
    (out.double() * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)).sum().backward()
    grads = [t.grad for t in inputs] + [p.grad for p in module.parameters()]
    module.to(torch.float32).load_state_dict(state)
    return out.detach().double(), torch.cat([g.double().flatten() for g in grads])


@pytest.mark.parametrize(
    "factory, shapes",
    [
        (lambda: SAN(16, prev_channels=8), [(8, 16, 12, 12), (8, 8, 12, 12)]),
        (lambda: CBAM(16), [(8, 16, 12, 12)]),
        (lambda: BAM(64), [(8, 64, 12, 12)]),
    ],
    ids=["san", "cbam", "bam"],
)
@pytest.mark.parametrize("seed", [9, 10, 11])
def test_bf16_autocast_on_cpu_is_as_close_to_the_truth_as_the_reference(factory, shapes, seed: int) -> None:
    """Under bf16 autocast both paths round; the fast one must be no farther from the float64 truth."""
    torch.manual_seed(seed)
    module = factory()
    inputs = tuple(torch.randn(shape) for shape in shapes)
    truth_out, truth = gradients_under(module, inputs, contextlib.nullcontext(), torch.float64, autocast=False)
    errors = {}
    for name, formulation in (("fast", contextlib.nullcontext()), ("reference", reference_formulation())):
        out, grads = gradients_under(module, inputs, formulation, torch.float32, autocast=True)
        errors[name] = ((grads - truth).norm() / truth.norm()).item()
        assert ((out - truth_out).norm() / truth_out.norm()).item() < 0.02, name
    assert errors["fast"] <= 1.1 * errors["reference"] + 1e-3, errors
    assert errors["fast"] < 0.1, errors


def test_fast_path_in_eval_mode_and_without_grad() -> None:
    torch.manual_seed(7)
    for module, inputs in [
        (SAN(4), (torch.randn(2, 4, 6, 6), torch.randn(2, 3, 6, 6))),
        (CBAM(8), (torch.randn(2, 8, 5, 5),)),
        (BAM(8), (torch.randn(2, 8, 5, 5),)),
    ]:
        module.eval()
        with torch.no_grad():
            fast = module(*inputs)
            with reference_formulation():
                reference = module(*inputs)
        torch.testing.assert_close(fast, reference)


@pytest.mark.parametrize("attention", ["san-c", "cbam", "bam"])
def test_higher_order_gradients_raise_on_the_fast_path_and_work_stepwise(attention: str) -> None:
    model = build_model("lenet5", 10, attention=attention).double().eval()
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="reference_formulation"):
        torch.autograd.grad(model(x).logsumexp(1).sum(), x, create_graph=True)
    with reference_formulation():
        (grad,) = torch.autograd.grad(model(x).logsumexp(1).sum(), x, create_graph=True)
        second = torch.autograd.grad(grad.pow(2).sum(), list(model.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in second)


MODULES = {
    "san": (lambda c: SAN(c, prev_channels=c), 2),
    "cbam": (lambda c: CBAM(c), 1),
    "bam": (lambda c: BAM(c), 1),
}


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("name", list(MODULES))
def test_the_output_keeps_the_input_layout(name: str, layout: torch.memory_format) -> None:
    factory, inputs = MODULES[name]
    module = factory(6)
    x = torch.randn(2, 6, 7, 7).contiguous(memory_format=layout)
    out = module(*[x] * inputs)
    with reference_formulation():
        reference = module(*[x] * inputs)
    assert out.stride() == reference.stride() == x.stride()


@pytest.mark.parametrize("name", ["cbam", "bam"])
def test_a_parameter_changed_in_place_before_backward_is_an_error_as_stepwise(name: str) -> None:
    factory, inputs = MODULES[name]
    module = factory(8)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    out = module(*[x] * inputs)
    with torch.no_grad():
        next(m for m in module.modules() if isinstance(m, nn.Conv2d)).weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize(
    "setting",
    ["eval", "momentum-none", "untracked-after-build"],
)
@pytest.mark.parametrize("name", ["cbam", "bam"])
def test_batch_norm_settings_behave_as_stepwise(name: str, setting: str) -> None:
    torch.manual_seed(10)
    factory, inputs = MODULES[name]
    module = factory(8)
    for bn in (m for m in module.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))):
        if setting == "momentum-none":
            bn.momentum = None
        elif setting == "untracked-after-build":
            bn.track_running_stats = False
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
    if setting == "eval":
        module.eval()
    x = torch.randn(3, 8, 6, 6)
    for _ in range(2):  # momentum=None averages over the batches seen
        assert_fast_equals_reference(module, *[x] * inputs)


@pytest.mark.parametrize("name", list(MODULES))
def test_float64_under_autocast_runs_in_float64_as_stepwise(name: str) -> None:
    torch.manual_seed(11)
    factory, inputs = MODULES[name]
    module = factory(8).double()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(*[x] * inputs)
        with reference_formulation():
            reference = module(*[x] * inputs)
    assert out.dtype == reference.dtype == torch.float64
    torch.testing.assert_close(out, reference)
