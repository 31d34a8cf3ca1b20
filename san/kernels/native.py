"""CPU kernels for the attention modules (``native.c``), compiled on first use: few-channel convolutions, and the
full-size passes of CBAM, BAM and SAN.

Why: oneDNN pads a conv's channels into blocks of 16, so the 1- and 2-channel convs of CBAM (2→1 7×7) and BAM
(1→1 dilated 3×3 when C < 32) cost what 16× to 256× larger convs cost: on LeNet-5 they were most of those modules'
time. ``native.c`` does the real taps only. And each module's masks, written as torch ops, pass over a full-size map
a dozen to thirty times each way (SAN's extrema count alone is eight comparisons); the kernels make two or three.

``native.c`` is compiled by the machine's C compiler (``$CC``, else ``cc``) for this CPU into a cache keyed by the
source, the compiler and the CPU (``$SAN_NATIVE_CACHE``, else ``~/.cache/san/native``), atomically, so concurrent
workers share one build; loading it afterwards takes milliseconds. A machine without a compiler (the runtime
images) loads a build for a portable x86-64 level made beforehand (`san.kernels.prebuild`). Without either, or with
``SAN_NATIVE_KERNELS=0``, the fused paths use torch's ops instead (same results to float rounding;
tests/test_attention_native.py).
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native.c")
# Below this many input and output channels oneDNN's blocked convs waste most of their work (see above).
MAX_CHANNELS = 15
# The batch is cut into this many parts for the weight gradient, whatever the thread count: the sum's order, and so
# its rounding, depends on the input only.
WEIGHT_GRAD_PARTS = 8
_FLAGS = ("-O3", "-march=native", "-fPIC", "-shared")
# Portable builds for machines without a compiler (the runtime images build them: ``python -m
# san.kernels.prebuild``), best first, with the CPU flags each x86-64 level needs as /proc/cpuinfo names them
# (SSE3 is "pni", LZCNT "abm").
_X86_64_V2 = ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3")
PORTABLE_TARGETS = {
    "x86-64-v3": (*_X86_64_V2, "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
    "x86-64-v2": _X86_64_V2,
}
PREBUILT_DIR = Path(__file__).with_name("prebuilt")
_LIBRARIES = ("-lm", "-lpthread")  # after the source: linkers drop a library named before what uses it
_LONG, _POINTER = ctypes.c_long, ctypes.c_void_p


def enabled() -> bool:
    """Whether the fused paths may use the kernels (``SAN_NATIVE_KERNELS=0`` turns them off)."""
    return os.environ.get("SAN_NATIVE_KERNELS", "1") != "0"


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line for line in lines if line.startswith(("flags", "Features"))), "")


def _cache_dir() -> Path:
    configured = os.environ.get("SAN_NATIVE_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "san" / "native"


def _compile(compiler: str, target: Path, flags: tuple[str, ...] = _FLAGS) -> None:
    """Build ``target`` through a temporary file in its directory and a rename: a reader never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(handle)
    try:
        # OpenMP when the compiler has it: libgomp is the one torch loaded (same soname), so the kernels share its
        # threads and torch.set_num_threads.
        for openmp in (["-fopenmp"], []):
            command = [compiler, *flags, *openmp, str(SOURCE), "-o", temporary, *_LIBRARIES]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if result.returncode == 0:
                os.replace(temporary, target)
                return
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}")
    finally:
        Path(temporary).unlink(missing_ok=True)


# An exported kernel's prototype in native.c: ``void san_name(params)``, over one or more lines.
_PROTOTYPE = re.compile(r"^void (san_\w+)\(([^)]*)\)", re.MULTILINE)


def _parameter_type(declaration: str) -> type:
    if "*" in declaration:
        return _POINTER
    kind = declaration.split()[0]
    if kind == "long":
        return _LONG
    if kind == "float":
        return ctypes.c_float
    raise ValueError(f"native.c: no ctypes type for parameter {declaration!r}")


def prototypes() -> dict[str, list[type]]:
    """Each exported kernel's ctypes argument types, read from native.c's own prototypes (declared once, in C)."""
    return {
        name: [_parameter_type(part.strip()) for part in params.split(",")]
        for name, params in _PROTOTYPE.findall(SOURCE.read_text())
    }


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    for name, argtypes in prototypes().items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, None
    return library


def _prebuilt_name(target: str) -> str:
    source = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return f"san_native_{source}_{target}.so"


def portable_machine() -> bool:
    """Whether this machine has `PORTABLE_TARGETS` builds (x86-64 levels)."""
    return platform.machine() in ("x86_64", "AMD64")


