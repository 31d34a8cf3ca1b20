"""How the modules call a registered op: in eager mode, the op's kernels and the backward registered for it under one
plain autograd node; traced (``torch.compile``, ``torch.export``), the op itself.

Why: for every custom op torch builds its autograd wrapper in Python, and on each call it fills in the op's defaults
(walking the schema once per argument) and flattens and rebuilds any list argument — about 0.1 ms a call, which on
LeNet-5's small maps cost BAM 11–15 % of a training step (bench/attention_overhead.py; docs/decisions/0001). The
node runs the very ``setup_context`` and ``backward`` the op registers, so the two ways in cannot compute differently.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


def _in_order(tensors: tuple, settings: tuple) -> tuple:
    return (*tensors, *settings)


def _first(grads: tuple, count: int) -> tuple:
    return grads[:count]


@dataclass(frozen=True)
class Registration:
    """A registered op as `call` runs it: the overload, what its ``register_autograd`` got, and — for an op whose
    inputs are not its tensors followed by its settings — how to arrange them and how to give back their gradients."""

    op: torch._ops.OpOverload
    setup_context: Callable
    backward: Callable
    inputs: Callable[[tuple, tuple], tuple] = _in_order
    tensor_grads: Callable[[tuple, int], tuple] = _first

    def __post_init__(self) -> None:
        # One autograd node class per op, so a graph names the op it holds (e.g. ``BamOpBackward``).
        name = "".join(part.title() for part in self.op._opname.split("_")) + "Op"
        object.__setattr__(self, "node", type(name, (_Node,), {}))


class _Node(torch.autograd.Function):
    @staticmethod
    def forward(ctx, registration: Registration, settings: tuple, *tensors: Tensor | None):
        inputs = registration.inputs(tensors, settings)
        with torch._C._AutoDispatchBelowAutograd():  # the node is the autograd: straight to the op's kernels
            output = registration.op(*inputs)
        registration.setup_context(ctx, inputs, output)
        ctx.registration, ctx.count = registration, len(tensors)
        return output

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        ctx.needs_input_grad = ctx.needs_input_grad[2:]  # the op's own view: its tensors, as register_autograd's
        with torch._C._AutoDispatchBelowAutograd():
            grads_in = ctx.registration.backward(ctx, *grads)
        return None, None, *ctx.registration.tensor_grads(grads_in, ctx.count)


def call(registration: Registration, tensors: tuple, settings: tuple):
    """The op's output for ``tensors`` (what autograd tracks) and ``settings`` (the rest of its arguments).

    Traced, or under autocast (whose kernel casts the inputs before the op's autograd sees them), through the op's
    own registrations; else through the node."""
    if torch.compiler.is_compiling() or torch._C._is_any_autocast_enabled():
        return registration.op(*registration.inputs(tensors, settings))
    return registration.node.apply(registration, settings, *tensors)
