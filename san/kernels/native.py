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


# --- CBAM's and BAM's full-size passes (`san.kernels.fused`) -----------------------------------------------------


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


def cbam_descriptors(x: Tensor, layout: int) -> tuple[Tensor, Tensor]:
    """(mean, max) of ``x`` over positions, each (N, C)."""
    avg, top = x.new_empty(x.shape[:2]), x.new_empty(x.shape[:2])
    _call("san_cbam_descriptors", x, layout, *_sizes(x), avg, top)
    return avg, top


def cbam_descriptors_backward(x: Tensor, layout: int, top: Tensor, grad_avg: Tensor, grad_top: Tensor) -> Tensor:
    """∂x of `cbam_descriptors` in ``x``'s layout."""
    grad_x = torch.empty_like(x)
    _call(
        "san_cbam_descriptors_backward",
        x,
        layout,
        top.contiguous(),
        grad_avg.contiguous(),
        grad_top.contiguous(),
        *_sizes(x),
        grad_x,
    )
    return grad_x


def cbam_pool_backward(x: Tensor, layout: int, channel_mask: Tensor, grad_pooled: Tensor) -> tuple[Tensor, Tensor]:
    """(∂x in ``x``'s layout, ∂Mc (N, C)) of `cbam_pool`."""
    grad_x, grad_mask = torch.empty_like(x), x.new_empty(x.shape[:2])
    _call(
        "san_cbam_pool_backward",
        x,
        layout,
        channel_mask.contiguous(),
        grad_pooled.contiguous(),
        *_sizes(x),
        grad_x,
        grad_mask,
    )
    return grad_x, grad_mask


def cbam_apply_backward(
    x: Tensor, grad: Tensor, layout: int, channel_mask: Tensor, spatial_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(∂x in ``x``'s layout, ∂Mc (N, C), ∂Ms (N, 1, H, W)) of `cbam_apply`; ``grad`` in ``x``'s layout."""
    grad_x, grad_channel = torch.empty_like(x), x.new_empty(x.shape[:2])
    grad_spatial = x.new_empty(x.shape[0], 1, *x.shape[2:])
    _call(
        "san_cbam_apply_backward",
        x,
        grad,
        layout,
        channel_mask.contiguous(),
        spatial_mask.contiguous(),
        *_sizes(x),
        grad_x,
        grad_channel,
        grad_spatial,
    )
    return grad_x, grad_channel, grad_spatial


def _pointers(tensors: list[Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(_pointer(t) for t in tensors))


def bam_forward(
    x: Tensor, layout: int, sizes: list[int], scalars: list[float], params: list[Tensor | None]
) -> tuple[Tensor, Tensor, Tensor]:
    """(BAM's output in ``x``'s layout, its first 1x1 conv's output (N, K, H, W), the channel means (N, C)) in one
    call, running statistics moved; ``sizes``, ``scalars`` and ``params`` as native.c's san_bam_forward takes them
    (`san.kernels.fused._BAMPlan`)."""
    params = [_contiguous(t) for t in params]  # held until the call returns, as every tensor below
    out = torch.empty_like(x)
    reduced = x.new_empty(x.shape[0], sizes[4], *x.shape[2:])
    mean = x.new_empty(x.shape[:2])
    _call(
        "san_bam_forward",
        x,
        layout,
        (ctypes.c_long * len(sizes))(*sizes),
        (ctypes.c_float * len(scalars))(*scalars),
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
    sizes: list[int],
    scalars: list[float],
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
        (ctypes.c_long * len(sizes))(*sizes),
        (ctypes.c_float * len(scalars))(*scalars),
        _pointers(params),
        reduced,
        mean,
        grad_x,
        _pointers(grads),
    )
    return grad_x, grads


# --- SAN's full-size passes (`san.kernels.fused._SANMaskNative`) ---------------------------------------------------


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
    as `san.kernels.fused._weighted_doc` computes them."""
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


# --- A few-channel chain's stages (`san.kernels.fused._Stage`) ------------------------------------------------------


def _pointer(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


# The stages' activations, by their number in native.c.
ACTIVATIONS = {"identity": 0, "relu": 1, "sigmoid": 2}
