"""BAM's fast path as one registered op, ``san::bam`` (and its backward op): ``x · (1 + σ(Mc ∘ Ms))`` from ``x`` and
the module's parameters, one autograd node that keeps ``x``, the channel means and the first 1x1 conv's output.

Why one op: stepwise, the spatial branch's few-channel maps each pay an autograd node and a full-size saved map, and
oneDNN pads their convs to 16 channels. In float32 on CPU the op is one C call each way (`san.kernels.native`: the
channel means and the first 1x1 conv in one pass over ``x``, the MLP, the branch's stages, the output; backward
recomputes the branch); elsewhere (float64, bf16, CUDA, wide branches) torch's formulation, forward and backward.

The arguments, in the module's order: ``params`` = the MLP's Linear, BatchNorm1d and Linear weights and biases, then
per spatial stage its conv weight and bias and, but for the last stage, its batch norm's weight and bias; ``running``
= each batch norm's running mean and variance as the rows of one tensor (the MLP's first; all have the branch's
width); ``batch_stats``/``momentum``/``eps`` per batch norm.
The batch norms are functional: the op returns the moved running statistics and the module copies them.
"""

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from san.kernels import native, node
from san.kernels.san_op import first_order, like

_RELU = native.ACTIVATIONS["relu"]
_IDENTITY = native.ACTIVATIONS["identity"]


def _stages(params: list[Tensor]) -> list[list[Tensor]]:
    """The spatial branch's stages' tensors: [conv weight, conv bias, bn weight, bn bias], the last [weight, bias]."""
    spatial = params[6:]
    return [spatial[i : i + 4] for i in range(0, len(spatial) - 2, 4)] + [spatial[-2:]]


def _padding(index: int, kernel_size: int, dilation: int) -> int:
    """A stage's padding: the dilated 3x3 convs keep the map's size; the 1x1 convs need none."""
    return dilation if kernel_size == 3 and index > 0 else 0


def _batch_norm(h, weight, bias, running, index, batch_stats, momentum, eps):
    """(normalized, mean, invstd) of batch norm ``index``; its running statistics in ``running`` (None: none) move in
    place."""
    mean, var = running[2 * index], running[2 * index + 1]
    use_batch = batch_stats[index]
    return torch.ops.aten.native_batch_norm(h, weight, bias, mean, var, use_batch, momentum[index], eps[index])


def _records(x, params, running, dilation, batch_stats, momentum, eps, product):
    """Torch's formulation, keeping what its backward needs: (output, [hidden, normed, relu'd] of the MLP with the
    MLP's batch-norm statistics, each stage's (input, conv out, statistics, output), channel logits, spatial
    logits, mask)."""
    w1, b1, gamma, beta, w2, b2 = params[:6]
    means = x.mean((2, 3))
    hidden = F.linear(means, w1, b1)
    normed, *mlp_stats = _batch_norm(hidden, gamma, beta, running, 0, batch_stats, momentum, eps)
    activated = torch.relu(normed)
    channel = F.linear(activated, w2, b2)[:, :, None, None]
    stages, h = [], x
    for index, stage in enumerate(_stages(params)):
        conv_out = F.conv2d(
            h, stage[0], stage[1], padding=_padding(index, stage[0].shape[-1], dilation), dilation=dilation
        )
        if len(stage) == 2:
            stages.append((h, conv_out, None, conv_out))
            h = conv_out
            continue
        bn_out, *stats = _batch_norm(conv_out, stage[2], stage[3], running, index + 1, batch_stats, momentum, eps)
        out = torch.relu(bn_out)
        stages.append((h, conv_out, stats, out))
        h = out
    mask = torch.sigmoid(channel * h if product else channel + h)
    return torch.addcmul(x, x, mask), (means, hidden, mlp_stats, activated), stages, channel, h, mask


@functools.lru_cache(maxsize=256)
def _native_layout(
    shape: torch.Size,
    hidden: int,
    weights: tuple,
    dilation: int,
    batch_stats: tuple,
    momentum: tuple,
    eps: tuple,
    product: bool,
) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
    """(sizes, scalars) as native.c's san_bam_forward/backward take them for ``x`` of ``shape``, the MLP's width
    ``hidden`` and the stages' conv weight shapes ``weights`` (the first 1x1 conv's first), or None where the C passes
    do not take the branch (wider than `native.MAX_CHANNELS`, or a kernel other than 1x1/3x3). Stage 0 is the first
    1x1 conv's batch norm and ReLU (the conv itself made in the pass that takes the channel means), the last stage
    identity. Cached (tuples, so no caller changes them): a module asks for the same layout every step."""
    limit = native.MAX_CHANNELS
    if weights[0][0] > limit or any(w[0] > limit or w[1] > limit or w[-1] not in (1, 3) for w in weights[1:]):
        return None
    batch, channels, height, width = shape
    reduced = weights[0][0]
    sizes = [batch, channels, height, width, reduced, hidden, int(batch_stats[0]), int(product), len(weights)]
    sizes.append(max(1, min(native.WEIGHT_GRAD_PARTS, batch)))
    scalars = [eps[0], momentum[0]]
    in_channels = reduced
    for index, weight in enumerate(weights):
        has_bn = index < len(weights) - 1
        if index == 0:  # made by the reduce pass: the stage itself only normalizes
            kernel, padding, dilations, convolves = (1, 1), 0, 1, 0
        else:
            kernel, padding, convolves = tuple(weight[2:]), _padding(index, weight[-1], dilation), 1
            dilations = dilation if kernel != (1, 1) else 1
        use_batch = int(has_bn and batch_stats[index + 1])
        flags = [convolves, int(has_bn), use_batch, _RELU if has_bn else _IDENTITY]
        sizes += [in_channels, height, width, weight[0], *kernel, padding, padding, dilations, dilations, *flags]
        scalars += [eps[index + 1], momentum[index + 1]] if has_bn else [0.0, 0.0]
        height, width = (
            size + 2 * padding - dilations * (k - 1) for size, k in zip((height, width), kernel, strict=True)
        )
        in_channels = weight[0]
    return tuple(sizes), tuple(scalars)


