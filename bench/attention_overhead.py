"""What attention costs: train-step time as a ratio to the bare model, with params, FLOPs and memory.

For each model and input size, every attention × placement (plus SAN with a depthwise smoothing conv, beyond the
paper) runs forward + backward + SGD step on random data; the median step time after warm-up is divided by the
bare model's, all in one process. A second table times SAN's soft-extrema weight α against its smoothing conv.

    python bench/attention_overhead.py                 # the full table (several minutes on 2 cores)
    python bench/attention_overhead.py --quick         # lenet5 and resnet18 at 64 px only
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from san.attention.san import extrema_count
from san.placement import PLACEMENTS
from san.profile import model_stats
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
# (model, input size, batch size)
CASES = [
    ("lenet5", 28, 64),
    ("resnet18", 64, 32),
    ("vgg16", 64, 32),
    ("resnet18", 224, 8),
    ("vgg16", 224, 8),
]
QUICK_CASES = [("lenet5", 28, 64), ("resnet18", 64, 32)]


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


def train_step_case(model_name: str, size: int, batch: int, device: torch.device, warmup: int, repeats: int):
    stem = {} if model_name == "lenet5" else {"stem": "imagenet" if size >= 64 else "small"}
    in_chans = 1 if model_name == "lenet5" else 3
    x = torch.randn(batch, in_chans, size, size, device=device)
    target = torch.randint(0, 10, (batch,), device=device)
    rows = []
    for label, attention, kwargs, placements in VARIANTS:
        for placement in placements:
            model_kwargs = dict(attention=attention, placement="bottleneck" if placement == "-" else placement,
                                attention_kwargs=kwargs, **stem)  # fmt: skip
            torch.manual_seed(0)
            model = build_model(model_name, 10, **model_kwargs).to(device)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step(model=model, optimizer=optimizer) -> None:
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), target).backward()
                optimizer.step()
                if device.type == "cuda":
                    torch.cuda.synchronize()

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            seconds = median_seconds(step, warmup, repeats)
            memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else saved_activation_bytes(model, x)
            stats = model_stats(model_name, size, 10, **model_kwargs)
            rows.append((label, placement, seconds, stats, memory))
            del model, optimizer
    return rows


def print_train_step_table(model_name: str, size: int, batch: int, rows) -> None:
    base_seconds, base_stats, base_memory = rows[0][2], rows[0][3], rows[0][4]
    print(f"\n### {model_name} @ {size} px, batch {batch}\n")
    print("| attention | placement | step ms | time × base | FLOPs × base | params | attn params | memory × base |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for label, placement, seconds, stats, memory in rows:
        print(
            f"| {label} | {placement} | {seconds * 1e3:.1f} | {seconds / base_seconds:.2f} "
            f"| {stats.flops / base_stats.flops:.2f} | {stats.params:,} | {stats.attention_params:,} "
            f"| {memory / base_memory:.2f} |"
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
    parser.add_argument("--quick", action="store_true", help="lenet5 @ 28 and resnet18 @ 64 only")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, {args.threads} threads, torch {torch.__version__}; median of {args.repeats} steps")
    print("memory: CUDA peak allocated on GPU; on CPU, bytes autograd saves for backward (parameters excluded)")
    alpha_vs_conv(device, args.warmup, max(args.repeats, 10))
    for model_name, size, batch in QUICK_CASES if args.quick else CASES:
        rows = train_step_case(model_name, size, batch, device, args.warmup, args.repeats)
        print_train_step_table(model_name, size, batch, rows)


if __name__ == "__main__":
    main()