def prebuild(directory: Path, compiler: str) -> list[Path]:
    """Builds the kernels for every `PORTABLE_TARGETS` level into ``directory``, for machines without a compiler."""
    built = []
    for target in PORTABLE_TARGETS:
        path = directory / _prebuilt_name(target)
        _compile(compiler, path, tuple(f"-march={target}" if flag == "-march=native" else flag for flag in _FLAGS))
        built.append(path)
    return built


def _prebuilt() -> Path | None:
    """The best prebuilt library of this source that this CPU runs (``$SAN_NATIVE_PREBUILT``, else `PREBUILT_DIR`)."""
    if not portable_machine() or not SOURCE.exists():
        return None
    directory = Path(os.environ.get("SAN_NATIVE_PREBUILT", PREBUILT_DIR))
    flags = set(_cpu_signature().split())
    for target, needs in PORTABLE_TARGETS.items():
        path = directory / _prebuilt_name(target)
        if set(needs) <= flags and path.exists():
            return path
    return None


def _load_prebuilt(reason: str) -> ctypes.CDLL | None:
    prebuilt = _prebuilt()
    if prebuilt is None:
        log.warning("%s, and no prebuilt kernels for this CPU: the attention modules use torch's ops", reason)
        return None
    try:
        library = _declare(ctypes.CDLL(str(prebuilt)))
    except (OSError, ValueError, AttributeError) as error:
        log.warning(
            "%s, and the prebuilt kernels %s do not load (%s): the attention modules use torch's ops",
            reason,
            prebuilt.name,
            error,
        )
        return None
    log.info("%s: the attention modules use the prebuilt kernels %s", reason, prebuilt.name)
    return library


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernels, built for this CPU on first use, else prebuilt for a portable target; None (with one warning)
    where neither is there."""
    name = os.environ.get("CC", "cc")
    compiler = shutil.which(name)
    if compiler is None:
        return _load_prebuilt(f"no C compiler ({name})")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(
            "\0".join(
                [SOURCE.read_text(), version, " ".join(_FLAGS + _LIBRARIES), platform.machine(), _cpu_signature()]
            ).encode()
        ).hexdigest()[:16]
        target = _cache_dir() / f"san_native_{key}.so"
        if not target.exists():
            _compile(compiler, target)
        return _declare(ctypes.CDLL(str(target)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return _load_prebuilt(f"the kernels could not be built ({error})")


def applies(x: Tensor, weight: Tensor, groups: int) -> bool:
    """Whether `conv2d` and `conv2d_weight_grad` take this conv: float32 on CPU, 4-D, ungrouped, few channels."""
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.dim() == 4
        and groups == 1
        and weight.shape[0] <= MAX_CHANNELS
        and weight.shape[1] <= MAX_CHANNELS
        and enabled()
        and library() is not None
    )


def _geometry(x: Tensor, weight: Tensor, padding: tuple[int, ...], dilation: tuple[int, ...]) -> list[int]:
    batch, channels, height, width = x.shape
    out_channels, _, kernel_height, kernel_width = weight.shape
    return [batch, channels, height, width, out_channels, kernel_height, kernel_width, *padding, *dilation]


def _output_size(x: Tensor, weight: Tensor, padding: tuple[int, ...], dilation: tuple[int, ...]) -> tuple[int, int]:
    height, width = (x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) for i in range(2))
    return height, width


def _scratch_size(x: Tensor, padding: tuple[int, ...] | list[int]) -> int:
    """Floats in the zero-padded copy of ``x`` the kernels make (native.c's pad_sample)."""
    batch, channels, height, width = x.shape
    return batch * channels * (height + 2 * padding[0]) * (width + 2 * padding[1])


def _scratch(x: Tensor, padding: tuple[int, ...]) -> Tensor:
    return x.new_empty(_scratch_size(x, padding))


def conv2d(
    x: Tensor, weight: Tensor, bias: Tensor | None, padding: tuple[int, ...], dilation: tuple[int, ...]
) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=padding, dilation=dilation)`` (stride 1) for a conv `applies` takes;
    ``x`` in any layout, the output NCHW."""
    lib = library()
    assert lib is not None
    height, width = _output_size(x, weight, padding, dilation)
    if min(height, width) <= 0:
        raise ValueError(f"a {tuple(weight.shape[2:])} kernel does not fit a {tuple(x.shape[2:])} map")
    # Every tensor whose address the kernel gets is held by a name until it returns.
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], height, width, dtype=x.dtype)
    scratch = _scratch(x, padding)
    lib.san_conv2d_forward(
        x.data_ptr(),
        *x.stride(),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        scratch.data_ptr(),
        out.data_ptr(),
        *_geometry(x, weight, padding, dilation),
    )
    return out


def conv2d_weight_grad(
    grad: Tensor, x: Tensor, weight: Tensor, padding: tuple[int, ...], dilation: tuple[int, ...]
) -> Tensor:
    """∂weight of `conv2d` given ∂output ``grad``, for a conv `applies` takes."""
    lib = library()
    assert lib is not None
    grad = grad.contiguous()
    if tuple(grad.shape[2:]) != _output_size(x, weight, padding, dilation):
        raise ValueError(f"gradient of shape {tuple(grad.shape)} does not match the conv's output")
    out = torch.empty(weight.shape, dtype=x.dtype)
    parts = max(1, min(WEIGHT_GRAD_PARTS, x.shape[0]))
    partial = torch.empty(parts * weight.numel(), dtype=x.dtype)
    scratch = _scratch(x, padding)
    lib.san_conv2d_weight_grad(
        grad.data_ptr(),
        x.data_ptr(),
        *x.stride(),
        scratch.data_ptr(),
        partial.data_ptr(),
        out.data_ptr(),
        *_geometry(x, weight, padding, dilation),
        parts,
    )
    return out


# --- CBAM's and BAM's full-size passes (`san.kernels.cbam_op`, `bam_op`) --------------------------------------------


def bam_applies(x: Tensor, reduce_weight: Tensor) -> bool:
    """Whether BAM's passes run here: float32 on CPU with the kernels built, reducing to at most `MAX_CHANNELS`
    channels (below that oneDNN's convs of the branch waste most of their work; above it they are efficient)."""
    return (
        x.dim() == 4
        and x.device.type == "cpu"
        and x.dtype == reduce_weight.dtype == torch.float32
        and reduce_weight.shape[0] <= MAX_CHANNELS
        and enabled()
        and library() is not None
    )


def map_layout(x: Tensor) -> tuple[Tensor, int]:
    """``x`` contiguous in NCHW (0) or channels-last (1), copied only if it is in neither, and which."""
    if x.is_contiguous():
        return x, 0
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, 1
    return x.contiguous(), 0


def memory_format(layout: int) -> torch.memory_format:
    """The torch memory format of a `map_layout` layout."""
    return torch.channels_last if layout else torch.contiguous_format


def _call(name: str, *args: object) -> None:
    lib = library()
    assert lib is not None
    getattr(lib, name)(*[arg.data_ptr() if isinstance(arg, Tensor) else arg for arg in args])


def arena_blocks() -> int:
    """How many threads hold a scratch block for BAM's single calls (each is freed when its thread exits)."""
    count = ctypes.c_long(0)
    _call("san_arena_blocks", ctypes.byref(count))
    return count.value


def _sizes(x: Tensor) -> tuple[int, int, int]:
    return x.shape[0], x.shape[1], x.shape[2] * x.shape[3]


def cbam_pool(x: Tensor, layout: int, channel_mask: Tensor) -> Tensor:
    """``[max_c s, mean_c s]`` (N, 2, H, W) of ``s = x · Mc``."""
    pooled = x.new_empty(x.shape[0], 2, *x.shape[2:])
    _call("san_cbam_pool", x, layout, channel_mask.contiguous(), *_sizes(x), pooled)
    return pooled


def cbam_apply(x: Tensor, layout: int, channel_mask: Tensor, spatial_mask: Tensor) -> Tensor:
    """``x · Mc · Ms`` in ``x``'s layout."""
    out = torch.empty_like(x)
    _call("san_cbam_apply", x, layout, channel_mask.contiguous(), spatial_mask.contiguous(), *_sizes(x), out)
    return out


def _contiguous(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.contiguous()


def cbam_channel(
    x: Tensor,
    layout: int,
    first_weight: Tensor,
    first_bias: Tensor | None,
    second_weight: Tensor,
    second_bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(descriptors ``[mean_hw x; max_hw x]`` (2N, C), the shared MLP's hidden layer (2N, K), ``Mc`` (N, C)) from
    the MLP's two 1x1 convs, (K, C, 1, 1) and (C, K, 1, 1)."""
    batch, channels, _ = _sizes(x)
    hidden_size = first_weight.shape[0]
    descriptors, hidden = x.new_empty(2 * batch, channels), x.new_empty(2 * batch, hidden_size)
    channel_mask = x.new_empty(batch, channels)
    _call(
        "san_cbam_channel",
        x,
        layout,
        first_weight.contiguous(),
        _contiguous(first_bias),
        second_weight.contiguous(),
        _contiguous(second_bias),
        *_sizes(x),
        hidden_size,
        descriptors,
        hidden,
        channel_mask,
    )
    return descriptors, hidden, channel_mask


def cbam_backward_spatial(x: Tensor, grad: Tensor, layout: int, channel_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(the pooled maps again, ``Σ_c s · grad`` (N, 1, H, W)); ``grad`` in ``x``'s layout."""
    pooled = x.new_empty(x.shape[0], 2, *x.shape[2:])
    grad_spatial = x.new_empty(x.shape[0], 1, *x.shape[2:])
    _call("san_cbam_backward_spatial", x, grad, layout, channel_mask.contiguous(), *_sizes(x), pooled, grad_spatial)
    return pooled, grad_spatial


def cbam_backward_mask(
    x: Tensor,
    grad: Tensor,
    layout: int,
    masks: tuple[Tensor, Tensor],
    grad_pooled: Tensor,
    descriptors: Tensor,
    hidden: Tensor,
    first_weight: Tensor,
    second_weight: Tensor,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """(∂ mean descriptor (N, C), ∂ max descriptor shared among the positions reaching the max (N, C), the MLP's
    [∂w1, ∂b1, ∂w2, ∂b2]) from ∂ pooled maps: the pass that sums ``u · x`` over positions, then the MLP's backward."""
    channel_mask, spatial_mask = (mask.contiguous() for mask in masks)
    batch, channels, _ = _sizes(x)
    hidden_size = hidden.shape[1]
    grad_avg, top_share = x.new_empty(batch, channels), x.new_empty(batch, channels)
    partial = x.new_empty(batch, 2 * hidden_size * channels + hidden_size + channels)
    _call(
        "san_cbam_backward_mask",
        x,
        grad,
        layout,
        channel_mask,
        spatial_mask,
        grad_pooled.contiguous(),
        descriptors.contiguous(),
        hidden.contiguous(),
        first_weight.contiguous(),
        second_weight.contiguous(),
        *_sizes(x),
        hidden_size,
        grad_avg,
        top_share,
        partial,
    )
    parts = partial.split([hidden_size * channels, hidden_size, hidden_size * channels, channels], dim=1)
    # Each summed over the batch in order (the same rounding whatever the thread count), each its own tensor.
    return grad_avg, top_share, [part.sum(0) for part in parts]


def cbam_backward_input(
    x: Tensor,
    grad: Tensor,
    layout: int,
    masks: tuple[Tensor, Tensor],
    grad_pooled: Tensor,
    descriptors: Tensor,
    grad_avg: Tensor,
    top_share: Tensor,
) -> Tensor:
    """∂x in ``x``'s layout, from the gradients reaching the pooled maps and the channel descriptors."""
    channel_mask, spatial_mask = (mask.contiguous() for mask in masks)
    top = descriptors[x.shape[0] :]
    grad_x = torch.empty_like(x)
    _call(
        "san_cbam_backward_input",
        x,
        grad,
        layout,
        channel_mask,
        spatial_mask,
        grad_pooled.contiguous(),
        top.contiguous(),
        grad_avg.contiguous(),
        top_share.contiguous(),
        *_sizes(x),
        grad_x,
    )
    return grad_x


def _pointers(tensors: list[Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(_pointer(t) for t in tensors))


def _bam_settings(sizes: Sequence[int], scalars: Sequence[float]) -> tuple[ctypes.Array, ctypes.Array]:
    """``sizes`` and ``scalars`` as the C arrays san_bam_forward and san_bam_backward read."""
    return (ctypes.c_long * len(sizes))(*sizes), (ctypes.c_float * len(scalars))(*scalars)


def bam_forward(
    x: Tensor, layout: int, sizes: Sequence[int], scalars: Sequence[float], params: list[Tensor | None]
) -> tuple[Tensor, Tensor, Tensor]:
    """(BAM's output in ``x``'s layout, its first 1x1 conv's output (N, K, H, W), the channel means (N, C)) in one
    call, running statistics moved; ``sizes``, ``scalars`` and ``params`` as native.c's san_bam_forward takes them
    (`san.kernels.bam_op._native_call`)."""
    params = [_contiguous(t) for t in params]  # held until the call returns, as every tensor below
    out = torch.empty_like(x)
    reduced = x.new_empty(x.shape[0], sizes[4], *x.shape[2:])
    mean = x.new_empty(x.shape[:2])
    _call(
        "san_bam_forward",
        x,
        layout,
        *_bam_settings(sizes, scalars),
        _pointers(params),
        1,
        reduced,
        mean,
        out,
    )
    return out, reduced, mean


def _bam_running(count: int) -> set[int]:
    """The entries of san_bam_forward's ``count`` params that are running statistics (the MLP's, then each
    stage's): they get no gradient."""
    return {6, 7} | {10 + 6 * stage + offset for stage in range((count - 10) // 6) for offset in (4, 5)}


def bam_backward(
    x: Tensor,
    grad: Tensor,
    layout: int,
    sizes: Sequence[int],
    scalars: Sequence[float],
    params: list[Tensor | None],
    reduced: Tensor,
    mean: Tensor,
) -> tuple[Tensor, list[Tensor | None]]:
    """(∂x in ``x``'s layout, the gradient of every entry of ``params``, None for running statistics and absent
    tensors) of `bam_forward`, from ``grad`` in ``x``'s layout, in one call."""
    params = [_contiguous(t) for t in params]
    running = _bam_running(len(params))
    grads = [None if t is None or i in running else torch.empty_like(t) for i, t in enumerate(params)]
    grad_x = torch.empty_like(x)
    _call(
        "san_bam_backward",
        x,
        grad,
        layout,
        *_bam_settings(sizes, scalars),
        _pointers(params),
        reduced,
        mean,
        grad_x,
        _pointers(grads),
    )
    return grad_x, grads


# --- SAN's full-size passes (`san.kernels.san_op`) ------------------------------------------------------------------


def san_applies(y: Tensor, reference: Tensor) -> bool:
    """Whether SAN's passes run here: float32 maps on CPU with the kernels built, and a reference with one channel
    (CCA) or ``y``'s."""
    return (
        y.dim() == 4
        and y.device.type == "cpu"
        and y.dtype == reference.dtype == torch.float32
        and reference.shape in (y.shape, (y.shape[0], 1, *y.shape[2:]))
        and enabled()
        and library() is not None
    )


def _san_reference(reference: Tensor, layout: int) -> tuple[Tensor, int]:
    """The reference in the maps' layout (a 1-channel map's data is the same in either) and its channel count."""
    if reference.shape[1] == 1:
        return reference.contiguous(), 1
    return reference.contiguous(memory_format=memory_format(layout)), reference.shape[1]


def san_weighted(
    y: Tensor, reference: Tensor, layout: int, use_abs: bool, use_extrema: bool, with_count: bool
) -> tuple[Tensor, Tensor | None]:
    """(SAN's α · DoC in ``y``'s layout, the uint8 extrema count behind α if ``with_count``), in one pass: eqs 8–10
    as `san.kernels.san_op._weighted_doc` computes them."""
    reference, channels = _san_reference(reference, layout)
    weighted = torch.empty_like(y)
    count = torch.empty_like(y, dtype=torch.uint8) if with_count and use_extrema else None
    _call("san_san_weighted", y, reference, layout, *y.shape, channels, int(use_abs), int(use_extrema), weighted, count)
    return weighted, count


def san_apply(y: Tensor, logits: Tensor) -> Tensor:
    """``y · σ(logits)``, both in one layout."""
    out = torch.empty_like(y)
    _call("san_san_apply", y, logits, y.numel(), out)
    return out


def san_logits_grad(grad: Tensor, y: Tensor, logits: Tensor) -> Tensor:
    """∂ logits of `san_apply` from its output's gradient, all in one layout."""
    grad_logits = torch.empty_like(y)
    _call("san_san_logits_grad", grad, y, logits, y.numel(), grad_logits)
    return grad_logits


def san_input_grad(
    grad: Tensor,
    y: Tensor,
    reference: Tensor,
    logits: Tensor,
    grad_weighted: Tensor,
    count: Tensor | None,
    layout: int,
    use_abs: bool,
    with_reference: bool,
) -> tuple[Tensor, Tensor | None]:
    """(∂y, ∂reference or None) of SAN's mask from its output's gradient ``grad`` and the gradient reaching the
    weighted DoC ``grad_weighted`` (all in ``y``'s layout; ``count`` None without the extrema weighting), one pass."""
    reference, channels = _san_reference(reference, layout)
    grad_y = torch.empty_like(y)
    grad_reference = torch.empty_like(reference) if with_reference else None
    _call(
        "san_san_input_grad",
        grad,
        y,
        reference,
        logits,
        grad_weighted,
        count,
        layout,
        *y.shape,
        channels,
        int(use_abs),
        int(count is not None),
        grad_y,
        grad_reference,
    )
    return grad_y, grad_reference


# --- A few-channel chain's stages (CBAM's spatial stage, BAM's branch) ----------------------------------------------


def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


# The stages' activations, by their number in native.c.
ACTIVATIONS = {"identity": 0, "relu": 1, "sigmoid": 2}


def cbam_stage_forward(
    pooled: Tensor,
    weight: Tensor,
    padding: int,
    norm: tuple[Tensor, Tensor, Tensor, Tensor],
    batch_stats: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(σ(bn(conv(pooled))), conv output, mean, invstd) of CBAM's spatial stage over the NCHW pooled maps: a
    bias-free conv, then batch norm (``norm``: weight, bias, running mean, running var), then the sigmoid, in one C
    call. With ``batch_stats`` the running statistics given move (pass copies); without, they are the ones used."""
    pooled, weight = pooled.contiguous(), weight.contiguous()
    gamma, beta, running_mean, running_var = norm
    pads = (padding, padding)
    conv_out = pooled.new_empty(pooled.shape[0], weight.shape[0], *_output_size(pooled, weight, pads, (1, 1)))
    out, scratch = torch.empty_like(conv_out), _scratch(pooled, pads)
    if batch_stats:
        mean, invstd = pooled.new_empty(weight.shape[0]), pooled.new_empty(weight.shape[0])
    else:  # as torch's batch norm without batch statistics: the running ones, left as they are
        mean, invstd = running_mean.clone(), torch.rsqrt(running_var + eps)
        running_mean = running_var = None
    lib = library()
    assert lib is not None
    # Every tensor whose address the kernel gets is held by a name until it returns.
    lib.san_stage_forward(
        pooled.data_ptr(),
        *_geometry(pooled, weight, pads, (1, 1)),
        weight.data_ptr(),
        None,
        scratch.data_ptr(),
        conv_out.data_ptr(),
        1,
        gamma.data_ptr(),
        beta.data_ptr(),
        int(batch_stats),
        ctypes.c_float(eps),
        ctypes.c_float(momentum),
        _pointer(running_mean),
        _pointer(running_var),
        mean.data_ptr(),
        invstd.data_ptr(),
        ACTIVATIONS["sigmoid"],
        out.data_ptr(),
    )
    return out, conv_out, mean, invstd


def cbam_stage_backward(
    grad: Tensor,
    pooled: Tensor,
    out: Tensor,
    conv_out: Tensor,
    stats: tuple[Tensor, Tensor],
    weight: Tensor,
    padding: int,
    gamma: Tensor,
    batch_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(∂pooled, ∂conv weight, ∂bn weight, ∂bn bias) of `cbam_stage_forward`, given ∂ its output."""
    grad, pooled, weight = grad.contiguous(), pooled.contiguous(), weight.contiguous()
    pads = (padding, padding)
    transposed = [k - 1 - padding for k in weight.shape[2:]]
    grad_conv, grad_pooled = torch.empty_like(conv_out), torch.empty_like(pooled)
    grad_weight, grad_gamma, grad_beta = torch.empty_like(weight), torch.empty_like(gamma), torch.empty_like(gamma)
    scratch = pooled.new_empty(max(_scratch_size(pooled, pads), _scratch_size(grad_conv, transposed)))
    parts = max(1, min(WEIGHT_GRAD_PARTS, pooled.shape[0]))
    partial = pooled.new_empty(parts * weight.numel())
    lib = library()
    assert lib is not None
    lib.san_stage_backward(
        grad.data_ptr(),
        pooled.data_ptr(),
        *_geometry(pooled, weight, pads, (1, 1)),
        weight.data_ptr(),
        conv_out.data_ptr(),
        out.data_ptr(),
        1,
        gamma.data_ptr(),
        int(batch_stats),
        stats[0].data_ptr(),
        stats[1].data_ptr(),
        ACTIVATIONS["sigmoid"],
        grad_conv.data_ptr(),
        grad_pooled.data_ptr(),
        grad_weight.data_ptr(),
        None,
        grad_gamma.data_ptr(),
        grad_beta.data_ptr(),
        scratch.data_ptr(),
        partial.data_ptr(),
        parts,
    )
    return grad_pooled, grad_weight, grad_gamma, grad_beta