def _native_call(x: Tensor, params, running, dilation, batch_stats, momentum, eps, product) -> tuple | None:
    """(sizes, scalars, tensors) for native.c's san_bam_forward/backward, or None where the C passes do not run:
    other than float32 on CPU, the kernels not built, or a branch `_native_layout` refuses."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4 or not native.enabled():
        return None
    if native.library() is None or any(p.dtype != torch.float32 for p in params):
        return None
    stages = _stages(params)
    weights = tuple(tuple(stage[0].shape) for stage in stages)
    layout = _native_layout(
        x.shape, params[0].shape[0], weights, dilation, tuple(batch_stats), tuple(momentum), tuple(eps), product
    )
    if layout is None:
        return None
    rows = running.unbind()  # one call: indexing a tensor row by row costs each time
    w1, b1, gamma, beta, w2, b2 = params[:6]
    reduce_weight, reduce_bias = stages[0][:2]
    tensors = [reduce_weight.reshape(reduce_weight.shape[0], -1), reduce_bias, w1, b1, gamma, beta, *rows[:2], w2, b2]
    for index, stage in enumerate(stages):
        conv = (None, None) if index == 0 else stage[:2]
        norm = (*stage[2:], *rows[2 * index + 2 : 2 * index + 4]) if len(stage) == 4 else (None,) * 4
        tensors += [*conv, *norm]
    return *layout, tensors


@torch.library.custom_op("san::bam", mutates_args=())
def bam(
    x: Tensor,
    params: list[Tensor],
    running: Tensor,
    dilation: int,
    batch_stats: list[bool],
    momentum: list[float],
    eps: list[float],
    product: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(``x · (1 + σ(Mc ∘ Ms))``, the first 1x1 conv's output and the channel means (what backward keeps), the moved
    running statistics); ``∘`` = × with ``product``, else +."""
    running = running.clone()  # its rows move in place below
    call = _native_call(x, params, running, dilation, batch_stats, momentum, eps, product)
    if call is not None:
        flat, layout = native.map_layout(x)
        out, reduced, means = native.bam_forward(flat, layout, *call)
        return like(out, x), reduced, means, running
    out, (means, *_), stages, *_ = _records(x, params, running, dilation, batch_stats, momentum, eps, product)
    return like(out, x), stages[0][1].contiguous(), means, running


@bam.register_fake
def _(x, params, running, dilation, batch_stats, momentum, eps, product):
    batch, channels, height, width = x.shape
    reduced = x.new_empty(batch, params[6].shape[0], height, width)
    return torch.empty_like(x), reduced, x.new_empty(batch, channels), torch.empty_like(running)


