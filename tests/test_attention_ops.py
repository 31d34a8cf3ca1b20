"""The registered ops (``san::san_mask``, CBAM's, BAM's, the few-channel conv) as torch sees them:
``torch.library.opcheck`` (schema, fake kernel, autograd registration, AOT dispatch) for every switch, layout and
dtype; their values against `san.attention.functional`; models that compile with inductor and match eager; models
built and run on the meta device."""

import copy
import itertools
import os

import pytest
import torch

from san.attention import BAM, CBAM, SAN, functional, reference_formulation
from san.kernels import bam_op, cbam_op
from san.kernels.conv_op import few_channel_conv2d, few_channel_conv2d_backward
from san.kernels.san_op import san_mask, san_mask_backward
from san.registry import build_model

LAYOUTS = {"nchw": torch.contiguous_format, "channels-last": torch.channels_last}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bf16": torch.bfloat16}
# (use_abs, use_extrema, smoothing, keep_smoothed): every switch the op sees (CCA is the reference's shape)
ALL_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
SWITCHES = [s for s in itertools.product([True, False], repeat=4) if s[2] or not s[3]]


def op_inputs(layout: str, dtype: str, use_cca: bool, smoothing: bool) -> tuple[torch.Tensor | None, ...]:
    generator = torch.Generator().manual_seed(0)
    dt = DTYPES[dtype]
    y = torch.randn(2, 4, 6, 7, generator=generator).to(dt).contiguous(memory_format=LAYOUTS[layout])
    reference = torch.randn(2, 1 if use_cca else 4, 6, 7, generator=generator).to(dt)
    weight = torch.randn(4, 4, 3, 3, generator=generator).to(dt) if smoothing else None
    bias = torch.randn(4, generator=generator).to(dt) if smoothing else None
    return tuple(t if t is None else t.requires_grad_() for t in (y, reference, weight, bias))


def check_op(layout: str, dtype: str, switches: tuple[bool, ...], tests: tuple[str, ...] | str) -> None:
    """opcheck the op and its backward op on one setting."""
    use_abs, use_extrema, smoothing, keep = switches
    y, reference, weight, bias = op_inputs(layout, dtype, use_cca=use_abs, smoothing=smoothing)
    settings = (1, 1, 1, use_abs, use_extrema, "identity", keep, None)
    torch.library.opcheck(san_mask, (y, reference, weight, bias, *settings), test_utils=tests)
    out, kept = san_mask(y, reference, weight, bias, *settings)
    args = (torch.randn_like(out), y, reference, weight, bias, kept, *settings, True)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(san_mask_backward, args, test_utils=tests)


