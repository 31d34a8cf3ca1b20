"""Capture every attention module's intermediate maps (DoC, extrema-weighted, smoothed, mask) for pictures."""

from functools import partial

import torch
from torch import Tensor, nn

from san.attention import attention_modules


def _store(maps: dict[str, Tensor], name: str, _module: nn.Module, _inputs: object, output: Tensor) -> None:
    maps[name] = output.detach()


def capture_masks(model: nn.Module, x: Tensor) -> dict[str, dict[str, Tensor]]:
    """Run ``model`` on ``x`` and return, per attention module path, its taps' maps in forward order.

    SAN gives ``doc``, ``extrema``, ``smoothed`` and ``mask`` (less whatever its ablation switches skip), CBAM
    ``channel_mask`` and ``mask``, BAM ``mask``. The forward runs in eval mode without gradients — so batch
    norm statistics stay untouched — and the model's own mode is restored; hooks are removed afterwards.
    """
    captured: dict[str, dict[str, Tensor]] = {}
    handles = []
    for path, module in attention_modules(model).items():
        maps = captured.setdefault(path, {})
        for name, tap in module.taps().items():
            handles.append(tap.register_forward_hook(partial(_store, maps, name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return captured
