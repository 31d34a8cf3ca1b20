"""Seeded augmentations: ffcv's own flip, shift and random-resized crop draw from numba's per-thread generators,
which no seed reaches, so two runs with the same seed would differ. These derive every decision from a hash of
the seed, the sample's index and the batch's composition (which changes each epoch with the shuffled order)."""

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
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


@njit(cache=False)
def _uniform(state: np.uint64) -> tuple[float, np.uint64]:
    """A draw in [0, 1) and the next state."""
    state = splitmix64(state)
    return float(state >> np.uint64(11)) * (1.0 / 9007199254740992.0), state


@njit(cache=False)
def seeded_random_crop(height, width, scale, ratio, state):
    """torchvision's RandomResizedCrop box (as ffcv's ``get_random_crop``), drawn from ``state``."""
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(10):
        u, state = _uniform(state)
        target_area = area * (scale[0] + u * (scale[1] - scale[0]))
        u, state = _uniform(state)
        aspect_ratio = np.exp(log_ratio[0] + u * (log_ratio[1] - log_ratio[0]))
        w = int(round(np.sqrt(target_area * aspect_ratio)))  # noqa: RUF046 (as ffcv's get_random_crop)
        h = int(round(np.sqrt(target_area / aspect_ratio)))  # noqa: RUF046 (as ffcv's get_random_crop)
        if 0 < w <= width and 0 < h <= height:
            u, state = _uniform(state)
            i = int(u * (height - h + 1))
            u, state = _uniform(state)
            j = int(u * (width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))  # noqa: RUF046 (as ffcv's get_random_crop)
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))  # noqa: RUF046 (as ffcv's get_random_crop)
    else:
        w = width
        h = height
    return (height - h) // 2, (width - w) // 2, h, w


class SeededRandomResizedCropDecoder(ResizedCropRGBImageDecoder):
    """ffcv's ``RandomResizedCropRGBImageDecoder`` with its crop boxes drawn from (seed, batch, sample index)."""

    def __init__(self, output_size, seed: int, scale=(0.08, 1.0), ratio=(0.75, 4 / 3)) -> None:
        super().__init__(output_size)
        self.scale, self.ratio, self.seed = scale, ratio, np.uint64(seed)

    @property
    def get_crop_generator(self):
        return seeded_random_crop

    def generate_code(self) -> Callable:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        scale, ratio, seed = np.array(self.scale), np.array(self.ratio), self.seed

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            salt = batch_salt(seed, batch_indices)
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    temp_buffer = temp_buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                i, j, h, w = seeded_random_crop(height, width, scale, ratio, salt ^ np.uint64(source_ix))
                resize_crop_c(temp_buffer, i, i + h, j, j + w, destination[dst_ix])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode
