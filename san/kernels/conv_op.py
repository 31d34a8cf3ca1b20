"""A stride-1 conv over a few-channel map (CBAM's 2→1 7x7, BAM's dilated 3x3s) as the registered op
``san::few_channel_conv2d``.

Why: on CPU oneDNN pads the channels of an NCHW map into blocks of 16, so a 1- or 2-channel conv costs a 16-channel
one, and its backward several times its forward. In float32 on CPU with the kernels built and at most
`native.MAX_CHANNELS` channels each side, forward and ∂x (the forward conv of the gradient with the flipped kernel)
run on `san.kernels.native`'s conv and ∂weight on its weight-gradient pass; elsewhere torch's conv. The output is
NCHW. Under autocast it runs in autocast's dtype, as ``F.conv2d`` does.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from san.kernels import native
from san.kernels.san_op import first_order


def _native(x: Tensor, weight: Tensor, padding: int, dilation: int) -> bool:
    transposed = min(dilation * (k - 1) - padding for k in weight.shape[2:])
    return transposed >= 0 and native.applies(x, weight, groups=1)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int, dilation: int) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=padding, dilation=dilation)``, NCHW: the op's kernel, for other ops too."""
    if _native(x, weight, padding, dilation):
        return native.conv2d(x, weight, bias, (padding, padding), (dilation, dilation))
    return F.conv2d(x, weight, bias, padding=padding, dilation=dilation).contiguous()


@torch.library.custom_op("san::few_channel_conv2d", mutates_args=())
def few_channel_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int, dilation: int) -> Tensor:
    """`conv2d` as an op."""
    return conv2d(x, weight, bias, padding, dilation)


@few_channel_conv2d.register_fake
def _(x, weight, bias, padding, dilation):
    height, width = (x.shape[2 + i] + 2 * padding - dilation * (weight.shape[2 + i] - 1) for i in range(2))
    return x.new_empty(x.shape[0], weight.shape[0], height, width)


def conv2d_backward(
    grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool, padding: int, dilation: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(∂x, ∂weight, ∂bias — empty without a bias) of `conv2d`."""
    if _native(x, weight, padding, dilation):
        flipped = weight.flip(-1, -2).transpose(0, 1)
        transposed = [dilation * (k - 1) - padding for k in weight.shape[2:]]
        grad_x = native.conv2d(grad, flipped, None, transposed, (dilation, dilation))
        grad_weight = native.conv2d_weight_grad(grad, x, weight, (padding, padding), (dilation, dilation))
        grad_bias = grad.sum((0, 2, 3)) if has_bias else grad.new_empty(0)
        return grad_x.contiguous(memory_format=_format(x)), grad_weight, grad_bias
    grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad,
        x,
        weight,
        [weight.shape[0]] if has_bias else None,
        [1, 1],
        [padding] * 2,
        [dilation] * 2,
        False,
        [0, 0],
        1,
        [True, True, has_bias],
    )
    grad_x = grad_x.contiguous(memory_format=_format(x))
    return grad_x, grad_weight.contiguous(), grad.new_empty(0) if grad_bias is None else grad_bias


def _format(x: Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


@torch.library.custom_op("san::few_channel_conv2d_backward", mutates_args=())
def few_channel_conv2d_backward(
    grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool, padding: int, dilation: int
) -> tuple[Tensor, Tensor, Tensor]:
    """`conv2d_backward` as an op."""
    return conv2d_backward(grad, x, weight, has_bias, padding, dilation)


@few_channel_conv2d_backward.register_fake
def _(grad, x, weight, has_bias, padding, dilation):
    grad_bias = grad.new_empty(weight.shape[0] if has_bias else 0)
    return torch.empty_like(x), torch.empty_like(weight), grad_bias


def _context(ctx, inputs, output) -> None:
    x, weight, bias, padding, dilation = inputs
    ctx.settings = (bias is not None, padding, dilation)
    ctx.save_for_backward(x, weight)


@first_order
def _grad(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = few_channel_conv2d_backward(grad, x, weight, *ctx.settings)
    return grad_x, grad_weight, grad_bias if ctx.settings[0] else None, None, None


few_channel_conv2d.register_autograd(_grad, setup_context=_context)


def _autocast_kernel(device_type: str):
    def kernel(x, weight, bias, padding, dilation):
        dtype = x.dtype if x.dtype == torch.float64 else torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            bias = None if bias is None else bias.to(dtype)
            return few_channel_conv2d(x.to(dtype), weight.to(dtype), bias, padding, dilation)

    return kernel


_library = torch.library.Library("san", "FRAGMENT")
for _device, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
    _library.impl("few_channel_conv2d", _autocast_kernel(_device), _key)
