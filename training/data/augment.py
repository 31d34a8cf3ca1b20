"""Seeded augmentations: ffcv's own flip and shift draw from numba's per-thread generators, which no seed
reaches, so two runs with the same seed would differ. These derive every decision from a hash of the seed, the
sample's index and the batch's composition (which changes each epoch with the shuffled order)."""

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from numba import njit


@njit(cache=False)
def splitmix64(x: np.uint64) -> np.uint64:
    """A well-mixed 64-bit hash (SplitMix64's finaliser)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=False)
def batch_salt(seed: np.uint64, indices) -> np.uint64:
    salt = seed
    for index in indices:
        salt = splitmix64(salt ^ np.uint64(index))
    return salt


class SeededHorizontalFlip(Operation):
    """Flip each image with probability 1/2, decided by (seed, batch, sample index)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = np.uint64(seed)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        seed = self.seed

        def flip(images, dst, indices):
            salt = batch_salt(seed, indices)
            for i in my_range(images.shape[0]):
                if splitmix64(salt ^ np.uint64(indices[i])) & np.uint64(1):
                    dst[i] = images[i, :, ::-1]
                else:
                    dst[i] = images[i]
            return dst

        flip.is_parallel = True
        flip.with_indices = True
        return flip

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        return replace(previous_state, jit_mode=True), AllocationQuery(previous_state.shape, previous_state.dtype)


class SeededTranslate(Operation):
    """Shift each image by up to ``padding`` px in each direction (zero fill), decided by (seed, batch, index)."""

    def __init__(self, padding: int, seed: int) -> None:
        super().__init__()
        self.padding = padding
        self.seed = np.uint64(seed)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        pad, seed = self.padding, self.seed
        span = np.uint64(2 * pad + 1)

        def translate(images, dst, indices):
            n, h, w, _ = images.shape
            dst[:] = 0
            dst[:, pad : pad + h, pad : pad + w] = images
            salt = batch_salt(seed, indices)
            for i in my_range(n):
                draw = splitmix64(salt ^ np.uint64(indices[i]))
                y = np.int64(draw % span)
                x = np.int64((draw >> np.uint64(32)) % span)
                images[i] = dst[i, y : y + h, x : x + w]
            return images

        translate.is_parallel = True
        translate.with_indices = True
        return translate

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, AllocationQuery]:
        h, w, c = previous_state.shape
        shape = (h + 2 * self.padding, w + 2 * self.padding, c)
        return replace(previous_state, jit_mode=True), AllocationQuery(shape, previous_state.dtype)
