"""SAN's eqs 8–12 and 4 — ``y * sigmoid(σ(smooth(α · |y - reference|)))`` — as the registered op ``san::san_mask``.

Why one op: stepwise, every elementwise step keeps a full-size float map for backward and pays an autograd node;
this op keeps ``y``, ``reference`` (1 channel with CCA) and one map at most — the uint8 extrema count or, where the
smoothing conv is expensive (``keep_smoothed``), its output — and recomputes the rest in its backward op
``san::san_mask_backward``. In float32 on CPU both run on the C passes of `san.kernels.native` (the DoC, its count
and weighting in one pass, the mask and output in one; torch's formulation makes ~30 passes each way); elsewhere on
torch's ops. The smoothing conv is always torch's.

The library sees through it: ``register_fake`` gives shapes (meta tensors, ``torch.compile``, ``torch.export``),
``register_autograd`` the backward op, and an Autocast kernel runs the smoothing conv in autocast's dtype and the
rest in ``y``'s, as the stepwise formulation does. Gradients are first-order only.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from san.kernels import native, node

_EMPTY = (0,)
_NO_HIGHER_ORDER = (
    "the fused attention paths give first-order gradients only; for higher-order gradients "
    "(create_graph=True) run the model inside san.attention.reference_formulation()"
)

# Below this many channels, oneDNN's CPU conv backward runs several times faster channels-last (it pads NCHW
# channels into blocks of 16, so a 1- or 2-channel map costs a 16-channel one: bench/profile_attention.py layouts),
# and elementwise broadcasts several times faster in NCHW.
SMALL_CHANNELS = 16


def small_map_layout(x: Tensor) -> Tensor:
    """``x`` in the layout where a CPU conv over its channels is fastest: channels-last below `SMALL_CHANNELS`."""
    if x.device.type != "cpu" or x.dim() != 4 or x.shape[1] >= SMALL_CHANNELS:
        return x
    if x.shape[1] == 1:  # contiguous() keeps a 1-channel map's NCHW strides, which oneDNN reads as NCHW
        batch, _, height, width = x.shape
        return x.reshape(batch, height, width, 1).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


def sum_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient back to ``shape`` (the inverse of broadcasting, as autograd does)."""
    if grad.shape == shape:
        return grad
    dims = [i for i, (g, s) in enumerate(zip(grad.shape, shape, strict=True)) if s == 1 and g != 1]
    return grad.sum(dims, keepdim=True)


# σ of SAN's eq 11 and its derivative written with σ's output (identity: no op).
ACTIVATION_FORWARD: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "relu": torch.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


def activation_backward(name: str, grad: Tensor, output: Tensor) -> Tensor:
    """The activation's gradient from its output, each one ATen pass (the rules autograd itself uses)."""
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, output, 0)
    if name == "tanh":
        return torch.ops.aten.tanh_backward(grad, output)
    if name == "sigmoid":
        return torch.ops.aten.sigmoid_backward(grad, output)
    return grad


def first_order(backward):
    """A registered backward that raises under ``create_graph=True`` rather than return gradients that silently
    lack their second-order terms."""

    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(_NO_HIGHER_ORDER)
        return backward(ctx, *grads)

    return wrapper


def like(value: Tensor, template: Tensor) -> Tensor:
    """``value`` with ``template``'s strides (``empty_like``'s, the fake kernels'), copied only if they differ."""
    if value.stride() == template.stride():
        return value
    return torch.empty_like(template, dtype=value.dtype).copy_(value)


def _native(y: Tensor, reference: Tensor, conv_dtype: torch.dtype | None) -> bool:
    return conv_dtype is None and native.san_applies(y, reference)


def _smooth(
    weighted: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    conv: tuple,
    activation: str,
    dtype: torch.dtype | None,
) -> Tensor:
    """σ(smooth(weighted)) of eq 11, the conv in ``dtype`` (autocast's) if given."""
    if weight is None:
        return weighted
    padding, dilation, groups = conv
    if dtype is not None:
        weighted, weight = weighted.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    logits = F.conv2d(small_map_layout(weighted), weight, bias, padding=padding, dilation=dilation, groups=groups)
    return ACTIVATION_FORWARD[activation](logits)


