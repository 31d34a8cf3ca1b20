"""Static figures of a model: parameters, attention parameters and modules, forward FLOPs."""

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from san.attention import attention_modules, reference_formulation
from san.registry import build_model


@dataclass(frozen=True)
class ModelStats:
    params: int
    attention_params: int
    attention_modules: int
    flops: int  # forward FLOPs of one input (convs and matmuls, 2 per multiply-add)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on a meta tensor of ``input_shape`` (the model must live on the meta device), counted
    on the attention modules' stepwise formulation: the counter sees torch's ops, not inside the registered ops."""
    with FlopCounterMode(display=False) as counter, torch.no_grad(), reference_formulation():
        model(torch.empty(input_shape, device="meta"))
    return counter.get_total_flops()


def model_stats(name: str, input_size: int, num_classes: int = 1000, **kwargs) -> ModelStats:
    """Figures of ``build_model(name, num_classes, **kwargs)`` for one ``input_size``-px image, or for a recurrent
    model one sequence of ``input_size`` steps.

    The model is built on the meta device, so even VGG at 224 px costs no memory and no arithmetic.
    """
    with torch.device("meta"):
        model = build_model(name, num_classes, **kwargs).eval()
    modules = attention_modules(model).values()
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d | nn.LSTM))
    shape = (1, input_size, first.input_size) if isinstance(first, nn.LSTM) else \
        (1, first.in_channels, input_size, input_size)  # fmt: skip
    return ModelStats(
        params=count_params(model),
        attention_params=sum(count_params(m) for m in modules),
        attention_modules=len(modules),
        flops=forward_flops(model, shape),
    )
