"""The attention modules' CPU kernels (san/kernels/native.c): equal to torch's convs, deterministic, built once
per machine into a cache, and optional — without a compiler the modules run on torch's convs alike."""

import contextlib
import itertools
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from san.attention import reference_formulation
from san.attention.bam import BAM
from san.attention.cbam import CBAM
from san.attention.functional import extrema_count
from san.attention.san import SAN
from san.kernels import cbam_op, native, prebuild


@pytest.fixture
def fresh_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A library built anew into an empty cache; the session's own build comes back afterwards."""
    monkeypatch.setenv("SAN_NATIVE_CACHE", str(tmp_path / "cache"))
    native.library.cache_clear()
    yield tmp_path / "cache"
    native.library.cache_clear()


# (batch, in, out, height, width, kernel, padding, dilation, bias, channels_last)
GEOMETRIES = [
    (64, 2, 1, 28, 28, (7, 7), (3, 3), (1, 1), False, True),  # CBAM's spatial conv on LeNet-5's first map
    (64, 1, 1, 28, 28, (3, 3), (4, 4), (4, 4), True, False),  # BAM's dilated conv there
    (64, 1, 2, 10, 10, (7, 7), (3, 3), (1, 1), False, False),  # CBAM's ∂pooled at the second map
    (3, 2, 3, 5, 7, (3, 3), (1, 1), (1, 1), True, True),  # narrower than one vector: the scalar loops
    (4, 3, 2, 13, 9, (5, 5), (1, 1), (2, 2), False, False),  # rows not a multiple of 4, a column tail
    (2, 1, 1, 1, 1, (7, 7), (3, 3), (1, 1), True, False),  # one pixel
    (5, 15, 15, 17, 33, (3, 3), (1, 1), (1, 1), True, True),  # the most channels the kernels take
    (6, 4, 3, 12, 10, (3, 5), (1, 2), (2, 1), True, True),  # rectangular kernel, unequal padding and dilation
    (2, 2, 1, 9, 16, (3, 3), (0, 0), (1, 1), False, False),  # no padding: a smaller output
    (5, 3, 4, 7, 9, (1, 1), (0, 0), (1, 1), True, False),  # 1x1 over contiguous rows: no padded copy
    (5, 3, 4, 7, 9, (1, 1), (0, 0), (1, 1), True, True),  # 1x1 channels-last: through the padded copy
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_conv_and_weight_gradient_equal_torch(geometry: tuple) -> None:
    batch, cin, cout, height, width, kernel, padding, dilation, has_bias, channels_last = geometry
    generator = torch.Generator().manual_seed(sum(geometry[:5]))
    x = torch.randn(batch, cin, height, width, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, *kernel, generator=generator)
    bias = torch.randn(cout, generator=generator) if has_bias else None
    assert native.applies(x, weight, groups=1)
    expected = F.conv2d(x, weight, bias, padding=padding, dilation=dilation)
    out = native.conv2d(x, weight, bias, padding, dilation)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(expected.shape, generator=generator)
    _, expected_grad, _ = torch.ops.aten.convolution_backward(
        grad, x, weight, None, [1, 1], list(padding), list(dilation), False, [0, 0], 1, [False, True, False]
    )
    torch.testing.assert_close(native.conv2d_weight_grad(grad, x, weight, padding, dilation), expected_grad,
                               rtol=1e-5, atol=1e-4 * expected_grad.abs().max().item())  # fmt: skip


def test_results_do_not_depend_on_the_thread_count() -> None:
    x, weight = torch.randn(64, 2, 28, 28), torch.randn(1, 2, 7, 7)
    grad = torch.randn(64, 1, 28, 28)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append((native.conv2d(x, weight, None, (3, 3), (1, 1)),
                            native.conv2d_weight_grad(grad, x, weight, (3, 3), (1, 1))))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    for out, grad_weight in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad_weight, results[0][1])


def test_what_the_kernels_take() -> None:
    x, weight = torch.randn(2, 2, 8, 8), torch.randn(1, 2, 3, 3)
    assert native.applies(x, weight, groups=1)
    assert not native.applies(x.double(), weight.double(), groups=1)
    assert not native.applies(x, weight, groups=2)
    assert not native.applies(torch.randn(2, 16, 8, 8), torch.randn(1, 16, 3, 3), groups=1)
    with pytest.raises(ValueError, match="does not fit"):
        native.conv2d(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 5, 5), None, (0, 0), (1, 1))


