"""Fused fast paths of the attention modules: the same arithmetic as their step-by-step forward, in autograd
functions that keep their inputs and a few small maps (SAN's 1-byte extrema count, CBAM's 1-channel spatial mask)
for backward and recompute the full-size maps there.

Why: stepwise, every elementwise step of a mask saves a full-size float map for backward and pays one autograd
node of overhead; on the small maps of LeNet-5 and CIFAR-size nets that overhead, not arithmetic, was most of
an attention module's cost, and the saved maps were 2–4× the bare model's activation memory. The functions compute
what the reference formulation computes, some in a different order (``x + x·m`` for ``x·(1 + m)``), so outputs and
gradients are equal to float rounding (tests/test_attention_fused.py checks every switch against
`reference_formulation`; in bf16, that the fused paths are no farther from float64 than the reference).

Autocast: a function records the dtype autocast gave its convolution and recomputes with the same casts in
backward, where autocast is off.
"""

import contextlib
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from san.kernels import native

# Below this many channels, oneDNN's CPU conv backward runs several times faster channels-last (it pads NCHW
# channels into blocks of 16, so a 1- or 2-channel map costs a 16-channel one: bench/profile_attention.py layouts),
# and elementwise broadcasts several times faster in NCHW (`_nchw_on_cpu`).
SMALL_CHANNELS = 16


def small_map_layout(x: Tensor) -> Tensor:
    """``x`` in the layout where a CPU conv over its channels is fastest: channels-last below `SMALL_CHANNELS`."""
    if x.device.type != "cpu" or x.dim() != 4 or x.shape[1] >= SMALL_CHANNELS:
        return x
    if x.shape[1] == 1:  # contiguous() keeps a 1-channel map's NCHW strides, which oneDNN reads as NCHW
        batch, _, height, width = x.shape
        return x.reshape(batch, height, width, 1).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=torch.channels_last)


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps")


def _autocast_dtype(tensor: Tensor) -> torch.dtype | None:
    device = tensor.device.type
    if device not in _AUTOCAST_DEVICES or tensor.dtype == torch.float64:  # meta (FLOP counts); autocast skips fp64
        return None
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def _in_layout_of(tensor: Tensor, like: Tensor) -> Tensor:
    if tensor.stride() == like.stride():
        return tensor
    for layout in (torch.contiguous_format, torch.channels_last):
        if like.is_contiguous(memory_format=layout):
            return tensor.contiguous(memory_format=layout)
    return tensor


def _first_order(backward: Callable) -> Callable:
    """A backward that computes first-order gradients only: under ``create_graph=True`` (grad mode on in backward)
    it raises rather than return gradients that silently lack their second-order terms."""

    @functools.wraps(backward)
    def wrapper(ctx: FunctionCtx, *grads: Tensor):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the fused attention paths give first-order gradients only; for higher-order gradients "
                "(create_graph=True) run the model inside san.attention.reference_formulation()"
            )
        return backward(ctx, *grads)

    return wrapper


def _autocast_off(tensor: Tensor) -> contextlib.AbstractContextManager:
    device = tensor.device.type
    return torch.autocast(device, enabled=False) if device in _AUTOCAST_DEVICES else contextlib.nullcontext()


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


# --- conv → batch norm → activation chains that keep only their input for backward ---------------------------


