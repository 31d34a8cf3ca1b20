"""Capture every attention module's intermediate maps (DoC, extrema-weighted, smoothed, mask) for pictures."""

from functools import partial

import torch
from torch import Tensor, nn

from san.attention import attention_modules, reference_formulation


def _store(maps: dict[str, Tensor], name: str, _module: nn.Module, _inputs: object, output: Tensor) -> None:
    maps[name] = output.detach()


def _store_inputs(maps: dict[str, Tensor], _module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    maps["current"] = inputs[0].detach()
    if len(inputs) > 1:
        maps["previous"] = inputs[1].detach()


def capture_masks(model: nn.Module, x: Tensor, inputs: bool = False) -> dict[str, dict[str, Tensor]]:
    """Run ``model`` on ``x`` and return, per attention module path, its taps' maps in forward order.

    SAN gives ``doc``, ``extrema``, ``smoothed`` and ``mask`` (less whatever its ablation switches skip), CBAM
    ``channel_mask`` and ``mask``, BAM ``mask``. With ``inputs`` each module's inputs come first: ``current``
    (the unit's output Y_l, which the module refines) and, for SAN, ``previous`` (the unit's input Y_{l-1}) —
    the first two panels of the paper's Fig. 4. The forward runs in eval mode without gradients — so batch
    norm statistics stay untouched — and the model's own mode is restored; hooks are removed afterwards. It asks for
    the stepwise formulation (`reference_formulation`): the fused paths materialise none of these maps.
    """
    captured: dict[str, dict[str, Tensor]] = {}
    handles = []
    for path, module in attention_modules(model).items():
        maps = captured.setdefault(path, {})
        if inputs:
            handles.append(module.register_forward_pre_hook(partial(_store_inputs, maps)))
        for name, tap in module.taps().items():
            handles.append(tap.register_forward_hook(partial(_store, maps, name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), reference_formulation():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return captured
