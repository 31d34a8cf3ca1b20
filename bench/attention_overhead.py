"""What attention costs: train-step time as a ratio to the bare model, with params, FLOPs and memory.

For each model and input size, every attention × placement (plus SAN with a depthwise smoothing conv, beyond the
paper) runs forward + backward + SGD step on random data, in rounds that visit every variant in turn (so drift on
the machine hits all alike); a variant's step time is its median after warm-up, divided by the bare model's. The
``fused`` rows are the modules as they run (the registered ops of `san.kernels`), the ``stepwise`` rows
the step-by-step formulation (`san.attention.reference_formulation`) they are tested equal to. Memory is what
autograd saves for backward (CPU) or the CUDA peak. Each model runs in the layout its CPU jobs use: lenet5
channels-last (its preset's), the others NCHW (docs/decisions/0006-tried-and-not-kept-ray-and-layout.md).

Targets (issue 14): on lenet5 @28 b64 every module's time ≤ max(2.0, its FLOP ratio) and its saved memory ≤ 2.0×
base; on resnet18 @224 bottleneck, SAN's memory ≤ 1.4× base and its time ≤ its FLOP ratio. A second table times
SAN's soft-extrema weight α against its smoothing conv.

    python bench/attention_overhead.py                 # the full table (~30 minutes on 2 cores)
    python bench/attention_overhead.py --quick         # lenet5 @28 and resnet18 @224 bottleneck only
    python bench/attention_overhead.py --cases vgg16@224 --repeats 3   # some cases of the full table
"""

import argparse
import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import Row, measured, parse_args, this_command, write_rows
from san.attention import reference_formulation
from san.attention.functional import extrema_count
from san.placement import PLACEMENTS
from san.profile import ModelStats, model_stats
from san.registry import build_model

# (label, attention, attention_kwargs, placements). "dw": depthwise smoothing conv, beyond the paper; "k3": a 3x3
# smoothing conv everywhere, also at the ResNet stem where the paper's rule gives 7x7. SAN's reference placement
# is its bottleneck one, so it is not timed twice.
SAN_PLACEMENTS = ("bottleneck", "full")
VARIANTS = [
    ("none", "none", {}, ("-",)),
    ("san-c", "san-c", {}, SAN_PLACEMENTS),
    ("san-d", "san-d", {}, SAN_PLACEMENTS),
    ("san-c k3", "san-c", {"kernel_size": 3}, ("bottleneck",)),
    ("san-c dw", "san-c", {"smoothing_groups": "depthwise"}, SAN_PLACEMENTS),
    ("san-d dw", "san-d", {"smoothing_groups": "depthwise"}, SAN_PLACEMENTS),
    ("cbam", "cbam", {}, PLACEMENTS),
    ("bam", "bam", {}, PLACEMENTS),
]
MODULES = ("san-c", "san-d", "cbam", "bam")  # the paper's modules, also timed in their reference formulation
# (model, input size, batch size)
CASES = [
    ("lenet5", 28, 64),
    ("resnet18", 64, 32),
    ("vgg16", 64, 32),
    ("resnet18", 224, 8),
    ("vgg16", 224, 8),
]
QUICK_CASES = [("lenet5", 28, 64), ("resnet18", 224, 8)]
QUICK_VARIANTS = {"lenet5": None, "resnet18": ("none", "san-c", "san-d", "cbam", "bam")}  # None: all
CHANNELS_LAST = {"lenet5"}
# Cases whose models all stay in memory at once, so rounds can interleave them; the others run one at a time.
INTERLEAVED_PARAMS = 400_000_000  # ~5 GB of parameters, gradients and momentum
SLOW_STEP_S = 1.0  # a step this long is warm after one run
MIN_REPEATS = 3


def median_seconds(step: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves for backward (parameters excluded): training memory on CPU."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: list[torch.Tensor] = []  # held until counted, so no freed storage's address is reused meanwhile

    def pack(tensor: torch.Tensor) -> None:
        # Return no reference: a pack hook that returns an output tensor itself forms a cycle that leaks it.
        kept.append(tensor.detach())

    def unpack(_: None) -> torch.Tensor:
        raise RuntimeError("this graph only measures what is saved; it cannot run backward")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        model(x)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
    return sum(size for pointer, size in storages.items() if pointer not in params)


@dataclass
class Variant:
    label: str
    placement: str
    formulation: str  # "fused" (as the modules run) or "stepwise" (inside reference_formulation)
    build: Callable[[], tuple[nn.Module, torch.optim.Optimizer]]
    stats: ModelStats
    samples: list[float]
    memory: int = 0
    model: nn.Module | None = None  # built on first use, dropped when its case is measured
    optimizer: torch.optim.Optimizer | None = None

    def built(self) -> "Variant":
        if self.model is None:
            self.model, self.optimizer = self.build()
        return self

    def drop(self) -> None:
        self.model = self.optimizer = None


def build_variants(model_name: str, size: int, device: torch.device, quick: bool) -> list[Variant]:
    stem = {} if model_name == "lenet5" else {"stem": "imagenet" if size >= 64 else "small"}
    chosen = QUICK_VARIANTS.get(model_name) if quick else None
    variants = []
    for label, attention, kwargs, placements in VARIANTS:
        if chosen is not None and label not in chosen:
            continue
        for placement in placements:
            if chosen is not None and placement not in ("-", "bottleneck"):
                continue
            model_kwargs = dict(attention=attention, placement="bottleneck" if placement == "-" else placement,
                                attention_kwargs=kwargs, **stem)  # fmt: skip
            stats = model_stats(model_name, size, 10, **model_kwargs)
            formulations = ("fused", "stepwise") if label in MODULES and placement == "bottleneck" else ("fused",)
            for formulation in formulations:

                def build(model_kwargs: dict = model_kwargs) -> tuple[nn.Module, torch.optim.Optimizer]:
                    torch.manual_seed(0)
                    model = build_model(model_name, 10, **model_kwargs).to(device)
                    if model_name in CHANNELS_LAST:
                        model = model.to(memory_format=torch.channels_last)
                    # fused, as training builds it (training.loop.make_optimizer)
                    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)

                variants.append(Variant(label, placement, formulation, build, stats, []))
    return variants


