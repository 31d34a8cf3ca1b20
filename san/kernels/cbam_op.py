"""CBAM's full-size passes as registered ops: the channel descriptors, the spatial branch's pooling and conv, the
output ``x · Mc · Ms``; the channel MLP, the spatial batch norm and the sigmoids stay torch's, between them.

Why ops: stepwise, ``x · Mc · Ms`` and the pools each keep full-size maps for backward and walk a few-channel map
once per autograd node, slowly in channels-last (the channel axis innermost and 6 wide). Each op here is one walk
over ``x`` each way in float32 on CPU (the C passes of `san.kernels.native`), torch's formulation elsewhere, and
keeps only ``x`` and the small maps. ``Mc`` is N×C, ``Ms`` N×1×H×W; either may be in a narrower dtype than ``x``
(autocast), as in the stepwise formulation, which promotes the products to ``x``'s.
"""

import torch
from torch import Tensor

from san.kernels import native
from san.kernels.conv_op import conv2d, conv2d_backward
from san.kernels.san_op import first_order, like


def _native(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and native.enabled() and native.library() is not None


def _expand(channel_mask: Tensor, x: Tensor) -> Tensor:
    return channel_mask.to(x.dtype)[:, :, None, None]


# --- the channel descriptors: mean and max over positions -----------------------------------------------------------


@torch.library.custom_op("san::cbam_descriptors", mutates_args=())
def descriptors(x: Tensor) -> tuple[Tensor, Tensor]:
    """(``mean_hw x``, ``max_hw x``), each N×C."""
    if _native(x):
        return native.cbam_descriptors(*native.map_layout(x))
    return x.mean((2, 3)), x.amax((2, 3))


@descriptors.register_fake
def _(x):
    return x.new_empty(x.shape[:2]), x.new_empty(x.shape[:2])


@torch.library.custom_op("san::cbam_descriptors_backward", mutates_args=())
def descriptors_backward(grad_avg: Tensor, grad_top: Tensor, x: Tensor, top: Tensor) -> Tensor:
    """∂x: ``grad_avg / HW`` everywhere plus ``grad_top`` shared among the positions reaching the max."""
    if _native(x):
        flat, layout = native.map_layout(x)
        return like(native.cbam_descriptors_backward(flat, layout, top, grad_avg, grad_top), x)
    is_top = (x == top[:, :, None, None]).to(x.dtype)
    share = grad_top / is_top.sum((2, 3))
    return like(is_top * share[:, :, None, None] + (grad_avg / (x.shape[2] * x.shape[3]))[:, :, None, None], x)


@descriptors_backward.register_fake
def _(grad_avg, grad_top, x, top):
    return torch.empty_like(x)


def _descriptors_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], output[1])


@first_order
def _descriptors_grad(ctx, grad_avg: Tensor, grad_top: Tensor):
    x, top = ctx.saved_tensors
    return descriptors_backward(grad_avg, grad_top, x, top)


descriptors.register_autograd(_descriptors_grad, setup_context=_descriptors_context)


# --- the spatial branch's conv over [max_c s; mean_c s] of s = x · Mc ---------------------------------------------


def _pool(x: Tensor, channel_mask: Tensor) -> Tensor:
    """``[max_c s; mean_c s]`` (N×2×H×W, NCHW) of ``s = x · Mc``."""
    if _native(x):
        flat, layout = native.map_layout(x)
        return native.cbam_pool(flat, layout, channel_mask.to(x.dtype))
    scaled = x * _expand(channel_mask, x)
    return torch.cat([scaled.amax(1, keepdim=True), scaled.mean(1, keepdim=True)], dim=1).contiguous()