# Without the AOT-dispatch check here (seconds a case); it runs on every layout and dtype below.
@pytest.mark.parametrize("switches", SWITCHES, ids=str)
def test_opcheck_passes_for_every_switch(switches: tuple[bool, ...]) -> None:
    check_op("nchw", "float32", switches, ("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_opcheck_passes_for_every_layout_and_dtype(layout: str, dtype: str) -> None:
    check_op(layout, dtype, (True, True, True, False), ALL_CHECKS)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_opcheck_passes_for_each_activation_and_a_dilated_conv(activation: str) -> None:
    y, reference, weight, bias = op_inputs("nchw", "float32", use_cca=True, smoothing=True)
    torch.library.opcheck(san_mask, (y, reference, weight, bias, 2, 2, 1, True, True, activation, True, None))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_op_in_bf16_is_as_close_to_float64_as_the_functional_formulation(layout: str) -> None:
    """In bf16 both round at every step; the op must be no farther from the float64 truth than the reference."""
    torch.manual_seed(12)
    module = SAN(8, prev_channels=8)
    y, y_prev = torch.randn(4, 8, 10, 10).contiguous(memory_format=LAYOUTS[layout]), torch.randn(4, 8, 10, 10)

    def run(dtype: torch.dtype, stepwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
        copy = SAN(8, prev_channels=8).to(dtype)
        copy.load_state_dict(module.state_dict())
        inputs = [t.to(dtype).requires_grad_() for t in (y, y_prev)]
        if stepwise:
            smooth = copy.smooth
            out = functional.san(*inputs, smooth)
        else:
            out = copy(*inputs)
        (out.double() * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)).sum().backward()
        grads = [t.grad for t in inputs] + [p.grad for p in copy.parameters()]
        return out.double(), torch.cat([g.double().flatten() for g in grads])

    truth_out, truth = run(torch.float64, stepwise=True)
    errors = {}
    for name, stepwise in (("op", False), ("functional", True)):
        out, grads = run(torch.bfloat16, stepwise)
        assert ((out - truth_out).norm() / truth_out.norm()).item() < 0.02, name
        errors[name] = ((grads - truth).norm() / truth.norm()).item()
    assert errors["op"] <= 1.5 * errors["functional"] + 1e-3, errors


def compiled_matches_eager(model_name: str, attention: str, dtype: torch.dtype) -> None:
    torch.manual_seed(13)
    stem = {} if model_name == "lenet5" else {"stem": "small"}
    model = build_model(model_name, 10, attention=attention, **stem).to(dtype)
    x = torch.randn(4, 1, 28, 28) if model_name == "lenet5" else torch.randn(2, 3, 32, 32)
    x = x.to(dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for run in (torch.compile(model, backend="inductor"), model):
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        out = run(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)).sum().backward()
        results.append((out.detach(), [p.grad for p in model.parameters()]))
    (out, grads), (eager_out, eager_grads) = results
    tolerance = 1e-5 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(out, eager_out, rtol=tolerance, atol=tolerance)
    for grad, eager_grad in zip(grads, eager_grads, strict=True):
        assert (grad - eager_grad).norm() <= tolerance * 10 * max(eager_grad.norm(), 1.0)


@pytest.mark.parametrize("attention", ["san-c", "cbam", "bam"])
def test_lenet5_compiles_with_inductor_and_matches_eager(attention: str) -> None:
    compiled_matches_eager("lenet5", attention, torch.float32)


# The whole matrix takes minutes on 2 cores: SAN_COMPILE_TESTS=all runs it (the issue-26 report ran it).
@pytest.mark.skipif(os.environ.get("SAN_COMPILE_TESTS") != "all", reason="set SAN_COMPILE_TESTS=all (minutes)")
@pytest.mark.parametrize("attention", ["san-c", "san-d", "cbam", "bam"])
@pytest.mark.parametrize(("model_name", "dtype"), [("lenet5", torch.float32), ("resnet18", torch.float64)])
def test_every_module_compiles_with_inductor_and_matches_eager(model_name: str, dtype, attention: str) -> None:
    compiled_matches_eager(model_name, attention, dtype)


@pytest.mark.parametrize("attention", ["san-c", "san-d", "cbam", "bam"])
@pytest.mark.parametrize("model_name", ["lenet5", "resnet18"])
def test_a_model_builds_and_runs_forward_and_backward_on_meta(model_name: str, attention: str) -> None:
    with torch.device("meta"):
        model = build_model(model_name, 10, attention=attention)
        x = torch.randn(2, 1, 28, 28) if model_name == "lenet5" else torch.randn(2, 3, 64, 64)
        for formulation in (reference_formulation(), torch.enable_grad()):
            with formulation:
                out = model(x)
                out.sum().backward()
    assert out.shape == (2, 10) and out.device.type == "meta"
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())


def cbam_op_cases(layout: str, dtype: str) -> list[tuple]:
    """(op, args) of CBAM's op (training and eval) and its backward op, and of the few-channel conv, on one setting;
    a tie in every max."""
    generator = torch.Generator().manual_seed(1)
    dt = DTYPES[dtype]
    x = torch.randint(-3, 4, (3, 5, 6, 7), generator=generator).to(dt).contiguous(memory_format=LAYOUTS[layout]) / 2
    pooled = torch.randn(3, 2, 6, 7, generator=generator).to(dt)
    weight, bias = torch.randn(1, 2, 7, 7, generator=generator).to(dt), torch.randn(1, generator=generator).to(dt)
    mlp = [torch.randn(*shape, generator=generator).to(dt) for shape in ((2, 5, 1, 1), (2,), (5, 2, 1, 1), (5,))]
    norm = [torch.rand(1, generator=generator).to(dt) + 0.5 for _ in range(4)]  # weight, bias, running mean, var
    params = [t.requires_grad_() for t in (*mlp, weight.clone(), *norm[:2])]
    cases = [
        (cbam_op.cbam, (x.requires_grad_(), *params, *norm[2:], 3, training, 0.01, 1e-5)) for training in (True, False)
    ]
    out = cbam_op.cbam(x.detach(), *(t.detach() for t in params), *norm[2:], 3, True, 0.01, 1e-5)
    saved = [t.detach() for t in out[3:]]
    backward = (torch.randn_like(x), x.detach(), *(t.detach() for t in params[:6]), *saved, 3, True)
    return [
        *cases,
        (cbam_op.cbam_backward, backward),
        (few_channel_conv2d, (pooled.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), 3, 1)),
        (few_channel_conv2d, (pooled, weight, None, 4, 2)),
        (
            few_channel_conv2d_backward,
            (torch.randn(3, 1, 6, 7, dtype=dt), pooled.detach(), weight.detach(), True, 3, 1),
        ),
    ]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_opcheck_passes_for_the_cbam_ops_and_the_few_channel_conv(layout: str, dtype: str) -> None:
    for op, args in cbam_op_cases(layout, dtype):
        torch.library.opcheck(op, args, test_utils=ALL_CHECKS)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_cbam_ops_match_the_functional_formulation_in_float32(layout: str) -> None:
    """The ops (C passes in float32 on CPU) against `functional.cbam` step by step: values and every gradient."""
    torch.manual_seed(14)
    module = CBAM(6)
    x = torch.randint(-3, 4, (4, 6, 9, 8)).float().contiguous(memory_format=LAYOUTS[layout]) / 2
    results = []
    for formulation in (torch.enable_grad(), reference_formulation()):
        module.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        with formulation:
            out = module(inputs)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append([out, inputs.grad, *(p.grad for p in module.parameters())])
    for fused, stepwise in zip(*results, strict=True):
        torch.testing.assert_close(fused, stepwise, rtol=1e-4, atol=1e-5)


