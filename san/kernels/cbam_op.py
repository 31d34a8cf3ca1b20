"""CBAM's fast path as one registered op, ``san::cbam`` (and its backward op): ``x · Mc · Ms`` from ``x`` and the
module's parameters, one autograd node.

Why one op: stepwise, ``x · Mc · Ms`` and the pools each keep full-size maps for backward and walk a few-channel map
once per autograd node, slowly in channels-last (the channel axis innermost and 6 wide); the spatial branch's
1-channel batch norm alone costs torch more than its conv. In float32 on CPU the op runs three C passes over ``x``
forward (descriptors with the channel MLP, pool, output) and the spatial stage conv → batch norm → σ as one C call
(`san.kernels.native`), three backward; elsewhere (float64, bf16, CUDA) torch's formulation, forward and backward.
The batch norm is functional: the op returns the moved running statistics and the module copies them into its
buffers (`register_autograd` takes no op that mutates its inputs).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from san.kernels import native, node
from san.kernels.conv_op import conv2d_backward
from san.kernels.san_op import first_order, like


def _native(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32 and native.enabled() and native.library() is not None


def _expand(channel_mask: Tensor, x: Tensor) -> Tensor:
    return channel_mask.to(x.dtype)[:, :, None, None]


def _pool(x: Tensor, channel_mask: Tensor) -> Tensor:
    """``[max_c s; mean_c s]`` (N×2×H×W, NCHW) of ``s = x · Mc``."""
    scaled = x * _expand(channel_mask, x)
    return torch.cat([scaled.amax(1, keepdim=True), scaled.mean(1, keepdim=True)], dim=1).contiguous()


def _pool_backward(grad: Tensor, x: Tensor, channel_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(∂x, ∂Mc) of `_pool`, torch's formulation: with ``u`` the gradient reaching ``s`` (the max's shared among the
    channels reaching it, the mean's spread), ``∂x = u · Mc`` and ``∂Mc = Σ_hw u · x``."""
    mask = _expand(channel_mask, x)
    scaled = x * mask
    is_max = (scaled == scaled.amax(1, keepdim=True)).to(x.dtype)
    u = is_max * (grad[:, :1] / is_max.sum(1, keepdim=True)) + grad[:, 1:] / x.shape[1]
    return u * mask, (u * x).sum((2, 3))


def _descriptors_backward(x: Tensor, top: Tensor, grad_avg: Tensor, grad_top: Tensor) -> Tensor:
    """∂x of the descriptors: ``grad_avg / HW`` everywhere plus ``grad_top`` shared among the positions reaching the
    max."""
    is_top = (x == top[:, :, None, None]).to(x.dtype)
    share = grad_top / is_top.sum((2, 3))
    return is_top * share[:, :, None, None] + (grad_avg / (x.shape[2] * x.shape[3]))[:, :, None, None]


def _apply_backward(grad: Tensor, x: Tensor, channel_mask: Tensor, spatial_mask: Tensor) -> tuple[Tensor, ...]:
    """(∂x = g · Mc · Ms, ∂Mc = Σ_hw g · Ms · x, ∂Ms = Σ_c g · x · Mc) of ``x · Mc · Ms``."""
    gated = grad * spatial_mask
    grad_x, grad_channel = gated * _expand(channel_mask, x), (gated * x).sum((2, 3))
    return grad_x, grad_channel, (grad * x * _expand(channel_mask, x)).sum(1, keepdim=True)


def _stage_backward(grad, pooled, spatial_mask, conv_out, mean, invstd, weight, padding, gamma, training):
    """(∂pooled, ∂conv weight, ∂bn weight, ∂bn bias) of σ(bn(conv(pooled)))."""
    grad = grad * spatial_mask * (1 - spatial_mask)
    normed = (conv_out - mean[None, :, None, None]) * invstd[None, :, None, None]
    grad_gamma, grad_beta = (grad * normed).sum((0, 2, 3)), grad.sum((0, 2, 3))
    if training:
        count = conv_out.numel() // conv_out.shape[1]
        grad = grad - (grad_beta[None, :, None, None] + normed * grad_gamma[None, :, None, None]) / count
    grad_conv = grad * (gamma * invstd)[None, :, None, None]
    grad_pooled, grad_weight, _ = conv2d_backward(grad_conv, pooled, weight, False, padding, 1)
    return grad_pooled, grad_weight, grad_gamma, grad_beta