def _batch_norm_settings(bn: nn.BatchNorm2d) -> tuple[bool, float, tuple[Tensor | None, Tensor | None]]:
    """What ``nn.BatchNorm2d.forward`` would use — batch statistics or running ones, the update factor and the
    buffers it passes — advancing ``num_batches_tracked`` as it does."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_buffers = not bn.training or bn.track_running_stats
    buffers = (bn.running_mean, bn.running_var) if keep_buffers else (None, None)
    return use_batch_stats, factor, buffers


class _Stage:
    """One conv (+ batch norm) (+ activation) of a chain: its settings, and its tensors — the module's at forward
    time, the ones autograd saved (version-checked) in backward."""

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, activation: str) -> None:
        if isinstance(conv.padding, str) or conv.stride != (1, 1) or conv.padding_mode != "zeros":
            raise ValueError("fused chains take stride-1 convs with numeric zero padding")
        self.activation = activation
        self.padding, self.dilation, self.groups = conv.padding, conv.dilation, conv.groups
        self.pointwise = conv.kernel_size == (1, 1) and conv.groups == 1 and conv.padding == (0, 0)
        self.weight, self.bias = conv.weight, conv.bias
        self.has_bn = bn is not None
        self.bn_weight = self.bn_bias = None
        self.use_batch_stats, self.momentum, self.running, self.eps = False, 0.0, (None, None), 0.0
        if bn is not None:
            self.bn_weight, self.bn_bias, self.eps = bn.weight, bn.bias, bn.eps
            self.use_batch_stats, self.momentum, self.running = _batch_norm_settings(bn)

    def params(self) -> list[Tensor | None]:
        return [self.weight, self.bias, self.bn_weight, self.bn_bias]

    def bind(self, params: list[Tensor | None]) -> None:
        self.weight, self.bias, self.bn_weight, self.bn_bias = params

    def forward(self, x: Tensor, dtype: torch.dtype | None, update: bool) -> tuple[Tensor, Tensor, tuple | None]:
        """(activation output, conv output, batch-norm statistics); running statistics move only if ``update``."""
        weight, bias = self.weight, self.bias
        if dtype is not None:
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if self.pointwise:
            conv_out = _pointwise_conv(x, weight, bias)
        elif native.applies(x, weight, self.groups):
            conv_out = native.conv2d(x, weight, bias, self.padding, self.dilation)
        else:
            # NCHW on CPU: a few-channel forward conv is faster so (0.13 vs 0.44 ms for BAM's 1→1 dilated 3×3)
            conv_in = x.contiguous() if x.device.type == "cpu" else x
            conv_out = F.conv2d(conv_in, weight, bias, padding=self.padding, dilation=self.dilation, groups=self.groups)
        return self.normalize(conv_out, update)

    def native_ok(self, x: Tensor, convolve: bool = True) -> bool:
        """Whether `native.stage_forward` takes this stage (or with ``convolve`` False its batch norm and activation
        only) over maps of ``x``'s dtype and device: few channels the C kernels take, an activation they have, a
        transposed padding that is not negative."""
        if self.activation not in native.ACTIVATIONS:
            return False
        if not convolve:  # only the batch norm and activation run, over the conv's output channels
            return native.applies(x, self.weight[:, :1], groups=1)
        weight = self.weight
        transposed = [d * (k - 1) - p for p, d, k in zip(self.padding, self.dilation, weight.shape[2:], strict=True)]
        return min(transposed) >= 0 and native.applies(x, weight, self.groups)

    def normalize(self, conv_out: Tensor, update: bool) -> tuple[Tensor, Tensor, tuple | None]:
        """`forward` from the conv's output: the batch norm, if any, and the activation."""
        if not self.has_bn:
            return ACTIVATION_FORWARD[self.activation](conv_out), conv_out, None
        running = self.running if update or not self.use_batch_stats else (None, None)
        normed, mean, invstd = torch.ops.aten.native_batch_norm(
            conv_out, self.bn_weight, self.bn_bias, *running, self.use_batch_stats, self.momentum, self.eps
        )
        return ACTIVATION_FORWARD[self.activation](normed), conv_out, (mean, invstd)

    def backward(
        self, grad: Tensor, x: Tensor, out: Tensor, conv_out: Tensor, stats: tuple | None, dtype: torch.dtype | None
    ) -> tuple[Tensor, list[Tensor | None]]:
        grad, bn_grads = self.normalize_backward(grad, out, conv_out, stats)
        weight = self.weight if dtype is None else self.weight.to(dtype)
        conv_input = x if dtype is None else x.to(dtype)
        grad = grad.to(conv_input.dtype)
        has_bias = self.bias is not None
        if self.pointwise:
            grad_x, grad_weight, grad_bias = _pointwise_conv_backward(grad, conv_input, weight, has_bias)
        else:
            grad_x, grad_weight, grad_bias = few_channel_conv_backward(
                grad, conv_input, weight, has_bias, self.padding, self.dilation, self.groups
            )
        grad_bias = grad_bias.to(self.bias.dtype) if has_bias else None
        return grad_x.to(x.dtype), [grad_weight.to(self.weight.dtype), grad_bias, *bn_grads]

    def normalize_backward(
        self, grad: Tensor, out: Tensor, conv_out: Tensor, stats: tuple | None
    ) -> tuple[Tensor, list[Tensor | None]]:
        """(∂ conv output, the batch norm's parameter gradients) from ∂ activation output: `normalize` backward."""
        grad = activation_backward(self.activation, grad, out)
        if not self.has_bn:
            return grad, [None, None]
        bn_weight, bn_bias = self.bn_weight, self.bn_bias
        grad, grad_bn_weight, grad_bn_bias = torch.ops.aten.native_batch_norm_backward(
            grad.to(conv_out.dtype),
            conv_out,
            bn_weight,
            *self.running,
            *stats,
            self.use_batch_stats,
            self.eps,
            [True, bn_weight is not None, bn_bias is not None],
        )
        return grad, [grad_bn_weight, grad_bn_bias]