def _smooth_backward(
    grad: Tensor, weighted: Tensor, weight: Tensor, bias: Tensor | None, conv: tuple, dtype: torch.dtype | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    padding, dilation, groups = conv
    conv_weight = weight if dtype is None else weight.to(dtype)
    conv_input = small_map_layout(weighted if dtype is None else weighted.to(dtype))
    grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        small_map_layout(grad.to(conv_input.dtype)),
        conv_input,
        conv_weight,
        None if bias is None else [bias.shape[0]],
        [1, 1],
        [padding] * 2,
        [dilation] * 2,
        False,
        [0, 0],
        groups,
        [True, True, bias is not None],
    )
    grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
    return grad_input.to(weighted.dtype), grad_weight.to(weight.dtype), grad_bias


def _weighted_doc(
    y: Tensor, reference: Tensor, use_abs: bool, use_extrema: bool, count: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(``y - reference``, eq 10's ``α · dY``, the uint8 count behind α — computed unless given)."""
    from san.attention.functional import extrema_count  # the maths' home imports this module: import it late

    diff = y - reference
    doc = diff.abs() if use_abs else diff.clone()
    if not use_extrema:
        return diff, doc, None
    count = extrema_count(doc) if count is None else count
    return diff, doc.mul_(count).mul_(1 / 9), count


@torch.library.custom_op("san::san_mask", mutates_args=())
def san_mask(
    y: Tensor,
    reference: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    padding: int,
    dilation: int,
    groups: int,
    use_abs: bool,
    use_extrema: bool,
    activation: str,
    keep_smoothed: bool,
    conv_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """(``y * M``, what backward keeps: the smoothing's output if ``keep_smoothed``, else the uint8 extrema count on
    torch's path and nothing on the C path). ``weight is None``: no smoothing (``use_smoothing=False``)."""
    conv, keep = (padding, dilation, groups), keep_smoothed and weight is not None
    if _native(y, reference, conv_dtype):
        flat, layout = native.map_layout(y)
        weighted, _ = native.san_weighted(flat, reference, layout, use_abs, use_extrema, with_count=False)
        logits = _smooth(weighted, weight, bias, conv, activation, None)
        logits = logits.contiguous(memory_format=native.memory_format(layout))
        out = native.san_apply(flat, logits)
        return like(out, y), like(logits, y) if keep else y.new_empty(_EMPTY)
    _, weighted, count = _weighted_doc(y, reference, use_abs, use_extrema)
    logits = _smooth(weighted, weight, bias, conv, activation, conv_dtype)
    out = y * torch.sigmoid(logits)  # autocast: y's dtype may be the wider
    if keep:
        return like(out, y), like(logits, y)
    return like(out, y), y.new_empty(_EMPTY, dtype=torch.uint8) if count is None else like(count, y)


@san_mask.register_fake
def _(
    y,
    reference,
    weight,
    bias,
    padding,
    dilation,
    groups,
    use_abs,
    use_extrema,
    activation,
    keep_smoothed,
    conv_dtype=None,
):
    keep = keep_smoothed and weight is not None
    if keep:
        dtype = y.dtype if conv_dtype is None or _native(y, reference, conv_dtype) else conv_dtype
        return torch.empty_like(y), torch.empty_like(y, dtype=dtype)
    if _native(y, reference, conv_dtype) or not use_extrema:
        return torch.empty_like(y), y.new_empty(_EMPTY, dtype=y.dtype if _native(y, reference, None) else torch.uint8)
    return torch.empty_like(y), torch.empty_like(y, dtype=torch.uint8)


@torch.library.custom_op("san::san_mask_backward", mutates_args=())
def san_mask_backward(
    grad: Tensor,
    y: Tensor,
    reference: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    kept: Tensor,
    padding: int,
    dilation: int,
    groups: int,
    use_abs: bool,
    use_extrema: bool,
    activation: str,
    keep_smoothed: bool,
    conv_dtype: torch.dtype | None,
    reference_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(∂y, ∂reference, ∂weight, ∂bias) of `san_mask`; an empty tensor for what is not wanted or not there."""
    conv, keep = (padding, dilation, groups), keep_smoothed and weight is not None
    if _native(y, reference, conv_dtype):
        flat, layout = native.map_layout(y)
        grad = grad.contiguous(memory_format=native.memory_format(layout))
        weighted, count = native.san_weighted(flat, reference, layout, use_abs, use_extrema, with_count=True)
        logits = kept if keep else _smooth(weighted, weight, bias, conv, activation, None)
        logits = logits.contiguous(memory_format=native.memory_format(layout))
        grad_logits = activation_backward(activation, native.san_logits_grad(grad, flat, logits), logits)
        grad_weight = grad_bias = None
        if weight is not None:
            grad_logits, grad_weight, grad_bias = _smooth_backward(grad_logits, weighted, weight, bias, conv, None)
        grad_weighted = grad_logits.contiguous(memory_format=native.memory_format(layout))
        grad_y, grad_reference = native.san_input_grad(
            grad, flat, reference, logits, grad_weighted, count, layout, use_abs, reference_grad
        )
    else:
        diff, weighted, count = _weighted_doc(y, reference, use_abs, use_extrema, None if keep else kept)
        logits = kept if keep else _smooth(weighted, weight, bias, conv, activation, conv_dtype)
        mask = torch.sigmoid(logits)
        grad_y = grad * mask
        grad_logits = (grad * y).mul_(mask).mul_(mask.neg_().add_(1))  # mul's backward, then sigmoid's
        grad_logits = activation_backward(activation, grad_logits, logits)
        grad_weight = grad_bias = None
        if weight is not None:
            grad_logits, grad_weight, grad_bias = _smooth_backward(
                grad_logits, weighted, weight, bias, conv, conv_dtype
            )
        grad_doc = grad_logits.mul_(1 / 9).mul_(count) if use_extrema else grad_logits
        if use_abs:
            grad_doc.mul_(diff.sgn_())
        grad_y.add_(grad_doc)
        grad_reference = sum_to(grad_doc, reference.shape).neg() if reference_grad else None
    return (
        like(grad_y, y),
        y.new_empty(_EMPTY) if grad_reference is None else like(grad_reference, reference),
        y.new_empty(_EMPTY) if grad_weight is None else like(grad_weight, weight),
        y.new_empty(_EMPTY) if grad_bias is None else grad_bias,
    )


@san_mask_backward.register_fake
def _(
    grad,
    y,
    reference,
    weight,
    bias,
    kept,
    padding,
    dilation,
    groups,
    use_abs,
    use_extrema,
    activation,
    keep_smoothed,
    conv_dtype,
    reference_grad,
):
    return (
        torch.empty_like(y),
        torch.empty_like(reference) if reference_grad else y.new_empty(_EMPTY),
        y.new_empty(_EMPTY) if weight is None else torch.empty_like(weight),
        y.new_empty(_EMPTY) if bias is None else torch.empty_like(bias),
    )


def _setup_context(ctx, inputs, output) -> None:
    y, reference, weight, bias, *settings = inputs
    ctx.settings = settings
    ctx.save_for_backward(y, reference, weight, bias, output[1])


@first_order
def _backward(ctx, grad: Tensor, _grad_kept: Tensor):
    y, reference, weight, bias, kept = ctx.saved_tensors
    *settings, conv_dtype = ctx.settings
    grad_y, grad_reference, grad_weight, grad_bias = torch.ops.san.san_mask_backward.default(
        grad, y, reference, weight, bias, kept, *settings, conv_dtype, ctx.needs_input_grad[1]
    )
    grads = (grad_y, grad_reference if ctx.needs_input_grad[1] else None)
    grads += (None if weight is None else grad_weight, None if bias is None else grad_bias)
    return *grads, *[None] * 8


san_mask.register_autograd(_backward, setup_context=_setup_context)
_REGISTRATION = node.Registration(torch.ops.san.san_mask.default, _setup_context, _backward)


def call(tensors: tuple[Tensor | None, ...], settings: tuple) -> tuple[Tensor, Tensor]:
    """`san_mask` as the modules call it (`san.kernels.node`): ``tensors`` = (y, reference, weight, bias), ``settings``
    the rest, ``conv_dtype`` included."""
    return node.call(_REGISTRATION, tensors, settings)


def _autocast_kernel(device_type: str):
    def kernel(y, reference, weight, bias, *settings):
        # As stepwise under autocast: the smoothing conv in autocast's dtype, the rest in y's; float64 is left alone.
        # ``settings``: padding … keep_smoothed, then conv_dtype unless the dispatcher left out its default.
        *settings, conv_dtype = settings if len(settings) == 8 else (*settings, None)
        if weight is not None and y.dtype != torch.float64:
            conv_dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return san_mask(y, reference, weight, bias, *settings, conv_dtype)

    return kernel


_library = torch.library.Library("san", "FRAGMENT")
for _device, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
    _library.impl("san_mask", _autocast_kernel(_device), _key)