# Built inside the test, under its seed: built at collection they took whatever state the global generator had
# then, which differs from run to run.
MODULES_ON_LENET_MAPS: dict[str, Callable[[], torch.nn.Module]] = {
    "cbam-6": lambda: CBAM(6),
    "bam-6": lambda: BAM(6),
    "bam-6-product": lambda: BAM(6, combine="product"),
    "cbam-16": lambda: CBAM(16),
    "bam-40": lambda: BAM(40),
}
# Two float32 paths round a ReLU's input differently (by up to ~1e-6 here); an input closer than this to 0 may fall
# on either side of the kink in each, and its gradient flow in one and not in the other (a CI run's random weights
# met one at 1.3e-7: the kernels agreed with float64 there, torch's path did not).
RELU_MARGIN = 2e-5


def smallest_relu_input(module: torch.nn.Module, x: torch.Tensor) -> float:
    """The smallest |input| of any ReLU of ``module`` over ``x``, computed stepwise in float64."""
    smallest = [float("inf")]

    def record(_: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        smallest[0] = min(smallest[0], inputs[0].abs().min().item())

    copy = deepcopy(module).double()
    for layer in copy.modules():
        if isinstance(layer, torch.nn.ReLU):
            layer.register_forward_pre_hook(record)
    with reference_formulation(), torch.no_grad():
        copy(x.double())
    return smallest[0]


def away_from_relu_kinks(build: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, torch.Tensor]:
    """A module and a LeNet-5-sized input from the first seed whose ReLU inputs are all more than `RELU_MARGIN` from
    0 — a criterion computed in float64, blind to the two paths the test compares."""
    for seed in range(100):
        torch.manual_seed(seed)
        module = build()
        # Per-map offsets keep the channel means apart: BAM's BatchNorm1d over them is then well conditioned.
        x = torch.randn(8, module_channels(module), 30, 30) + torch.randn(8, module_channels(module), 1, 1)
        x = x.contiguous(memory_format=torch.channels_last)
        if smallest_relu_input(module, x) > RELU_MARGIN:
            return module, x
    raise AssertionError("no seed below 100 keeps every ReLU input away from its kink")


@pytest.mark.parametrize("name", list(MODULES_ON_LENET_MAPS))
def test_modules_equal_with_and_without_the_kernels(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On LeNet-5-sized maps (the kernels' vector loops), outputs, gradients and running statistics agree."""
    module, x = away_from_relu_kinks(MODULES_ON_LENET_MAPS[name])
    results = []
    for setting in ("1", "0"):
        monkeypatch.setenv("SAN_NATIVE_KERNELS", setting)
        copy = deepcopy(module)
        x_grad = x.clone().requires_grad_()
        out = copy(x_grad)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out, x_grad.grad, {n: p.grad for n, p in copy.named_parameters()}, list(copy.buffers())))
    (out, grad, params, buffers), (ref_out, ref_grad, ref_params, ref_buffers) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    # torch's own path is not bit-reproducible from run to run (its conv backward's sums); 1e-5 of the largest entry
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5 * ref_grad.abs().max().item())
    scale = max(g.abs().max().item() for g in ref_params.values())
    zero = biases_before_batch_norm(module)
    for name, ref_param in ref_params.items():
        if name in zero:
            # its true gradient is 0 (batch norm subtracts the batch mean): both paths give a cancelling sum's
            # rounding, torch's in float32 (~1e-4 of the largest gradient), ours in double
            assert params[name].abs().max() <= 1e-3 * scale and ref_param.abs().max() <= 1e-3 * scale, name
            continue
        # the two sum 7,200 products in different orders
        torch.testing.assert_close(
            params[name], ref_param, rtol=1e-4, atol=1e-4 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )
    for buffer, ref_buffer in zip(buffers, ref_buffers, strict=True):
        torch.testing.assert_close(buffer, ref_buffer)


