"""What Ray Train costs and what a second worker buys, on the same lenet5 (or resnet18) + SAN-c job over
Fashion-MNIST.

1. Epoch time of a plain loop (``train_one_epoch`` in this process, no Ray) vs the same job on 1 Ray worker
   (target: ≤ 1.05×).
2. Throughput of 2 Ray workers × 1 thread vs 2 plain processes in a gloo DDP group (no Ray; target: ≥ 0.97×, Ray
   adds nothing over DDP) and vs 1 Ray worker × 1 thread; of the DDP group vs the plain loop: what the per-step
   gradient all-reduce costs without Ray; and of the same 2 processes with no gradient sync (each trains its own
   copy): the ceiling this machine sets. The plain loop, the DDP group and the 1- and 2-worker Ray runs each run
   ``--repeats`` times, each Ray run beside what it is compared with (plain, 1 worker, DDP, 2 workers; the next
   repeat in reverse): this machine's speed drifts by up to 15 % within minutes (one bench's DDP runs read 5,400 to
   6,400 img/s), more than the few per cent measured, so each target's ratio is the median over repeats of the
   ratio of two neighbouring runs.
3. The latency of one blocking gloo all-reduce of the model's gradient between 2 idle processes (p50 and p90): the
   floor under every DDP step's wait.
4. The CPU the rest of the machine takes while 2 Ray workers, or the 2 DDP processes, train (`bench.other_cpu`):
   Ray's daemons and actors, the driver and the kernel — on a machine whose cores the workers fill, what Ray's
   own processes use comes out of training.
Epoch times are the median over epochs after the first (which pays FFCV's JIT compilation).

    python bench/ray_overhead.py [--model lenet5|resnet18] [--images 20000] [--epochs 4] [--batch-size 128]
                                 [--repeats 5] [--quick] [--json PATH]
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.config import JobSpec
from training.data.build import build_dataset
from training.data.loaders import make_loader
from training.data.writer import WriterOptions
from training.launch import launch
from training.loop import CHECKPOINT_FILE, flush_denormals_on_cpu, make_optimizer, train_one_epoch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.other_cpu import OtherCpu, is_ray_train_worker, is_spawned_process
from bench.report import Row, measured, parse_args, this_command, write_rows
from tests.services import free_port  # the tests' helper


def spec_for(workers: int, epochs: int, batch_size: int, model: str = "lenet5", channels_last: bool = False) -> JobSpec:
    return JobSpec.model_validate({
        "model": {"name": model, "attention": "san-c"},
        "data": {"train_path": "fmnist/train.beton", "val_path": "fmnist/val.beton"},
        "training": {"epochs": epochs, "batch_size": batch_size, "channels_last": channels_last},
        "validation": {"batch_size": 1000},
        "lr": {"peak_epoch": 1},
        "scaling": {"num_workers": workers, "cpus_per_worker": 1},
        "checkpoint": {"every_epochs": epochs},
    })  # fmt: skip


def plain_epochs(spec: JobSpec, data: Path, rank: int = 0, world: int = 1, sync: bool = True) -> list[dict]:
    """The worker's loop without Ray: ``train_one_epoch`` in this process (in a gloo group when ``world`` > 1,
    averaging gradients with DDP unless ``sync`` is False: then each process trains its own copy on its shard)."""
    torch.manual_seed(spec.training.seed)
    loader = make_loader(data / "fmnist" / "train.beton", train=True, batch_size=spec.training.batch_size,
                         in_chans=1, distributed=world > 1, seed=spec.training.seed)  # fmt: skip
    torch.set_num_threads(1)
    model = spec.build_model(10, 1)
    if spec.training.channels_last:  # as train_worker does, before DDP takes the gradients' layout
        model = model.to(memory_format=torch.channels_last)
    if world > 1 and sync:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = make_optimizer(model, spec)  # as train_worker does
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    device = torch.device("cpu")
    flush_denormals_on_cpu(device)  # as every Ray worker does
    return [train_one_epoch(model, loader, optimizer, scaler, spec, e, device, world)
            for e in range(spec.training.epochs)]  # fmt: skip


def _ddp_process(rank: int, world: int, port: int, spec: JobSpec, data: Path, out: Path, sync: bool) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    epochs = plain_epochs(spec, data, rank, world, sync)
    if rank == 0:
        out.write_text(json.dumps([e["images"] / e["seconds"] for e in epochs]))
    dist.destroy_process_group()


def plain_ddp_rates(spec: JobSpec, data: Path, temp: Path, sync: bool = True) -> list[float]:
    """Images/s of each epoch after the first of 2 plain processes in a gloo DDP group, no Ray: what DDP itself
    costs on this machine. Without ``sync`` no gradient is all-reduced: the most two processes that share this
    machine can do."""
    out = temp / "ddp.json"
    mp.spawn(_ddp_process, args=(2, free_port(), spec, data, out, sync), nprocs=2)
    return json.loads(out.read_text())[1:]


def _allreduce_process(rank: int, world: int, port: int, numel: int, calls: int, out: Path) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    tensor, seconds = torch.zeros(numel), []
    for call in range(calls + 20):  # the first 20 warm up the connections
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(tensor)
        if call >= 20:
            seconds.append(time.perf_counter() - started)
    if rank == 0:
        out.write_text(json.dumps(seconds))
    dist.destroy_process_group()


def allreduce_latency(numel: int, temp: Path, calls: int = 200) -> tuple[float, float]:
    """p50 and p90 seconds of one blocking gloo all-reduce of ``numel`` floats between 2 otherwise idle processes."""
    out = temp / "allreduce.json"
    mp.spawn(_allreduce_process, args=(2, free_port(), numel, calls, out), nprocs=2)
    seconds = sorted(json.loads(out.read_text()))
    return seconds[len(seconds) // 2], seconds[len(seconds) * 9 // 10]


def ray_epochs(spec: JobSpec, data: Path, runs: Path, name: str) -> tuple[list[float], list[float]]:
    result = launch(spec, job_id=name, root=runs, data=data)
    history = torch.load(Path(result.checkpoint_path) / CHECKPOINT_FILE, weights_only=False)["history"]
    return [m["time/epoch_s"] for m in history], [m["throughput/img_s"] for m in history]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("lenet5", "resnet18"), default="lenet5")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument(
        "--memory-format",
        choices=("auto", "nchw", "channels-last"),
        default="auto",
        help="auto: what bench/memory_format.py found faster on CPU (channels-last for lenet5 only)",
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128, help="per worker")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each: plain, DDP, 1 and 2 Ray workers")
    args = parse_args(parser, quick={"images": 6000, "epochs": 3, "repeats": 1})
    if args.epochs < 2:
        parser.error("--epochs: at least 2 (each run's first epoch pays FFCV's compilation and is left out)")
    channels_last = args.memory_format == "channels-last" or (args.memory_format == "auto" and args.model == "lenet5")
    job = (args.epochs, args.batch_size, args.model, channels_last)
    with tempfile.TemporaryDirectory() as temp:
        data, runs = Path(temp) / "data", Path(temp) / "runs"
        build_dataset("fashion-mnist", None, data / "fmnist", WriterOptions(num_workers=2, subset=args.images))
        gradient = sum(p.numel() for p in spec_for(1, *job).build_model(10, 1).parameters())
        latency = allreduce_latency(gradient, Path(temp))
        unsynced = statistics.median(plain_ddp_rates(spec_for(2, *job), data, Path(temp), sync=False))
        # Every epoch after each run's first: "plain" and 1, 2 (Ray workers) by epoch time and rate, "ddp" by rate.
        times: dict[int | str, list[float]] = {"plain": [], 1: [], 2: []}
        rates: dict[int | str, list[float]] = {"plain": [], "ddp": [], 1: [], 2: []}
        # Per repeat, each a ratio of the runs' medians: 1 Ray worker's epoch time over the plain loop's (neighbours),
        # 2 Ray workers' rate over the DDP group's (neighbours), over 1 Ray worker's.
        pairs: dict[str, list[float]] = {"ray/plain": [], "ray/ddp": [], "2/1": []}
        # Per run of 2 Ray workers and of the DDP group: the CPU the rest of the machine took while they trained.
        other_cpu: dict[int | str, list[float]] = {"ddp": [], 2: []}

        def this_repeat(values: list[float]) -> float:  # the median of the epochs this repeat's run added
            return statistics.median(values[-(args.epochs - 1) :])

        for repeat in range(args.repeats):
            for run in ("plain", 1, "ddp", 2) if repeat % 2 == 0 else (2, "ddp", 1, "plain"):
                if run == "plain":
                    epochs = plain_epochs(spec_for(1, *job), data)[1:]
                    times[run] += [e["seconds"] for e in epochs]
                    rates[run] += [e["images"] / e["seconds"] for e in epochs]
                elif run == "ddp":
                    with OtherCpu(is_spawned_process, 2) as cpu:
                        rates[run] += plain_ddp_rates(spec_for(2, *job), data, Path(temp))
                    other_cpu[run].append(cpu.busy_other)
                else:  # the sampler only where its figure is reported: its own CPU would touch the 1-worker run
                    with OtherCpu(is_ray_train_worker, run) if run == 2 else contextlib.nullcontext() as cpu:
                        epoch_s, img_s = ray_epochs(spec_for(run, *job), data, runs, f"w{run}-r{repeat}")
                    if run == 2:
                        other_cpu[run].append(cpu.busy_other)
                    times[run] += epoch_s[1:]
                    rates[run] += img_s[1:]
            pairs["ray/plain"].append(this_repeat(times[1]) / this_repeat(times["plain"]))
            pairs["ray/ddp"].append(this_repeat(rates[2]) / this_repeat(rates["ddp"]))
            pairs["2/1"].append(this_repeat(rates[2]) / this_repeat(rates[1]))
        ray.shutdown()
    median = {key: statistics.median(values) for key, values in rates.items()}
    print(f"\n{args.model} + san-c, {args.images:,} Fashion-MNIST images, batch {args.batch_size} per worker, "
          f"{'channels-last' if channels_last else 'NCHW'}, 1 thread per worker; {args.repeats} runs of each: the "
          "median (min–max) of every epoch after each run's first\n")  # fmt: skip

    def spread(values: list[float], fmt: str) -> str:
        return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"

    print("| measurement | value |")
    print("|---|---:|")
    print(f"| gloo all-reduce of the {gradient:,}-float gradient, 2 idle processes: p50 / p90 ms | "
          f"{latency[0] * 1000:.2f} / {latency[1] * 1000:.2f} |")  # fmt: skip
    print(f"| plain loop epoch s | {spread(times['plain'], '.2f')} |")
    print(f"| 1 Ray worker epoch s | {spread(times[1], '.2f')} |")
    print(f"| Ray / plain (run pairs) | {spread(pairs['ray/plain'], '.3f')} |")
    print(f"| 1 worker img/s | {spread(rates[1], ',.0f')} |")
    print(f"| 2 workers img/s | {spread(rates[2], ',.0f')} |")
    print(f"| 2 workers / 1 worker (per repeat) | {spread(pairs['2/1'], '.2f')} |")
    print(f"| 2 plain DDP processes (no Ray) img/s | {spread(rates['ddp'], ',.0f')} |")
    print(f"| 2 Ray workers / 2 plain DDP (run pairs) | {spread(pairs['ray/ddp'], '.3f')} |")
    print(f"| 2 plain DDP / 1 plain loop | {median['ddp'] / median['plain']:.2f} |")
    print(f"| CPU besides the 2 workers while they train: Ray / DDP | {spread(other_cpu[2], '.3f')} / "
          f"{spread(other_cpu['ddp'], '.3f')} |")  # fmt: skip
    print(f"| 2 plain processes, no gradient sync, img/s | {unsynced:,.0f} |")
    print(f"| 2 plain, no sync / 1 plain loop | {unsynced / median['plain']:.2f} |")
    if args.json:
        write_rows(args.json, report_rows(times, rates, pairs, other_cpu, unsynced, latency, gradient, channels_last,
                                          args))  # fmt: skip


def report_rows(times, rates, pairs: dict[str, list[float]], other_cpu, unsynced: float,
                latency: tuple[float, float], gradient: int, channels_last: bool, args) -> list[Row]:  # fmt: skip
    """Ray against what it wraps: 1 worker against the plain loop, 2 workers against plain DDP; the 2-worker
    speed-up beside this machine's core count, which bounds it."""
    command, cores = this_command(), os.cpu_count()
    median = {key: statistics.median(values) for key, values in rates.items()}
    job = (f"{args.model} + san-c, {args.images:,} images, batch {args.batch_size} per worker, "
           f"{'channels-last' if channels_last else 'NCHW'}, 1 thread per worker")  # fmt: skip
    ceiling = unsynced / median["plain"]
    return [
        measured("ray", "plain loop (no Ray) · epoch", times["plain"], "s", note=job, command=command),
        measured("ray", "1 Ray worker · epoch", times[1], "s", baseline="plain loop (no Ray)",
                 ratio=statistics.median(pairs["ray/plain"]), target=("<=", 1.05), command=command,
                 note=f"ratio: the median of {len(pairs['ray/plain'])} neighbouring-run pairs, "
                      f"{min(pairs['ray/plain']):.3f}–{max(pairs['ray/plain']):.3f}"),
        measured("ray", "2 plain DDP processes (gloo, no Ray) · throughput", rates["ddp"], "img/s",
                 baseline="plain loop", ratio=median["ddp"] / median["plain"], command=command),
        measured("ray", "2 Ray workers · throughput", rates[2], "img/s", baseline="2 plain DDP processes (no Ray)",
                 ratio=statistics.median(pairs["ray/ddp"]), target=(">=", 0.97), command=command,
                 note=f"Ray adds nothing over DDP; ratio: the median of {len(pairs['ray/ddp'])} neighbouring-run "
                      f"pairs, {min(pairs['ray/ddp']):.3f}–{max(pairs['ray/ddp']):.3f}"),
        measured("ray", "2 Ray workers · CPU the rest of the machine takes", other_cpu[2], "CPU", command=command,
                 note=f"of {cores}, while they train (per second, median): Ray's daemons and actors, the driver, the "
                      "kernel"),
        measured("ray", "2 plain DDP processes · CPU the rest of the machine takes", other_cpu["ddp"], "CPU",
                 command=command, note="the same, the idle Ray cluster's daemons included"),
        measured("ray", "2 Ray workers vs 1 · throughput", pairs["2/1"], "×", command=command,
                 note=f"bounded by the machine's {cores} cores: 2 plain processes that never sync a gradient reach "
                      f"{ceiling:.2f}× the plain loop"),
        Row("ray", "2 plain processes, no gradient sync · throughput", unsynced, "img/s", baseline="plain loop",
            ratio=ceiling, note="the most 2 training processes get from this machine", command=command),
        Row("ray", f"gloo all-reduce of {gradient:,} floats, 2 idle processes · p50", latency[0] * 1e3, "ms",
            note=f"p90 {latency[1] * 1e3:.2f} ms", command=command),
    ]  # fmt: skip


if __name__ == "__main__":
    main()
