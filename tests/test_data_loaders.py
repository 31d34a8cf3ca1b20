"""Loaders over real FFCV files: shapes, dtypes, normalisation, resizing, and disjoint distributed shards.

Every test that builds a Loader runs under a thread timeout: a pipeline order that hangs on CPU fails the test.
"""

import os
import socket

import numba
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ffcv.pipeline.compiler import Compiler

from tests.formats import write_idx, write_imagenet
from training.data.build import build_dataset
from training.data.loaders import JIT_MIN_IMAGES, compiles, make_loader
from training.data.writer import WriterOptions

pytestmark = pytest.mark.timeout(240, method="thread")


@pytest.fixture(scope="module")
def idx_set(tmp_path_factory):
    """64 train / 16 val greyscale 28-px images; train label i % 10, and each image's first pixel is its index."""
    root = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(64)
    write_idx(root / "src", "train", images, np.arange(64) % 10)
    write_idx(root / "src", "t10k", images[:16], np.arange(16) % 10)
    build_dataset("idx", root / "src", root / "out", WriterOptions(num_workers=1))
    return root / "out"


@pytest.fixture(scope="module")
def imagenet_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    write_imagenet(root / "src", np.random.default_rng(1))
    build_dataset("imagenet", root / "src", root / "out", WriterOptions(num_workers=1, write_mode="jpg"))
    return root / "out"