def test_a_threads_scratch_block_is_freed_when_the_thread_exits() -> None:
    """BAM's single calls keep a scratch block per calling thread; a thread that exits (a worker's training thread
    at the end of a run) leaves none behind."""
    torch.manual_seed(0)
    module, x = BAM(6), torch.randn(4, 6, 12, 12, requires_grad=True)
    module(x).sum().backward()  # this thread's own block, if it had none
    before = native.arena_blocks()
    seen: dict[str, object] = {}

    def train_step() -> None:
        try:
            out = module(x)
            seen["node"] = type(out.grad_fn).__name__
            out.sum().backward()
            seen["blocks"] = native.arena_blocks()
        except Exception as error:  # re-raised below, in the test's own thread
            seen["error"] = error

    for _ in range(3):
        seen.clear()
        thread = threading.Thread(target=train_step)
        thread.start()
        thread.join()
        if "error" in seen:
            raise seen["error"]
        assert seen["node"] == "BamOpBackward"
        assert seen["blocks"] == before + 1, "the thread kept a block of its own"
        # join returns once Python is done with the thread; the OS thread (and its key destructors) ends just after
        deadline = time.monotonic() + 10
        while native.arena_blocks() != before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert native.arena_blocks() == before, "the exited thread's block was not freed"


def biases_before_batch_norm(module: torch.nn.Module) -> set[str]:
    """Names of the biases of layers followed by a batch norm in a Sequential."""
    names = set()
    for prefix, seq in module.named_modules():
        if isinstance(seq, torch.nn.Sequential):
            layers = list(seq.named_children())
            for (name, layer), (_, after) in itertools.pairwise(layers):
                if getattr(layer, "bias", None) is not None and isinstance(
                    after, torch.nn.modules.batchnorm._BatchNorm
                ):
                    names.add(f"{prefix}.{name}.bias" if prefix else f"{name}.bias")
    return names


def module_channels(module: torch.nn.Module) -> int:
    return next(p for p in module.parameters() if p.dim() > 1).shape[1]


def test_the_library_is_built_once_into_its_cache(fresh_build: Path) -> None:
    assert native.library() is not None
    (built,) = fresh_build.glob("san_native_*.so")
    assert not list(fresh_build.glob("*.tmp")), "a temporary file was left behind"
    stamp = built.stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None and built.stat().st_mtime_ns == stamp  # loaded, not rebuilt