def train_step_case(model_name: str, size: int, batch: int, device: torch.device, warmup: int, repeats: int,
                    budget_s: float, quick: bool) -> list[Variant]:  # fmt: skip
    in_chans = 1 if model_name == "lenet5" else 3
    x = torch.randn(batch, in_chans, size, size, device=device)
    if model_name in CHANNELS_LAST:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (batch,), device=device)
    variants = build_variants(model_name, size, device, quick)

    def step(variant: Variant) -> None:
        formulation = reference_formulation() if variant.formulation == "stepwise" else contextlib.nullcontext()
        with formulation:
            variant.built().optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(variant.model(x), target).backward()
            variant.optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(variant: Variant) -> None:
        start = time.perf_counter()
        step(variant)
        variant.samples.append(time.perf_counter() - start)

    def measure_memory(variant: Variant) -> None:
        formulation = reference_formulation() if variant.formulation == "stepwise" else contextlib.nullcontext()
        with formulation:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                step(variant)
                variant.memory = torch.cuda.max_memory_allocated()
            else:
                variant.memory = saved_activation_bytes(variant.model, x)

    # Interleaved rounds need every model, its gradients and its momentum in memory at once (~12 bytes a
    # parameter); VGG-16's variants hold 2.7 billion parameters together, so those run one model at a time.
    if sum(v.stats.params for v in variants) <= INTERLEAVED_PARAMS:
        slowest = max(warm_up(variant, step, warmup) for variant in variants)
        for _ in range(timed_steps(slowest, repeats, budget_s)):
            for variant in variants:
                timed(variant)
        for variant in variants:
            measure_memory(variant)
            variant.drop()
    else:
        for variant in variants:
            for _ in range(timed_steps(warm_up(variant, step, warmup), repeats, budget_s)):
                timed(variant)
            measure_memory(variant)
            variant.drop()
    return variants


def warm_up(variant: Variant, step: Callable[[Variant], None], warmup: int) -> float:
    """Runs ``warmup`` untimed steps (one when a step takes over `SLOW_STEP_S`) and returns the last one's time."""
    seconds = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        step(variant)
        seconds = time.perf_counter() - start
        if seconds > SLOW_STEP_S:
            break
    return seconds


def timed_steps(step_seconds: float, repeats: int, budget_s: float) -> int:
    """How many steps to time: ``repeats``, fewer where they would take over ``budget_s``, never under
    `MIN_REPEATS` (a multi-second step varies by a few per cent, a millisecond one by tens)."""
    if step_seconds <= 0:
        return repeats
    return max(min(repeats, MIN_REPEATS), min(repeats, math.ceil(budget_s / step_seconds)))


def targets(model_name: str, size: int, variant: Variant, flop_ratio: float) -> dict[str, tuple[str, float] | None]:
    """The issue's targets for a fused variant's (time, memory) ratios; None where it sets none."""
    if variant.formulation != "fused" or variant.label == "none":
        return {"time": None, "memory": None}
    if model_name == "lenet5" and variant.label in MODULES:
        return {"time": ("<=", round(max(2.0, flop_ratio), 2)), "memory": ("<=", 2.0)}
    if (model_name, size, variant.placement) == ("resnet18", 224, "bottleneck") and variant.label in ("san-c", "san-d"):
        return {"time": ("<=", round(flop_ratio, 2)), "memory": ("<=", 1.4)}
    return {"time": None, "memory": None}