def bam_op_cases(layout: str, dtype: str) -> list[tuple]:
    """(op, args) of BAM's op (training and eval, sum and product) and its backward op on one setting: C passes in
    float32, torch's formulation in float64 and bf16."""
    generator = torch.Generator().manual_seed(2)
    dt = DTYPES[dtype]
    x = torch.randn(3, 8, 6, 7, generator=generator).to(dt).contiguous(memory_format=LAYOUTS[layout])
    shapes = [(2, 8), (2,), (2,), (2,), (8, 2), (8,)]  # the MLP's Linear, BatchNorm1d, Linear
    shapes += [(2, 8, 1, 1), (2,), (2,), (2,)] + [(2, 2, 3, 3), (2,), (2,), (2,)] * 2 + [(1, 2, 1, 1), (1,)]
    params = [torch.randn(*shape, generator=generator).to(dt).requires_grad_() for shape in shapes]
    running = torch.rand(8, 2, generator=generator).to(dt) + 0.5  # 4 batch norms' mean and var
    settings = [(4, [training] * 4, [0.1] * 4, [1e-5] * 4, product) for training in (True, False) for product in (0, 1)]
    cases = [(bam_op.bam, (x.requires_grad_(), params, running, d, b, m, e, bool(p))) for d, b, m, e, p in settings]
    detached = [t.detach() for t in params]
    out = bam_op.bam(x.detach(), detached, running, 4, [True] * 4, [0.1] * 4, [1e-5] * 4, False)
    backward = (torch.randn_like(x), x.detach(), detached, out[3], out[1], out[2], 4, [True] * 4, [1e-5] * 4, False)
    return [*cases, (bam_op.bam_backward, backward)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_opcheck_passes_for_the_bam_ops(layout: str, dtype: str) -> None:
    for op, args in bam_op_cases(layout, dtype):
        torch.library.opcheck(op, args, test_utils=ALL_CHECKS)


@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_bam_ops_match_the_functional_formulation(layout: str, dtype: str, combine: str) -> None:
    """The op (C passes in float32 on CPU, torch's formulation in float64) against `functional.bam` step by step:
    values, every gradient and the running statistics, in training and in eval."""
    torch.manual_seed(15)
    dt = DTYPES[dtype]
    fused = BAM(32, combine=combine).to(dt)
    stepwise = copy.deepcopy(fused)
    x = torch.randn(4, 32, 9, 8, dtype=dt).contiguous(memory_format=LAYOUTS[layout])
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == "float32" else {"rtol": 1e-9, "atol": 1e-9}
    for training in (True, False):
        results = []
        for module, formulation in ((fused, torch.enable_grad()), (stepwise, reference_formulation())):
            module.train(training).zero_grad(set_to_none=True)
            inputs = x.clone().requires_grad_()
            with formulation:
                out = module(inputs)
            (out * torch.linspace(-1, 1, out.numel(), dtype=dt).reshape(out.shape)).sum().backward()
            results.append([out, inputs.grad, *(p.grad for p in module.parameters()), *module.buffers()])
        assert results[0][0].stride() == x.stride() and results[0][1].stride() == x.stride()
        for value, expected in zip(*results, strict=True):
            torch.testing.assert_close(value, expected, **tolerance)
