"""Should a CPU job set ``training.channels_last``? The same train step in NCHW and in channels-last layout.

1. Per model: forward + backward + SGD step on random data, the model and its input in one layout, then the
   other, alternating so drift on the machine hits both alike; median step times.
2. The lenet5-fmnist preset's job itself: ``train_one_epoch`` over real Fashion-MNIST through the FFCV loader,
   epochs alternating between an NCHW and a channels-last copy of the job.

    python bench/memory_format.py [--images 20000] [--epochs 3] [--rounds 3] [--quick] [--json PATH]
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from training.config import JobSpec
from training.data.build import build_dataset
from training.data.loaders import make_loader
from training.data.writer import WriterOptions
from training.loop import flush_denormals_on_cpu, make_optimizer, train_one_epoch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.attention_overhead import median_seconds  # the step timer the attention bench uses
from bench.report import Row, measured, parse_args, this_command, write_rows

# (model, attention, input size, batch)
CASES = [
    ("lenet5", "none", 28, 128),
    ("lenet5", "san-c", 28, 128),
    ("lenet5", "san-d", 28, 128),
    ("lenet5", "cbam", 28, 128),
    ("resnet18", "none", 32, 32),
    ("resnet18", "san-c", 32, 32),
    ("vgg16", "san-c", 32, 16),
    ("resnet50", "san-c", 64, 8),
]
QUICK_CASES = [case for case in CASES if case[0] == "lenet5" and case[1] in ("none", "san-c")] + [CASES[4]]
PRESET = Path(__file__).resolve().parent.parent / "configs" / "lenet5-fmnist.yaml"


def in_layout(tensor_or_model, channels_last: bool):
    return tensor_or_model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def step_ms(name: str, attention: str, size: int, batch: int, rounds: int = 3) -> dict[bool, list[float]]:
    """Median step ms of each round, per layout (True: channels-last)."""
    in_chans = 1 if name == "lenet5" else 3
    spec = JobSpec.model_validate({"model": {"name": name, "attention": attention}, "lr": {"peak_epoch": 1}})
    x, target = torch.randn(batch, in_chans, size, size), torch.randint(0, 10, (batch,))
    steps = {}
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = in_layout(spec.build_model(10, in_chans), channels_last)
        optimizer = make_optimizer(model, spec)  # as training builds it; LR 0 changes no step's cost
        inputs = in_layout(x, channels_last)

        def step(model=model, optimizer=optimizer, inputs=inputs) -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), target).backward()
            optimizer.step()

        steps[channels_last] = step
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for channels_last, step in steps.items():
            times[channels_last].append(median_seconds(step, warmup=2, repeats=8) * 1e3)
    return times


def preset_epochs(images: int, epochs: int) -> dict[bool, list[float]]:
    """Images/s of the preset's own loop, NCHW and channels-last epochs alternating (the first of each dropped:
    it pays FFCV's compilation and the warm-up)."""
    rates: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as temp:
        data = Path(temp)
        build_dataset("fashion-mnist", None, data / "fmnist", WriterOptions(num_workers=2, subset=images))
        preset = JobSpec.load(PRESET)
        loader = make_loader(data / "fmnist" / "train.beton", train=True, batch_size=preset.training.batch_size,
                             in_chans=1, seed=preset.training.seed)  # fmt: skip
        device = torch.device("cpu")
        flush_denormals_on_cpu(device)
        jobs = {}
        for channels_last in (False, True):
            spec = preset.model_copy(
                update={"training": preset.training.model_copy(update={"channels_last": channels_last})}
            )
            torch.manual_seed(spec.training.seed)
            model = in_layout(spec.build_model(10, 1), channels_last)
            optimizer = make_optimizer(model, spec)
            jobs[channels_last] = (spec, model, optimizer)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        for epoch in range(epochs + 1):
            for channels_last, (spec, model, optimizer) in jobs.items():
                result = train_one_epoch(model, loader, optimizer, scaler, spec, epoch, device, 1)
                if epoch:
                    rates[channels_last].append(result["images"] / result["seconds"])
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs of each layout")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the two layouts per model")
    args = parse_args(parser, quick={"images": 5000, "epochs": 2, "rounds": 2})
    torch.set_num_threads(1)
    rows = [(case, step_ms(*case, rounds=args.rounds)) for case in (QUICK_CASES if args.quick else CASES)]
    rates = preset_epochs(args.images, args.epochs)
    print("\nTrain step (forward + backward + SGD), random data, 1 thread, median ms\n")
    print("| model | attention | input | NCHW ms | channels-last ms | NCHW / channels-last |")
    print("|---|---|---|---:|---:|---:|")
    for (name, attention, size, batch), rounds in rows:
        ms = {layout: statistics.median(values) for layout, values in rounds.items()}
        print(
            f"| {name} | {attention} | b{batch}@{size} | {ms[False]:.1f} | {ms[True]:.1f} "
            f"| {ms[False] / ms[True]:.2f} |"
        )
    nchw, channels_last = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"\nThe lenet5-fmnist preset's loop on {args.images:,} Fashion-MNIST images, 1 thread, median of "
          f"{args.epochs} epochs each: NCHW {nchw:,.0f} img/s, channels-last {channels_last:,.0f} img/s "
          f"({channels_last / nchw:.2f}×)")  # fmt: skip
    if args.json:
        write_rows(args.json, report_rows(rows, rates, args))


def report_rows(rows, rates: dict[bool, list[float]], args) -> list[Row]:
    """Channels-last against NCHW: each model's step (median of the rounds' medians) and the preset's loop."""
    out, command = [], this_command()
    for (name, attention, size, batch), rounds in rows:
        nchw = statistics.median(rounds[False])
        out.append(measured("memory format", f"{name} + {attention} b{batch}@{size} · channels-last step",
                            rounds[True], "ms", baseline="NCHW step", ratio=statistics.median(rounds[True]) / nchw,
                            note=f"NCHW {nchw:.1f} ms; 1 thread", command=command))  # fmt: skip
    ratio = statistics.median(rates[True]) / statistics.median(rates[False])
    out.append(measured("memory format", "lenet5-fmnist preset's loop · channels-last", rates[True], "img/s",
                        baseline="NCHW loop", ratio=ratio, command=command,
                        note=f"{args.images:,} images; NCHW {statistics.median(rates[False]):,.0f} img/s"))  # fmt: skip
    return out


if __name__ == "__main__":
    main()