def _linear_backward(grad: Tensor, inputs: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return grad @ weight, grad.T @ inputs, grad.sum(0)


def _torch_backward(grad, x, params, running, dilation, batch_stats, eps, product) -> list[Tensor]:
    """`bam`'s gradients in torch's formulation: the forward again (running statistics left alone), then each step's
    backward rule."""
    momentum = [0.0] * len(eps)
    # Batch statistics again, the running ones untouched (they are only read in eval).
    frozen = [None if batch_stats[i // 2] else row for i, row in enumerate(running)]
    _, mlp, stages, channel, spatial, mask = _records(x, params, frozen, dilation, batch_stats, momentum, eps, product)
    grad_x = torch.addcmul(grad, grad, mask)
    grad_logits = torch.ops.aten.sigmoid_backward(grad * x, mask)
    grad_channel = (grad_logits * spatial if product else grad_logits).sum((2, 3))
    grad_h = (grad_logits * channel if product else grad_logits).sum(1, keepdim=True)
    stage_grads: list[Tensor] = []
    for index in reversed(range(len(stages))):
        h_in, conv_out, stats, out = stages[index]
        weight, _, *norm = _stages(params)[index]
        if stats is not None:
            bn_weight = norm[0]
            grad_h = torch.ops.aten.threshold_backward(grad_h, out, 0)
            mean, var = frozen[2 * index + 2], frozen[2 * index + 3]
            grad_h, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
                grad_h, conv_out, bn_weight, mean, var, *stats, batch_stats[index + 1], eps[index + 1], [True] * 3
            )
        padding = _padding(index, weight.shape[-1], dilation)
        grad_h, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_h, h_in, weight, [weight.shape[0]], [1, 1], [padding] * 2, [dilation] * 2, False, [0, 0], 1, [True] * 3
        )
        stage_grads = [grad_weight, grad_bias, *([grad_gamma, grad_beta] if stats is not None else []), *stage_grads]
    means, hidden, mlp_stats, activated = mlp
    w1, _, gamma, _, w2, _ = params[:6]
    grad_activated, grad_w2, grad_b2 = _linear_backward(grad_channel, activated, w2)
    grad_normed = torch.ops.aten.threshold_backward(grad_activated, activated, 0)
    grad_hidden, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
        grad_normed, hidden, gamma, frozen[0], frozen[1], *mlp_stats, batch_stats[0], eps[0], [True] * 3
    )
    grad_means, grad_w1, grad_b1 = _linear_backward(grad_hidden, means, w1)
    grad_x = grad_x + grad_h + (grad_means / (x.shape[2] * x.shape[3]))[:, :, None, None]
    grads = [grad_w1, grad_b1, grad_gamma, grad_beta, grad_w2, grad_b2, *stage_grads]
    return [like(grad_x, x), *(like(grad, param) for grad, param in zip(grads, params, strict=True))]


@torch.library.custom_op("san::bam_backward", mutates_args=())
def bam_backward(
    grad: Tensor,
    x: Tensor,
    params: list[Tensor],
    running: Tensor,
    reduced: Tensor,
    means: Tensor,
    dilation: int,
    batch_stats: list[bool],
    eps: list[float],
    product: bool,
) -> list[Tensor]:
    """[∂x, then the gradient of each of ``params``] of `bam`'s output; ``running``: the statistics `bam` returned."""
    call = _native_call(x, params, running, dilation, batch_stats, [0.0] * len(eps), eps, product)
    if call is None:
        return _torch_backward(grad.to(x.dtype), x, params, running, dilation, batch_stats, eps, product)
    flat, layout = native.map_layout(x)
    grad = grad.contiguous(memory_format=native.memory_format(layout))
    grad_x, grads = native.bam_backward(flat, grad, layout, *call[:2], call[2], reduced, means)
    # Back from native.c's order (the first conv's weight and bias first, running statistics' entries empty).
    ordered = [grads[2], grads[3], grads[4], grads[5], grads[8], grads[9]]
    for index in range(len(_stages(params))):
        block = grads[10 + 6 * index : 14 + 6 * index]
        first = [grads[0].view(params[6].shape), grads[1], *block[2:]]
        ordered += [t for t in (first if index == 0 else block) if t is not None]
    return [like(grad_x, x), *ordered]


@bam_backward.register_fake
def _(grad, x, params, running, reduced, means, dilation, batch_stats, eps, product):
    return [torch.empty_like(x), *(torch.empty_like(t) for t in params)]


def _context(ctx, inputs, output) -> None:
    x, params, _, dilation, batch_stats, _, eps, product = inputs
    ctx.settings = dilation, batch_stats, eps, product
    ctx.save_for_backward(x, *output[1:], *params)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


@first_order
def _grad(ctx, grad: Tensor, *unused: Tensor):
    x, reduced, means, running, *params = ctx.saved_tensors
    grad_x, *grad_params = torch.ops.san.bam_backward.default(grad, x, params, running, reduced, means, *ctx.settings)
    return grad_x, grad_params, None, None, None, None, None, None


bam.register_autograd(_grad, setup_context=_context)


def _tensors_to_inputs(tensors: tuple, settings: tuple) -> tuple:
    x, running, *params = tensors
    return x, params, running, *settings


def _grads_of_tensors(grads: tuple, count: int) -> tuple:
    grad_x, grad_params, *_ = grads
    return grad_x, None, *grad_params


_REGISTRATION = node.Registration(torch.ops.san.bam.default, _context, _grad, _tensors_to_inputs, _grads_of_tensors)


def call(x: Tensor, params: list[Tensor], running: Tensor, *settings) -> tuple[Tensor, ...]:
    """`bam` as the modules call it (`san.kernels.node`)."""
    return node.call(_REGISTRATION, (x, running, *params), settings)


def _autocast(device_type: str):
    def kernel(x, params, running, *settings):
        # As `san.kernels.cbam_op`: the op in the wider of x's and the parameters' dtypes, its output in x's.
        dtype = torch.promote_types(x.dtype, params[0].dtype)
        with torch.autocast(device_type, enabled=False):
            out, *rest = bam(x.to(dtype), [t.to(dtype) for t in params], running.to(dtype), *settings)
        return out.to(x.dtype), *rest

    return kernel


_library = torch.library.Library("san", "FRAGMENT")
for _device, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
    _library.impl("bam", _autocast(_device), _key)