def _pool_backward(grad: Tensor, x: Tensor, channel_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(∂x, ∂Mc) of `_pool`: with ``u`` the gradient reaching ``s`` (the max's shared among the channels reaching
    it, the mean's spread), ``∂x = u · Mc`` and ``∂Mc = Σ_hw u · x``."""
    if _native(x):
        flat, layout = native.map_layout(x)
        grad_x, grad_mask = native.cbam_pool_backward(flat, layout, channel_mask.to(x.dtype), grad.to(x.dtype))
    else:
        mask = _expand(channel_mask, x)
        scaled = x * mask
        is_max = (scaled == scaled.amax(1, keepdim=True)).to(x.dtype)
        grad = grad.to(x.dtype)
        u = is_max * (grad[:, :1] / is_max.sum(1, keepdim=True)) + grad[:, 1:] / x.shape[1]
        grad_x, grad_mask = u * mask, (u * x).sum((2, 3))
    return like(grad_x, x), grad_mask.to(channel_mask.dtype)


@torch.library.custom_op("san::cbam_spatial", mutates_args=())
def spatial(x: Tensor, channel_mask: Tensor, weight: Tensor, padding: int) -> Tensor:
    """Ms's logits before the batch norm: ``conv([max_c s; mean_c s])`` (N×1×H×W) of ``s = x · Mc``. Backward
    recomputes the pooled maps rather than keep them."""
    return conv2d(_pool(x, channel_mask).to(weight.dtype), weight, None, padding, 1)


@spatial.register_fake
def _(x, channel_mask, weight, padding):
    height, width = (x.shape[2 + i] + 2 * padding - (weight.shape[2 + i] - 1) for i in range(2))
    return x.new_empty(x.shape[0], weight.shape[0], height, width, dtype=weight.dtype)


@torch.library.custom_op("san::cbam_spatial_backward", mutates_args=())
def spatial_backward(
    grad: Tensor, x: Tensor, channel_mask: Tensor, weight: Tensor, padding: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(∂x, ∂Mc, ∂weight) of `spatial`."""
    pooled = _pool(x, channel_mask).to(weight.dtype)
    grad_pooled, grad_weight, _ = conv2d_backward(grad.to(weight.dtype), pooled, weight, False, padding, 1)
    grad_x, grad_mask = _pool_backward(grad_pooled, x, channel_mask)
    return grad_x, grad_mask, grad_weight


@spatial_backward.register_fake
def _(grad, x, channel_mask, weight, padding):
    return torch.empty_like(x), torch.empty_like(channel_mask), torch.empty_like(weight)


def _spatial_context(ctx, inputs, output) -> None:
    x, channel_mask, weight, ctx.padding = inputs
    ctx.save_for_backward(x, channel_mask, weight)


@first_order
def _spatial_grad(ctx, grad: Tensor):
    return *spatial_backward(grad, *ctx.saved_tensors, ctx.padding), None


spatial.register_autograd(_spatial_grad, setup_context=_spatial_context)


def _spatial_autocast(device_type: str):
    def kernel(x, channel_mask, weight, padding):
        # As stepwise under autocast: the conv in autocast's dtype (its input cast to it), the pools in x's.
        dtype = weight.dtype if x.dtype == torch.float64 else torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return spatial(x, channel_mask, weight.to(dtype), padding)

    return kernel


_library = torch.library.Library("san", "FRAGMENT")
for _device, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
    _library.impl("cbam_spatial", _spatial_autocast(_device), _key)


# --- the output: x · Mc · Ms -----------------------------------------------------------------------------------------


@torch.library.custom_op("san::cbam_apply", mutates_args=())
def apply(x: Tensor, channel_mask: Tensor, spatial_mask: Tensor) -> Tensor:
    """``x · Mc · Ms`` in ``x``'s layout and dtype."""
    if _native(x):
        flat, layout = native.map_layout(x)
        out = native.cbam_apply(flat, layout, channel_mask.to(x.dtype), spatial_mask.to(x.dtype))
        return like(out, x)
    return like(x * _expand(channel_mask, x) * spatial_mask.to(x.dtype), x)


@apply.register_fake
def _(x, channel_mask, spatial_mask):
    return torch.empty_like(x)


@torch.library.custom_op("san::cbam_apply_backward", mutates_args=())
def apply_backward(
    grad: Tensor, x: Tensor, channel_mask: Tensor, spatial_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(∂x = g · Mc · Ms, ∂Mc = Σ_hw g · Ms · x, ∂Ms = Σ_c g · x · Mc) of `apply`."""
    if _native(x):
        flat, layout = native.map_layout(x)
        grad = grad.to(x.dtype).contiguous(memory_format=native.memory_format(layout))
        grad_x, grad_channel, grad_spatial = native.cbam_apply_backward(
            flat, grad, layout, channel_mask.to(x.dtype), spatial_mask.to(x.dtype)
        )
    else:
        channel, spatial = _expand(channel_mask, x), spatial_mask.to(x.dtype)
        grad = grad.to(x.dtype)
        gated = grad * spatial
        grad_x, grad_channel = gated * channel, (gated * x).sum((2, 3))
        grad_spatial = (grad * x * channel).sum(1, keepdim=True)
    return like(grad_x, x), grad_channel.to(channel_mask.dtype), like(grad_spatial.to(spatial_mask.dtype), spatial_mask)


@apply_backward.register_fake
def _(grad, x, channel_mask, spatial_mask):
    return torch.empty_like(x), torch.empty_like(channel_mask), torch.empty_like(spatial_mask)


def _apply_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


@first_order
def _apply_grad(ctx, grad: Tensor):
    return apply_backward(grad, *ctx.saved_tensors)


apply.register_autograd(_apply_grad, setup_context=_apply_context)