def test_without_a_compiler_the_modules_run_on_torch_convs(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("SAN_NATIVE_PREBUILT", str(fresh_build.parent / "no-prebuilt"))
    x, weight = torch.randn(2, 2, 8, 8), torch.randn(1, 2, 3, 3)
    assert native.library() is None and not native.applies(x, weight, groups=1)
    assert "no C compiler" in caplog.text
    out = CBAM(6)(torch.randn(2, 6, 8, 8, requires_grad=True))
    out.sum().backward()
    assert not list(fresh_build.glob("*"))


def count_native_bam_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A one-item list that counts the calls of the C forward of BAM's op from now on."""
    calls, forward = [0], native.bam_forward

    def counted(*args):
        calls[0] += 1
        return forward(*args)

    monkeypatch.setattr(native, "bam_forward", counted)
    return calls


@pytest.mark.skipif(not native.portable_machine(), reason="the portable builds are x86-64 levels")
def test_without_a_compiler_the_prebuilt_kernels_load(
    fresh_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`python -m san.kernels.prebuild DIR` (the images' build stage) builds each portable level; a machine without
    a compiler loads the best one its CPU runs, and the modules compute with it as with a build for this CPU."""
    prebuilt = tmp_path / "prebuilt"
    prebuild.main([str(prebuilt)])
    built = sorted(path.name for path in prebuilt.iterdir())
    assert len(built) == len(native.PORTABLE_TARGETS) and not any(name.endswith(".tmp") for name in built)
    torch.manual_seed(0)
    module, x = BAM(6), torch.randn(4, 6, 12, 12)
    expected = module(x)
    cached = list(fresh_build.glob("*"))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("SAN_NATIVE_PREBUILT", str(prebuilt))
    native.library.cache_clear()
    library = native.library()
    flags = set(native._cpu_signature().split())
    best = next(t for t, needs in native.PORTABLE_TARGETS.items() if set(needs) <= flags)
    assert library is not None and Path(library._name).name.endswith(f"_{best}.so")
    calls = count_native_bam_calls(monkeypatch)
    torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-6)
    assert calls == [1], "the prebuilt kernels ran"
    assert list(fresh_build.glob("*")) == cached, "nothing is built when there is no compiler"


@pytest.mark.parametrize("compiler", ["cc", "/nonexistent/cc"], ids=["compiler", "no-compiler"])
def test_without_the_kernel_source_the_modules_fall_back(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, compiler: str
) -> None:
    """An install that lacks native.c (it is package data) warns once and runs torch's ops, never raises."""
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setattr(native, "SOURCE", fresh_build.parent / "missing" / "native.c")
    assert native.library() is None and "torch's ops" in caplog.text
    calls = count_native_bam_calls(monkeypatch)
    torch.manual_seed(0)
    module, x = BAM(6), torch.randn(2, 6, 8, 8, requires_grad=True)
    out = module(x)
    with reference_formulation():
        torch.testing.assert_close(out, deepcopy(module)(x), rtol=1e-5, atol=1e-6)
    assert calls == [0], "torch's formulation of the op ran"


@pytest.mark.skipif(not native.portable_machine(), reason="the portable builds are x86-64 levels")
def test_a_prebuilt_library_that_does_not_load_falls_back(
    fresh_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    for target in native.PORTABLE_TARGETS:
        (prebuilt / native._prebuilt_name(target)).write_bytes(b"not a shared library")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("SAN_NATIVE_PREBUILT", str(prebuilt))
    assert native.library() is None and "do not load" in caplog.text


@pytest.mark.parametrize("module", [BAM(6), CBAM(6)], ids=["bam", "cbam"])
def test_batch_statistics_of_one_value_are_refused_as_torch_refuses_them(module: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        module(torch.randn(1, 6, 1, 1))
    with reference_formulation(), pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        module(torch.randn(1, 6, 1, 1))
    module.eval()
    assert module(torch.randn(1, 6, 1, 1)).shape == (1, 6, 1, 1)  # running statistics: one sample is fine


def test_the_package_carries_the_kernel_source(tmp_path: Path) -> None:
    """native.c is package data: a wheel (what the images install) has it, or neither the kernels nor
    `san.kernels.prebuild` could be built from an installed package."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = tmp_path.glob("san-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "san/kernels/native.c" in names and "san/kernels/prebuild.py" in names


def test_prebuild_without_a_compiler_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(SystemExit) as exit_info:
        prebuild.main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no C compiler (/nonexistent/cc)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_compiler_that_fails_leaves_nothing_behind(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("SAN_NATIVE_PREBUILT", str(fresh_build.parent / "no-prebuilt"))
    assert native.library() is None
    assert not list(fresh_build.glob("*"))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("channels", [1, 6, 40])
def test_cbam_passes_equal_the_stepwise_module_with_ties(channels: int, layout: torch.memory_format) -> None:
    """Values on a coarse grid tie for the channel max and for each channel's spatial max, over several tiles of
    positions (33×35: not a whole number of tiles or vectors)."""
    generator = torch.Generator().manual_seed(channels)
    x = (torch.randint(-3, 4, (4, channels, 33, 35), generator=generator).float() / 2).contiguous(memory_format=layout)
    torch.manual_seed(channels)
    module = CBAM(channels)
    assert cbam_op._native(x)
    weights = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
    (out, grad, params), (ref_out, ref_grad, ref_params) = fast_and_stepwise(module, x, lambda y: (y * weights).sum())
    assert out.is_contiguous(memory_format=layout) and grad.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    scale = max(p.abs().max().item() for p in ref_params)
    for param, ref_param in zip(params, ref_params, strict=True):
        torch.testing.assert_close(param, ref_param, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("combine", ["sum", "product"])
def test_bam_mask_with_logits_far_from_zero_equals_the_stepwise_module(combine: str) -> None:
    """σ(c + s) is computed as 1 / (1 + e^-c e^-s) only while |c| and |s| keep that product a normal float: with
    c ≈ -100 and s ≈ +100 (σ(c + s) ≈ 1/2) it must still match."""
    torch.manual_seed(0)
    module = BAM(6, combine=combine)
    with torch.no_grad():
        module.channel.mlp[-1].bias.fill_(-100.0 if combine == "sum" else 0.5)
        module.spatial.body[-1].bias.fill_(100.0)
    x = torch.randn(4, 6, 20, 20).contiguous(memory_format=torch.channels_last)
    assert native.bam_applies(x, module.spatial.body[0].weight)
    (out, grad, _), (ref_out, ref_grad, _) = fast_and_stepwise(module, x, lambda y: y.square().sum())
    assert out.isfinite().all() and grad.isfinite().all()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4)


def fast_and_stepwise(module: torch.nn.Module, x: torch.Tensor | tuple[torch.Tensor, ...], loss) -> list[tuple]:
    """(output, ∂x, parameter gradients) of a copy of ``module`` on its fast path, then inside the stepwise
    formulation, each from ``loss(output)``; ∂x is a tuple when ``x`` (the module's inputs) is."""
    inputs = x if isinstance(x, tuple) else (x,)
    results = []
    for formulation in (contextlib.nullcontext(), reference_formulation()):
        copy = deepcopy(module)
        leaves = [t.clone().requires_grad_() for t in inputs]
        with formulation:
            out = copy(*leaves)
        loss(out).backward()
        grads = tuple(t.grad for t in leaves)
        results.append((out, grads if isinstance(x, tuple) else grads[0], [p.grad for p in copy.parameters()]))
    return results


def tied(shape: tuple[int, ...], seed: int, layout: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Values on a coarse grid: 3x3 windows hold ties, and differences exact zeros, as ReLU maps do."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(-3, 4, shape, generator=generator).float() / 2).contiguous(memory_format=layout)


# (batch, channels, height, width): rows past one task's 8 and a column tail; one row; one column; one pixel
SAN_SHAPES = [(3, 6, 19, 21), (2, 16, 1, 5), (2, 5, 9, 1), (1, 3, 1, 1)]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("shape", SAN_SHAPES, ids=str)
def test_san_extrema_count_equals_torch_at_borders_and_ties(shape: tuple, layout: torch.memory_format) -> None:
    y, reference = tied(shape, 0, layout), tied((shape[0], 1, *shape[2:]), 1)
    flat, code = native.map_layout(y)
    weighted, count = native.san_weighted(flat, reference, code, use_abs=True, use_extrema=True, with_count=True)
    doc = (y - reference).abs()
    expected = extrema_count(doc)
    assert count.is_contiguous(memory_format=layout) and weighted.is_contiguous(memory_format=layout)
    assert torch.equal(count, expected)
    torch.testing.assert_close(weighted, doc * expected / 9, rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("shape", SAN_SHAPES, ids=str)
@pytest.mark.parametrize("use_cca", [True, False], ids=["cca", "no-cca"])
@pytest.mark.parametrize("dilation", [1, 2], ids=["san-c", "san-d"])
def test_san_passes_equal_the_stepwise_module(
    dilation: int, use_cca: bool, shape: tuple, layout: torch.memory_format
) -> None:
    """Ties in y and in the DoC (exact zeros: the sign's 0), in either layout, with a 1-channel reference (CCA) or a
    full one."""
    torch.manual_seed(shape[1])
    module = SAN(shape[1], kernel_size=3, dilation=dilation, use_cca=use_cca)
    y, y_prev = tied(shape, 2, layout).relu(), tied(shape, 3, layout)
    assert native.san_applies(y, y_prev if not use_cca else y_prev.mean(1, keepdim=True))
    weights = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
    (out, grads, params), (ref_out, ref_grads, ref_params) = fast_and_stepwise(
        module, (y, y_prev), lambda out: (out * weights).sum()
    )
    assert out.is_contiguous(memory_format=layout) and grads[0].is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5)
    for param, ref_param in zip(params, ref_params, strict=True):
        torch.testing.assert_close(param, ref_param, rtol=1e-4, atol=1e-4 * ref_param.abs().max().item())


def test_san_passes_do_not_depend_on_the_thread_count() -> None:
    y, reference = torch.randn(4, 32, 30, 30), torch.randn(4, 1, 30, 30)
    grad, logits, grad_weighted = torch.randn_like(y), torch.randn_like(y), torch.randn_like(y)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            weighted, extrema = native.san_weighted(y, reference, 0, True, True, with_count=True)
            results.append((weighted, *native.san_input_grad(grad, y, reference, logits, grad_weighted, extrema, 0,
                                                             use_abs=True, with_reference=True)))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(result, results[0], strict=True))
