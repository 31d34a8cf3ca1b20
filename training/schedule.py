"""What changes over a run: the learning rate per iteration and the training resolution per epoch."""

import math

import numpy as np

from training.config import JobSpec


def learning_rate(spec: JobSpec, epoch: float, world_size: int) -> float:
    """The LR at fractional ``epoch`` (epoch + iteration / iterations), scaled by the global batch / 256."""
    peak = spec.lr.lr * spec.training.batch_size * world_size / 256
    if spec.lr.schedule == "cyclic":
        # ffcv-imagenet's triangle: from ~0 up to the peak at peak_epoch, down to 0 at the end
        return float(np.interp(epoch, [0, spec.lr.peak_epoch, spec.training.epochs], [peak * 1e-4, peak, 0.0]))
    if spec.lr.schedule == "step":
        return peak * spec.lr.step_ratio ** math.floor(epoch / spec.lr.step_epochs)
    return peak * 0.5 * (1 + math.cos(math.pi * epoch / spec.training.epochs))


def resolution_at(spec: JobSpec, epoch: int, native: int) -> int:
    """Progressive resizing (ffcv-imagenet): ``min_res`` until ``start_ramp``, linear to ``max_res`` at
    ``end_ramp``, rounded to multiples of ``step``; ``native`` when no range is set."""
    res = spec.resolution
    if res.min_res is None:
        return native
    if epoch <= res.start_ramp:
        return res.min_res
    if epoch >= res.end_ramp:
        return res.max_res
    interpolated = np.interp(epoch, [res.start_ramp, res.end_ramp], [res.min_res, res.max_res])
    return round(float(interpolated) / res.step) * res.step