def few_channel_conv_backward(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    has_bias: bool,
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(∂x, ∂weight, ∂bias) of a stride-1 conv, fastest for the few-channel convs of the attention branches.

    On CPU, oneDNN's backward of a conv over a 1- or 2-channel map costs several times its forward; ∂x is the
    forward conv of ``grad`` with the flipped, transposed kernel (NCHW: 0.10 ms vs 0.46 ms for the whole backward of
    BAM's 1→1 dilated 3×3 at 64×28×28), so only ∂weight goes through oneDNN, channels-last, where it is cheap
    (bench/profile_attention.py small-convs).
    """
    transposed_padding = [d * (k - 1) - p for p, d, k in zip(padding, dilation, weight.shape[2:], strict=True)]
    bias_sizes = [weight.shape[0]] if has_bias else None
    args = ([1, 1], list(padding), list(dilation), False, [0, 0], groups)
    if x.device.type != "cpu" or groups != 1 or min(transposed_padding) < 0 or x.shape[1] >= SMALL_CHANNELS:
        return torch.ops.aten.convolution_backward(
            small_map_layout(grad), small_map_layout(x), weight, bias_sizes, *args, [True, True, has_bias]
        )
    flipped = weight.flip(-1, -2).transpose(0, 1)
    if native.applies(x, weight, groups):
        grad_x = native.conv2d(grad, flipped, None, transposed_padding, dilation)
        grad_weight = native.conv2d_weight_grad(grad, x, weight, padding, dilation)
        return grad_x, grad_weight, grad.sum((0, 2, 3)) if has_bias else None
    _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        small_map_layout(grad), small_map_layout(x), weight, bias_sizes, *args, [False, True, has_bias]
    )
    grad_x = F.conv2d(grad.contiguous(), flipped, padding=transposed_padding, dilation=dilation)
    return grad_x, grad_weight, grad_bias


def _pointwise_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A 1x1 convolution as one matrix product in ``x``'s own layout: on CPU, 2–10× faster than oneDNN's 1x1 conv
    forward and backward when the output has few channels (BAM's reductions)."""
    batch, channels, height, width = x.shape
    matrix = weight.reshape(weight.shape[0], channels)
    if x.is_contiguous() or channels == 1:
        out = torch.matmul(matrix, x.reshape(batch, channels, height * width))
        if bias is not None:
            out = out + bias[:, None]
        return out.view(batch, -1, height, width)
    rows = x.permute(0, 2, 3, 1).reshape(-1, channels)  # a view when x is channels-last
    out = rows @ matrix.t() if bias is None else torch.addmm(bias, rows, matrix.t())
    return out.view(batch, height, width, -1).permute(0, 3, 1, 2)


def _pointwise_conv_backward(
    grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    matrix = weight.reshape(out_channels, channels)
    if x.is_contiguous() or channels == 1:
        inputs = x.reshape(batch, channels, height * width)
        grads = grad.reshape(batch, out_channels, height * width)
        grad_x = torch.matmul(matrix.t(), grads).view(batch, channels, height, width)
        grad_weight = torch.bmm(grads, inputs.transpose(1, 2)).sum(0)
        grad_bias = grads.sum((0, 2)) if has_bias else None
    else:
        inputs = x.permute(0, 2, 3, 1).reshape(-1, channels)
        grads = grad.permute(0, 2, 3, 1).reshape(-1, out_channels)
        grad_x = (grads @ matrix).view(batch, height, width, channels).permute(0, 3, 1, 2)
        grad_weight = grads.t() @ inputs
        grad_bias = grads.sum(0) if has_bias else None
    return grad_x, grad_weight.view_as(weight), grad_bias


def _run_chain(stages: list[_Stage], x: Tensor, dtype: torch.dtype | None, update: bool) -> list[tuple]:
    """Each stage's (input, activation output, conv output, batch-norm statistics), in order."""
    records, h = [], x
    for stage in stages:
        out, conv_out, stats = stage.forward(h, dtype, update=update)
        records.append((h, out, conv_out, stats))
        h = out
    return records


def _chain_backward(
    stages: list[_Stage], records: list[tuple], grad: Tensor, dtype: torch.dtype | None
) -> tuple[Tensor, list[Tensor | None]]:
    """(∂ chain input, every stage's parameter gradients in order) from the gradient of the chain's output."""
    param_grads: list[Tensor | None] = []
    for stage, (h_in, out, conv_out, stats) in zip(reversed(stages), reversed(records), strict=True):
        grad, grads = stage.backward(grad, h_in, out, conv_out, stats, dtype)
        param_grads = grads + param_grads
    return grad, param_grads


def _bind(stages: list[_Stage], params: list[Tensor]) -> None:
    for index, stage in enumerate(stages):
        stage.bind(params[4 * index : 4 * index + 4])


class _BAM(torch.autograd.Function):
    """BAM after its channel branch, as one node: the spatial branch's `_Stage`s give ``s`` (one logit per position),
    then ``x · (1 + σ(c ∘ s))`` with ``∘`` = + (``sum``) or × (``product``).

    It keeps ``x`` (which the layer before keeps anyway) and the channel logits ``c``, and recomputes the branch's
    small maps and the full-size mask in backward. On CPU it works on an NCHW copy of ``x`` (`_nchw_on_cpu`), made
    again in backward rather than kept, and returns the output and ``∂x`` in the layout ``x`` came in. In float32 on
    CPU `_BAMNative` runs instead.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, stages: list[_Stage], x: Tensor, channel: Tensor, product: bool, *params: Tensor):
        dtype = _autocast_dtype(x)
        with _autocast_off(x):
            flat = _nchw_on_cpu(x)
            spatial = _run_chain(stages, flat, dtype, update=True)[-1][1]
            mask = torch.sigmoid_(channel * spatial if product else channel + spatial)
            out = _in_layout_of(torch.addcmul(flat, flat, mask), x)
        ctx.stages, ctx.dtype, ctx.product = stages, dtype, product
        ctx.save_for_backward(x, channel, *params)
        return out

    @staticmethod
    @_first_order
    def backward(ctx: FunctionCtx, grad: Tensor):
        x, channel, *params = ctx.saved_tensors
        stages, dtype = ctx.stages, ctx.dtype
        _bind(stages, params)
        with _autocast_off(x), torch.no_grad():
            flat, grad = _nchw_on_cpu(x), _nchw_on_cpu(grad)
            records = _run_chain(stages, flat, dtype, update=False)
            spatial = records[-1][1]
            mask = torch.sigmoid_(channel * spatial if ctx.product else channel + spatial)
            grad_x = torch.addcmul(grad, grad, mask)
            grad_logits = torch.ops.aten.sigmoid_backward(grad.mul(flat), mask)
            grad_channel = sum_to(grad_logits * spatial if ctx.product else grad_logits, channel.shape)
            grad_spatial = sum_to(grad_logits * channel if ctx.product else grad_logits, spatial.shape)
            grad_branch, param_grads = _chain_backward(stages, records, grad_spatial.to(spatial.dtype), dtype)
            grad_x = _in_layout_of(grad_x.add_(grad_branch), x)
        return None, grad_x, grad_channel.to(channel.dtype), None, *param_grads


def _check_batch_statistics(values: int, shape: tuple[int, ...]) -> None:
    """Batch statistics need more than one value per channel: torch's batch norm refuses one, so do the C paths."""
    if values <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {shape}")


class _BAMPlan:
    """BAM in float32 on CPU as `native.bam_forward` and `native.bam_backward` take it: its sizes and settings (the
    channel MLP's and each spatial stage's batch norm; stage 0 is the first conv's batch norm and activation, that conv
    being made with the channel means), its running statistics, and its trainable tensors in `_BAMNative`'s order
    (the MLP's Linear, BatchNorm1d and Linear weights and biases, then each stage's `_Stage.params`)."""

    def __init__(self, x: Tensor, mlp: nn.Sequential, stages: list[_Stage], product: bool) -> None:
        _, first, bn, _, second = mlp
        batch_stats, factor, running = _batch_norm_settings(bn)
        self.trainable = [first.weight, first.bias, bn.weight, bn.bias, second.weight, second.bias]
        self.trainable += [p for stage in stages for p in stage.params()]
        self.running = [running, *(stage.running for stage in stages)]
        batch, channels, height, width = x.shape
        reduced = stages[0].weight.shape[0]
        if batch_stats:
            _check_batch_statistics(batch, (batch, first.weight.shape[0]))
        if any(stage.has_bn and stage.use_batch_stats for stage in stages):
            _check_batch_statistics(batch * height * width, (batch, reduced, height, width))
        parts = max(1, min(native.WEIGHT_GRAD_PARTS, batch))
        self.sizes = [
            batch,
            channels,
            height,
            width,
            reduced,
            first.weight.shape[0],
            int(batch_stats),
            int(product),
            len(stages),
            parts,
        ]
        self.scalars = [bn.eps, factor]
        in_channels = reduced
        for index, stage in enumerate(stages):
            out_channels = stage.weight.shape[0]
            if index == 0:  # made by native.c's reduce pass: the stage itself only normalizes
                kernel, padding, dilation, convolves = (1, 1), (0, 0), (1, 1), 0
            else:
                kernel, padding, dilation, convolves = tuple(stage.weight.shape[2:]), stage.padding, stage.dilation, 1
            flags = [convolves, int(stage.has_bn), int(stage.use_batch_stats), native.ACTIVATIONS[stage.activation]]
            self.sizes += [in_channels, height, width, out_channels, *kernel, *padding, *dilation, *flags]
            self.scalars += [stage.eps, stage.momentum]
            height, width = (
                size + 2 * pad - dil * (k - 1)
                for size, pad, dil, k in zip((height, width), padding, dilation, kernel, strict=True)
            )
            in_channels = out_channels

    def native_params(self, trainable: list[Tensor | None]) -> list[Tensor | None]:
        """``trainable`` (and the running statistics) in native.c's order: the first conv's weight and bias, the
        MLP's tensors, then per stage conv weight, bias, batch-norm weight, bias, running mean and variance (stage 0's
        conv being the first conv, its entries are empty)."""
        w1, b1, gamma, beta, w2, b2 = trainable[:6]
        stage_params = [trainable[6 + 4 * i : 10 + 4 * i] for i in range(len(self.running) - 1)]
        reduce_weight, reduce_bias = stage_params[0][:2]
        params = [
            reduce_weight.reshape(reduce_weight.shape[0], -1),
            reduce_bias,
            w1,
            b1,
            gamma,
            beta,
            *self.running[0],
            w2,
            b2,
        ]
        for index, (weight, bias, bn_weight, bn_bias) in enumerate(stage_params):
            conv = (None, None) if index == 0 else (weight, bias)
            params += [*conv, bn_weight, bn_bias, *self.running[index + 1]]
        return params

    def trainable_grads(self, grads: list[Tensor | None]) -> list[Tensor | None]:
        """The gradients native.c wrote (in `native_params`' order) in the order of ``trainable``."""
        ordered = [grads[2], grads[3], grads[4], grads[5], grads[8], grads[9]]
        for index in range(len(self.running) - 1):
            block = grads[10 + 6 * index : 14 + 6 * index]
            ordered += [grads[0].view(self.trainable[6].shape), grads[1], *block[2:]] if index == 0 else block
        return ordered


class _BAMNative(torch.autograd.Function):
    """All of BAM as one node in float32 on CPU, one C call each way (`native.bam_forward`, `native.bam_backward`):
    the channel means and the spatial branch's first 1x1 conv in one pass over ``x``, the channel MLP, the branch's
    few-channel stages, and ``x · (1 + σ(c ∘ s))`` (the mask never stored); backward recomputes the MLP and the
    branch, makes one pass for the logits' gradients and one that writes all of ``∂x``.

    It keeps ``x``, the channel means and the first conv's output (K of x's C channels).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, plan: _BAMPlan, x: Tensor, *trainable: Tensor):
        flat, layout = native.map_layout(x)
        out, reduced, mean = native.bam_forward(flat, layout, plan.sizes, plan.scalars, plan.native_params(trainable))
        ctx.plan = plan
        ctx.save_for_backward(x, reduced, mean, *trainable)
        return out

    @staticmethod
    @_first_order
    def backward(ctx: FunctionCtx, grad: Tensor):
        x, reduced, mean, *trainable = ctx.saved_tensors
        plan = ctx.plan
        flat, layout = native.map_layout(x)
        grad = grad.contiguous(memory_format=native.memory_format(layout))
        grad_x, grads = native.bam_backward(
            flat, grad, layout, plan.sizes, plan.scalars, plan.native_params(trainable), reduced, mean
        )
        return None, grad_x, *plan.trainable_grads(grads)


def _bam_native_takes(stages: list[_Stage], x: Tensor) -> bool:
    """Whether `_BAMNative` takes this branch over ``x``: a first 1x1 conv to few channels, then stages the kernels
    take (the first one's batch norm and activation only: native.c's reduce pass makes its conv)."""
    first = stages[0]
    return (
        first.pointwise
        and native.bam_applies(x, first.weight)
        and first.native_ok(x, convolve=False)
        and all(stage.native_ok(x) for stage in stages[1:])
    )


def bam(x: Tensor, mlp: nn.Sequential, body: list[nn.Module], product: bool) -> Tensor:
    """BAM's output from ``x``, its channel MLP (Flatten, Linear, BatchNorm1d, ReLU, Linear) and its spatial branch's
    layers (conv, batch norm, ReLU, ..., conv), as one autograd node: `_BAMNative` in float32 on CPU (the C kernels
    built), else the channel MLP as it runs and `_BAM`."""
    stages = [_Stage(*body[i : i + 2], "relu") for i in range(0, len(body) - 1, 3)] + [
        _Stage(body[-1], None, "identity")
    ]
    if _autocast_dtype(x) is None and _bam_native_takes(stages, x):
        plan = _BAMPlan(x, mlp, stages, product)
        return _BAMNative.apply(plan, x, *plan.trainable)
    params = [p for stage in stages for p in stage.params()]
    return _BAM.apply(stages, x, mlp(x.mean((2, 3)))[:, :, None, None], product, *params)


def _nchw_on_cpu(x: Tensor) -> Tensor:
    """``x`` in the layout where CPU broadcasts over its channels or positions are fast: NCHW below
    `SMALL_CHANNELS` channels, else as it is.

    Why: channels-last puts a small channel count innermost, so ``x · Mc`` (N×C×1×1), ``x · Ms`` (N×1×H×W) and
    max/mean over channels or positions run 5–15× slower than in NCHW (0.11–0.43 ms vs 0.02–0.03 ms on a
    64×6×28×28 map here), far more than a copy between the layouts costs (0.1 ms). From 16 channels on the
    inner loops vectorise in either layout, and the copy would only cost.
    """
    if x.device.type == "cpu" and x.dim() == 4 and x.shape[1] < SMALL_CHANNELS:
        return x.contiguous()
    return x