def _mlp(descriptors: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    """(hidden, Mc) of the shared MLP over the stacked descriptors [mean; max] (2N×C)."""
    hidden = torch.relu(F.linear(descriptors, w1.flatten(1), b1))
    logits = F.linear(hidden, w2.flatten(1), b2)
    batch = descriptors.shape[0] // 2
    return hidden, torch.sigmoid(logits[:batch] + logits[batch:])


def _forward(
    x, w1, b1, w2, b2, conv_weight, bn_weight, bn_bias, running_mean, running_var, padding, training, momentum, eps
):
    """`cbam` in torch's formulation (float64, bf16, CUDA, or without the C kernels)."""
    descriptors = torch.cat([x.mean((2, 3)), x.amax((2, 3))])
    hidden, channel_mask = _mlp(descriptors, w1, b1, w2, b2)
    conv_out = F.conv2d(_pool(x, channel_mask), conv_weight, padding=padding).contiguous()
    if training:
        var, mean = torch.var_mean(conv_out, (0, 2, 3), correction=0)
        count = conv_out.numel() // conv_out.shape[1]
        running_mean = running_mean * (1 - momentum) + mean * momentum
        running_var = running_var * (1 - momentum) + var * (count / max(count - 1, 1)) * momentum
    else:
        mean, var = running_mean, running_var
        running_mean, running_var = running_mean.clone(), running_var.clone()
    invstd = torch.rsqrt(var + eps)
    scale = (bn_weight * invstd)[None, :, None, None]
    spatial_mask = torch.sigmoid((conv_out - mean[None, :, None, None]) * scale + bn_bias[None, :, None, None])
    out = like(x * _expand(channel_mask, x) * spatial_mask, x)
    saved = descriptors, hidden, channel_mask, spatial_mask, conv_out, mean.clone(), invstd
    return out, running_mean, running_var, *saved


@torch.library.custom_op("san::cbam", mutates_args=())
def cbam(
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    conv_weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    padding: int,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(``x · Mc · Ms``, new running mean, new running var; then what backward keeps: descriptors, hidden, Mc, Ms,
    conv output, mean, invstd). ``w1``/``w2``: the MLP's 1x1 conv weights; with ``training`` the batch
    norm uses batch statistics and the running ones move by ``momentum`` (unbiased variance), else it uses them."""
    if _native(x):
        flat, layout = native.map_layout(x)
        descriptors, hidden, channel_mask = native.cbam_channel(flat, layout, w1, b1, w2, b2)
        pooled = native.cbam_pool(flat, layout, channel_mask)
        running = running_mean.clone(), running_var.clone()
        norm = (bn_weight, bn_bias, *running)
        spatial_mask, conv_out, mean, invstd = native.cbam_stage_forward(
            pooled, conv_weight, padding, norm, training, momentum, eps
        )
        out = like(native.cbam_apply(flat, layout, channel_mask, spatial_mask), x)
        return out, *running, descriptors, hidden, channel_mask, spatial_mask, conv_out, mean, invstd
    return _forward(
        x, w1, b1, w2, b2, conv_weight, bn_weight, bn_bias, running_mean, running_var, padding, training, momentum, eps
    )


@cbam.register_fake
def _(x, w1, b1, w2, b2, conv_weight, bn_weight, bn_bias, running_mean, running_var, padding, training, momentum, eps):
    height, width = (x.shape[2 + i] + 2 * padding - (conv_weight.shape[2 + i] - 1) for i in range(2))
    batch, channels = x.shape[:2]
    stat = running_mean.new_empty(running_mean.shape)
    return (
        torch.empty_like(x),
        stat,
        running_var.new_empty(running_var.shape),
        x.new_empty(2 * batch, channels),
        x.new_empty(2 * batch, w1.shape[0]),
        x.new_empty(batch, channels),
        x.new_empty(batch, conv_weight.shape[0], height, width),
        x.new_empty(batch, conv_weight.shape[0], height, width),
        x.new_empty(conv_weight.shape[0]),
        x.new_empty(conv_weight.shape[0]),
    )


@torch.library.custom_op("san::cbam_backward", mutates_args=())
def cbam_backward(
    grad: Tensor,
    x: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    conv_weight: Tensor,
    bn_weight: Tensor,
    descriptors: Tensor,
    hidden: Tensor,
    channel_mask: Tensor,
    spatial_mask: Tensor,
    conv_out: Tensor,
    mean: Tensor,
    invstd: Tensor,
    padding: int,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(∂x, ∂w1, ∂b1, ∂w2, ∂b2, ∂conv weight, ∂bn weight, ∂bn bias) of `cbam`'s output."""
    if _native(x):
        flat, layout = native.map_layout(x)
        grad = grad.contiguous(memory_format=native.memory_format(layout))
        masks = channel_mask, spatial_mask
        pooled, grad_spatial = native.cbam_backward_spatial(flat, grad, layout, channel_mask)
        grad_pooled, grad_conv, grad_gamma, grad_beta = native.cbam_stage_backward(
            grad_spatial, pooled, spatial_mask, conv_out, (mean, invstd), conv_weight, padding, bn_weight, training
        )
        grad_avg, top_share, mlp_grads = native.cbam_backward_mask(
            flat, grad, layout, masks, grad_pooled, descriptors, hidden, w1, w2
        )
        grad_x = native.cbam_backward_input(flat, grad, layout, masks, grad_pooled, descriptors, grad_avg, top_share)
        grad_w1, grad_b1, grad_w2, grad_b2 = mlp_grads
        return (
            like(grad_x, x),
            grad_w1.view_as(w1),
            grad_b1,
            grad_w2.view_as(w2),
            grad_b2,
            grad_conv,
            grad_gamma,
            grad_beta,
        )
    grad_x, grad_mask, grad_spatial = _apply_backward(grad.to(x.dtype), x, channel_mask, spatial_mask)
    pooled = _pool(x, channel_mask)
    grad_pooled, grad_conv, grad_gamma, grad_beta = _stage_backward(
        grad_spatial, pooled, spatial_mask, conv_out, mean, invstd, conv_weight, padding, bn_weight, training
    )
    grad_x_pool, grad_mask_pool = _pool_backward(grad_pooled, x, channel_mask)
    grad_x += grad_x_pool
    grad_logits = (grad_mask + grad_mask_pool) * channel_mask * (1 - channel_mask)
    both = torch.cat([grad_logits, grad_logits])  # the MLP runs on [mean; max]: the same ∂logits reach both
    grad_hidden = (both @ w2.flatten(1)) * (hidden > 0)
    grad_descriptors = grad_hidden @ w1.flatten(1)
    batch = x.shape[0]
    grad_x += _descriptors_backward(x, descriptors[batch:], grad_descriptors[:batch], grad_descriptors[batch:])
    grad_w1, grad_b1 = (grad_hidden.T @ descriptors).view_as(w1), grad_hidden.sum(0)
    grad_w2, grad_b2 = (both.T @ hidden).view_as(w2), 2 * grad_logits.sum(0)
    return like(grad_x, x), grad_w1, grad_b1, grad_w2, grad_b2, grad_conv, grad_gamma, grad_beta


@cbam_backward.register_fake
def _(grad, x, w1, b1, w2, b2, conv_weight, bn_weight, *saved_and_settings):
    return tuple(torch.empty_like(t) for t in (x, w1, b1, w2, b2, conv_weight, bn_weight, bn_weight))


def _context(ctx, inputs, output) -> None:
    ctx.settings = inputs[10], inputs[11]  # padding, training
    ctx.save_for_backward(*inputs[:7], *output[3:])
    ctx.mark_non_differentiable(*output[1:])  # the running statistics and what backward keeps
    ctx.set_materialize_grads(False)  # so no zeros are made for them


@first_order
def _grad(ctx, grad: Tensor, *unused: Tensor):
    grads = torch.ops.san.cbam_backward.default(grad, *ctx.saved_tensors, *ctx.settings)
    return *grads, None, None, None, None, None, None


cbam.register_autograd(_grad, setup_context=_context)
_REGISTRATION = node.Registration(torch.ops.san.cbam.default, _context, _grad)


def call(tensors: tuple[Tensor, ...], settings: tuple) -> tuple[Tensor, ...]:
    """`cbam` as the modules call it (`san.kernels.node`): ``tensors`` its first ten arguments, ``settings`` the
    rest."""
    return node.call(_REGISTRATION, tensors, settings)


def _autocast(device_type: str):
    def kernel(x, *args):
        # The op in the wider of x's and the parameters' dtypes (float32 under autocast: more precise than
        # autocast's, not less), its output in x's, as the stepwise formulation's.
        dtype = torch.promote_types(x.dtype, args[0].dtype)
        tensors = [t.to(dtype) for t in args[:9]]
        with torch.autocast(device_type, enabled=False):
            out, *rest = cbam(x.to(dtype), *tensors, *args[9:])
        return out.to(x.dtype), *rest

    return kernel


_library = torch.library.Library("san", "FRAGMENT")
for _device, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
    _library.impl("cbam", _autocast(_device), _key)