def test_train_loader_gives_normalised_float_images_and_int64_labels(idx_set):
    loader = make_loader(idx_set / "train.beton", train=True, batch_size=16, in_chans=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    images, labels = batches[0]
    assert images.shape == (16, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (16,) and labels.dtype == torch.int64
    everything = torch.cat([b[0] for b in batches])
    manifest = loader.manifest
    low, high = (0 - manifest.mean[0]) / manifest.std[0], (255 - manifest.mean[0]) / manifest.std[0]
    assert everything.min() >= low - 1e-5 and everything.max() <= high + 1e-5
    assert sorted(torch.cat([b[1] for b in batches]).tolist()) == sorted((np.arange(64) % 10).tolist())


def test_val_loader_keeps_order_and_every_image_without_drop_last(idx_set):
    loader = make_loader(idx_set / "val.beton", train=False, batch_size=10, in_chans=3)
    images, labels = zip(*loader, strict=True)
    assert [len(x) for x in labels] == [10, 6]
    assert torch.cat(labels).tolist() == (np.arange(16) % 10).tolist()
    assert images[0].shape == (10, 3, 28, 28)
    manifest = loader.manifest
    first_pixels = torch.cat(images)[:, 0, 0, 0] * manifest.std[0] + manifest.mean[0]
    assert torch.allclose(first_pixels, torch.arange(16.0), atol=1e-3)  # whole images: no crop at 28 px


def test_set_resolution_changes_the_next_epochs_size(idx_set):
    loader = make_loader(idx_set / "train.beton", train=True, batch_size=16, in_chans=1)
    assert next(iter(loader))[0].shape[-1] == 28
    loader.set_resolution(32)
    assert loader.resolution == 32 and next(iter(loader))[0].shape[-2:] == (32, 32)


def test_imagenet_like_sets_crop_to_the_requested_resolution(imagenet_set):
    train = make_loader(imagenet_set / "train.beton", train=True, batch_size=4, resolution=64)
    images, labels = next(iter(train))
    assert images.shape == (4, 3, 64, 64) and images.is_contiguous(memory_format=torch.channels_last)
    val = make_loader(imagenet_set / "val.beton", train=False, batch_size=6, resolution=48, in_chans=1)
    images, labels = next(iter(val))
    assert images.shape == (6, 1, 48, 48) and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]


def test_truncated_beton_is_refused_naming_the_file(idx_set, tmp_path):
    broken = tmp_path / "train.beton"
    broken.write_bytes((idx_set / "train.beton").read_bytes()[:4096])
    (tmp_path / "train.json").write_text((idx_set / "train.json").read_text())
    with pytest.raises(ValueError, match=r"train\.beton: cannot be read as an FFCV dataset"):
        make_loader(broken, train=True, batch_size=8)


@pytest.fixture(scope="module")
def indexed_set(tmp_path_factory):
    """64 images whose label is their index, so shards can be compared by label."""
    root = tmp_path_factory.mktemp("indexed")
    images = np.random.default_rng(2).integers(0, 256, (64, 28, 28), dtype=np.uint8)
    write_idx(root / "src", "train", images, np.arange(64))
    write_idx(root / "src", "t10k", images[:8], np.arange(8))
    build_dataset("idx", root / "src", root / "out", WriterOptions(num_workers=1))
    return root / "out" / "train.beton"


def _read_shard(rank: int, world: int, port: int, path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loader = make_loader(path, train=True, batch_size=8, in_chans=1, distributed=True, seed=7)
    np.save(out, torch.cat([labels for _, labels in loader]).numpy())
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_distributed_read_gives_disjoint_shards_covering_the_set(indexed_set, tmp_path):
    port = _free_port()
    outs = [str(tmp_path / f"rank{rank}.npy") for rank in range(2)]
    context = mp.get_context("spawn")
    procs = [
        context.Process(target=_read_shard, args=(rank, 2, port, str(indexed_set), outs[rank])) for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(180)
        assert proc.exitcode == 0
    shards = [np.load(out).tolist() for out in outs]
    assert len(shards[0]) == len(shards[1]) == 32
    assert set(shards[0]).isdisjoint(shards[1]) and set(shards[0]) | set(shards[1]) == set(range(64))


def test_shards_split_a_set_exactly_without_padding(indexed_set):
    seen = []
    for rank in range(3):
        loader = make_loader(indexed_set, train=False, batch_size=16, in_chans=1, shard=(rank, 3))
        labels = torch.cat([labels for _, labels in loader]).tolist()
        assert labels == list(range(rank, 64, 3))
        seen += labels
    assert sorted(seen) == list(range(64))


def test_augmentation_repeats_with_the_seed_and_changes_with_it_and_the_epoch(idx_set):
    def epochs(seed: int, count: int = 2) -> list[torch.Tensor]:
        loader = make_loader(idx_set / "train.beton", train=True, batch_size=16, in_chans=1, seed=seed)
        return [torch.cat([images for images, _ in loader]) for _ in range(count)]

    first, again, other = epochs(1), epochs(1), epochs(2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1])  # a new order and new draws each epoch


def test_random_resized_crops_repeat_with_the_seed(imagenet_set):
    def epoch(seed: int) -> torch.Tensor:
        loader = make_loader(imagenet_set / "train.beton", train=True, batch_size=4, resolution=32, seed=seed)
        return torch.cat([images for images, _ in loader])

    first = epoch(3)
    assert torch.equal(first, epoch(3)) and not torch.equal(first, epoch(4))


def compiled(loader) -> bool:
    """Whether FFCV built the loader's pipeline with numba (its generated stages call numba dispatchers)."""
    stages, _ = loader.loader.code
    called = [value for stage, _ in stages for value in stage.__globals__.values()]
    return any(isinstance(value, numba.core.dispatcher.Dispatcher) for value in called)


def test_a_small_jobs_pipeline_runs_uncompiled_and_gives_the_same_batches(idx_set):
    # 64 training images, 16 validation: compiled only when the job reads them often enough to repay numba
    assert not compiles(64, True, 1, False, None) and compiles(64, True, None, False, None)
    assert compiles(64, True, -(-JIT_MIN_IMAGES[True] // 64), False, None)
    assert not compiles(64, True, -(-JIT_MIN_IMAGES[True] // 64), False, (0, 2))  # each of 2 workers reads half
    assert compiles(16, False, -(-JIT_MIN_IMAGES[False] // 16), False, None)
    for path, train in ((idx_set / "train.beton", True), (idx_set / "val.beton", False)):
        batches = {}
        for epochs in (None, 2):  # as the training loop asks: a 2-epoch job
            loader = make_loader(path, train=train, batch_size=16, in_chans=1, seed=5, epochs=epochs)
            assert compiled(loader) == (epochs is None) and Compiler.is_enabled  # the switch is left as it was
            loader.set_resolution(24)
            batches[epochs] = [(images.clone(), labels.clone()) for _ in range(2) for images, labels in loader]
        assert len(batches[None]) == len(batches[2]) > 0 and batches[None][0][0].shape[-1] == 24
        for (images, labels), (expected_images, expected_labels) in zip(batches[2], batches[None], strict=True):
            assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_ffcv_code_generation_hit_by_cpythons_ast_race_is_generated_again(idx_set, monkeypatch):
    """CI failed once with FFCV's Loader raising CPython 3.11's 'AST constructor recursion depth mismatch' from
    ast.parse; that error, once, is retried — any other SystemError, or the same twice, is not swallowed."""
    import training.data.loaders as loaders

    real, calls = loaders.Loader, []

    def failing(errors: list[str]):
        def loader(*args, **kwargs):
            calls.append(args[0])
            if errors:
                raise SystemError(errors.pop(0))
            return real(*args, **kwargs)

        return loader

    mismatch = "AST constructor recursion depth mismatch (before=165, after=188)"
    monkeypatch.setattr(loaders, "Loader", failing([mismatch]))
    loader = make_loader(idx_set / "val.beton", train=False, batch_size=16, in_chans=1, seed=5, epochs=1)
    assert len(calls) == 2 and sum(len(labels) for _, labels in loader) == 16  # all 16 validation images
    for errors in ([mismatch, mismatch], ["something else"]):
        monkeypatch.setattr(loaders, "Loader", failing(list(errors)))
        with pytest.raises(SystemError, match=errors[-1].split(" (")[0]):
            make_loader(idx_set / "val.beton", train=False, batch_size=16, in_chans=1, seed=5, epochs=1)