def case_rows(model_name: str, size: int, batch: int, variants: list[Variant], command: str) -> list[Row]:
    base = variants[0]
    base_time = statistics.median(base.samples)
    case = f"{model_name} @{size} b{batch}"
    rows = []
    for variant in variants:
        flop_ratio = variant.stats.flops / base.stats.flops
        what = f"{case} · {variant.label} · {variant.placement} · {variant.formulation}"
        goal = targets(model_name, size, variant, flop_ratio)
        stats = variant.stats
        note = f"FLOP ratio {flop_ratio:.2f}; params {stats.params:,} (attention {stats.attention_params:,})"
        time_ratio = statistics.median(variant.samples) / base_time
        if (
            variant.formulation == "fused"
            and variant.label != "none"
            and time_ratio > flop_ratio
            and goal["time"] is None
        ):
            note += "; time above FLOP ratio"
        rows.append(measured("attention", f"{what} · step time", [t * 1e3 for t in variant.samples], "ms",
                             baseline=f"bare {model_name}", ratio=time_ratio, target=goal["time"], note=note,
                             command=command))  # fmt: skip
        rows.append(Row("attention", f"{what} · saved activations", variant.memory / 2**20, "MiB",
                        baseline=f"bare {model_name}", ratio=variant.memory / base.memory, target=goal["memory"],
                        command=command))  # fmt: skip
    return rows


def print_train_step_table(model_name: str, size: int, batch: int, variants: list[Variant]) -> None:
    base = variants[0]
    base_seconds = statistics.median(base.samples)
    print(f"\n### {model_name} @ {size} px, batch {batch}\n")
    print(
        "| attention | placement | path | step ms | time × base | FLOPs × base | params | attn params | memory × base |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        seconds = statistics.median(v.samples)
        print(
            f"| {v.label} | {v.placement} | {v.formulation} | {seconds * 1e3:.1f} | {seconds / base_seconds:.2f} "
            f"| {v.stats.flops / base.stats.flops:.2f} | {v.stats.params:,} | {v.stats.attention_params:,} "
            f"| {v.memory / base.memory:.2f} |"
        )


def extrema_by_unfold(doc: torch.Tensor) -> torch.Tensor:
    """The obvious α: unfold every 3x3 window (+inf outside the map) and count. Kept as the reference to beat."""
    n, c, h, w = doc.shape
    padded = F.pad(doc, (1, 1, 1, 1), value=float("inf"))
    windows = F.unfold(padded.reshape(n * c, 1, h + 2, w + 2), 3).reshape(n, c, 9, h, w)
    return (doc.unsqueeze(2) >= windows).sum(2)


def alpha_vs_conv(device: torch.device, warmup: int, repeats: int) -> None:
    doc = torch.rand(32, 256, 16, 16, device=device)
    conv = nn.Conv2d(256, 256, 3, padding="same").to(device)
    assert torch.equal(extrema_by_unfold(doc).to(torch.uint8), extrema_count(doc))
    with torch.no_grad():
        timings = {
            "smoothing conv 3x3 (256→256)": median_seconds(lambda: conv(doc), warmup, repeats),
            "α: shifted views (ours)": median_seconds(lambda: extrema_count(doc), warmup, repeats),
            "α·DoC: shifted views (ours)": median_seconds(lambda: doc * extrema_count(doc), warmup, repeats),
            "α: F.unfold": median_seconds(lambda: extrema_by_unfold(doc), warmup, repeats),
        }  # fmt: skip
    conv_seconds = timings["smoothing conv 3x3 (256→256)"]
    print("\n### SAN's soft-extrema weight α vs its smoothing conv, forward on 32×256×16×16\n")
    print("| operation | ms | × smoothing conv |")
    print("|---|---:|---:|")
    for name, seconds in timings.items():
        print(f"| {name} | {seconds * 1e3:.2f} | {seconds / conv_seconds:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--budget", type=float, default=30.0, metavar="SECONDS",
                        help="timed seconds per variant: slow steps are timed fewer times, at least 3")  # fmt: skip
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cases", nargs="+", metavar="MODEL@SIZE",
                        help="only these cases of the full run, e.g. vgg16@224 (default: all)")  # fmt: skip
    args = parse_args(parser, quick={"warmup": 2, "repeats": 9})
    known = {f"{model}@{size}": (model, size, batch) for model, size, batch in CASES}
    unknown = sorted(set(args.cases or ()) - set(known))
    if unknown:
        parser.error(f"unknown case {', '.join(unknown)}; choose from: {', '.join(known)}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    command = this_command()
    print(
        f"device {device}, {args.threads} threads, torch {torch.__version__}; median of {args.repeats} steps, "
        f"fewer (at least {MIN_REPEATS}) where they would take over {args.budget:g} s"
    )
    print("memory: CUDA peak allocated on GPU; on CPU, bytes autograd saves for backward (parameters excluded)")
    alpha_vs_conv(device, args.warmup, max(args.repeats, 10))
    rows: list[Row] = []
    cases = [known[case] for case in args.cases] if args.cases else QUICK_CASES if args.quick else CASES
    for model_name, size, batch in cases:
        variants = train_step_case(model_name, size, batch, device, args.warmup, args.repeats, args.budget,
                                   args.quick)  # fmt: skip
        print_train_step_table(model_name, size, batch, variants)
        rows += case_rows(model_name, size, batch, variants, command)
        if args.json:
            write_rows(args.json, rows)  # after every case, so a cut-short run keeps what it measured


if __name__ == "__main__":
    main()
