"""Where an attention module's time goes on this CPU: what docs/decisions/0001-c-kernels.md and 0005 rest on.

python bench/profile_attention.py module --attention cbam [--channels 6 --size 28 --batch 64 --nchw]
    forward + backward of one module alone, the ATen operations that cost most (torch.profiler)
python bench/profile_attention.py layouts
    a small-channel conv's forward and backward, NCHW vs channels-last (oneDNN's NCHW backward pads to 16)
python bench/profile_attention.py compile
    SAN's α·DoC on a ResNet stem map, eager vs torch.compile
python bench/profile_attention.py direct-convs
    the attention modules' few-channel convs: oneDNN (channels-last) vs san/kernels/native.c's direct kernels
"""

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.attention_overhead import median_seconds  # the attention bench's step timer
from san.attention import create_attention
from san.attention.functional import extrema_count
from san.kernels import native
from san.kernels.conv_op import conv2d_backward


def median_ms(fn: Callable[[], object], repeats: int = 20) -> float:
    return median_seconds(fn, warmup=3, repeats=repeats) * 1e3


def module_profile(args: argparse.Namespace) -> None:
    module = create_attention(args.attention, args.channels, prev_channels=args.channels, feature_kernel_size=5)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    if not args.nchw:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    inputs = (x, x.detach()) if module.takes_previous else (x,)
    grad = torch.randn_like(x)
    for _ in range(10):
        module(*inputs).backward(grad)
    steps = 20
    with profile(record_shapes=True) as prof:
        for _ in range(steps):
            module(*inputs).backward(grad)
    events = prof.key_averages(group_by_input_shape=True)
    print(f"{args.attention} on {tuple(x.shape)} ({'NCHW' if args.nchw else 'channels-last'}), per forward+backward:")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"  {event.key[:32]:32s} {event.self_cpu_time_total / steps / 1e3:7.3f} ms  ×{event.count // steps}"
              f"  {str(event.input_shapes)[:70]}")  # fmt: skip
    print(f"  all operations: {sum(e.self_cpu_time_total for e in events) / steps / 1e3:.2f} ms")


def layouts(_: argparse.Namespace) -> None:
    backward = torch.ops.aten.convolution_backward
    print("ms per call | conv (N, Cin→Cout, H, k) | NCHW fwd | NCHW bwd | channels-last fwd | channels-last bwd |")
    for n, cin, cout, size, k in [(64, 2, 1, 28, 7), (64, 6, 6, 28, 5), (64, 16, 16, 10, 5), (8, 64, 64, 112, 7)]:
        x, w, g = torch.randn(n, cin, size, size), torch.randn(cout, cin, k, k), torch.randn(n, cout, size, size)
        figures = []
        padding = [k // 2] * 2
        for layout in (torch.contiguous_format, torch.channels_last):
            xl, gl = x.contiguous(memory_format=layout), g.contiguous(memory_format=layout)
            figures.append(median_ms(lambda xl=xl, w=w, p=padding: F.conv2d(xl, w, padding=p)))
            figures.append(median_ms(lambda xl=xl, gl=gl, w=w, p=padding, bias=[cout]: backward(
                gl, xl, w, bias, [1, 1], p, [1, 1], False, [0, 0], 1, [True, True, True])))  # fmt: skip
        print(f"| {n}, {cin}→{cout}, {size}, {k} | " + " | ".join(f"{f:.2f}" for f in figures) + " |")


def conv_timings(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, padding: tuple, dilation: tuple) -> list[float]:
    """ms of (oneDNN forward, oneDNN backward, direct forward, direct backward) of one conv; x channels-last."""
    g = torch.randn(x.shape[0], w.shape[0], *x.shape[2:]).contiguous(memory_format=torch.channels_last)
    mask = [True, True, True]
    args = ([w.shape[0]], [1, 1], list(padding), list(dilation), False, [0, 0], 1, mask)
    return [
        median_ms(lambda: F.conv2d(x, w, b, padding=padding, dilation=dilation)),
        median_ms(lambda: torch.ops.aten.convolution_backward(g, x, w, *args)),
        median_ms(lambda: native.conv2d(x, w, b, padding, dilation)),
        median_ms(lambda: conv2d_backward(g.contiguous(), x, w, True, padding[0], dilation[0])),
    ]


def direct_convs(_: argparse.Namespace) -> None:
    """Where the direct kernels pay: oneDNN pads channels to blocks of 16, which costs a 1- or 2-channel conv
    16-256× its taps, and a 6-channel one ~7× (SAN's smoothing conv on LeNet-5)."""
    if not (native.enabled() and native.library() is not None):
        print("the C kernels are not built here (no compiler, or SAN_NATIVE_KERNELS=0)")
        return
    print("ms per call | conv (N, Cin→Cout, H, k, dilation) | oneDNN fwd | oneDNN bwd | direct fwd | direct bwd |")
    sites = [(64, 2, 1, 28, 7, 1, "CBAM"), (64, 1, 1, 28, 3, 4, "BAM"), (64, 6, 6, 28, 5, 1, "SAN-c"),
             (64, 6, 6, 14, 5, 1, "SAN-c")]  # fmt: skip
    for n, cin, cout, size, k, d, who in sites:
        x = torch.randn(n, cin, size, size).contiguous(memory_format=torch.channels_last)
        padding, dilation = (d * (k - 1) // 2,) * 2, (d, d)
        figures = conv_timings(x, torch.randn(cout, cin, k, k), torch.randn(cout), padding, dilation)
        print(f"| {who}: {n}, {cin}→{cout}, {size}, {k}, {d} | " + " | ".join(f"{f:.2f}" for f in figures) + " |")


def weighted_doc(y: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    doc = (y - reference).abs()
    return doc * extrema_count(doc) / 9


def weighted_doc_compilable(y: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    doc = (y - reference).abs()
    height, width = doc.shape[-2:]
    padded = F.pad(doc, (1, 1, 1, 1), value=float("inf"))
    count = torch.ones_like(doc)
    for dh in range(3):
        for dw in range(3):
            if (dh, dw) != (1, 1):
                count = count + (doc >= padded[..., dh : dh + height, dw : dw + width])
    return doc * count / 9


def compile_comparison(_: argparse.Namespace) -> None:
    y, reference = torch.randn(8, 64, 112, 112), torch.randn(8, 1, 112, 112)
    start = time.perf_counter()
    compiled = torch.compile(weighted_doc_compilable, dynamic=False)
    torch.testing.assert_close(compiled(y, reference), weighted_doc(y, reference))
    print(f"compile: {time.perf_counter() - start:.1f} s")
    print(f"α·DoC on {tuple(y.shape)}: eager {median_ms(lambda: weighted_doc(y, reference)):.1f} ms, "
          f"torch.compile {median_ms(lambda: compiled(y, reference)):.1f} ms")  # fmt: skip


def compile_model(_: argparse.Namespace) -> None:
    from san.attention import reference_formulation
    from san.registry import build_model

    x = torch.randn(64, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (64,))
    figures: dict[str, tuple[float, float]] = {}
    for attention in ("none", "san-c", "cbam", "bam"):
        torch.manual_seed(0)
        model = build_model("lenet5", 10, attention=attention).to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(net: torch.nn.Module, optimizer: torch.optim.Optimizer = optimizer) -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), target).backward()
            optimizer.step()

        eager = median_ms(lambda model=model, step=step: step(model))
        with reference_formulation():
            compiled_model = torch.compile(model)
            compiled = median_ms(lambda net=compiled_model, step=step: step(net))
        figures[attention] = (eager, compiled)
        base_eager, base_compiled = figures["none"]
        print(f"{attention}: eager {eager:.2f} ms ({eager / base_eager:.2f}× base), torch.compile {compiled:.2f} ms "
              f"({compiled / base_compiled:.2f}× base)", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    module = commands.add_parser("module")
    module.add_argument("--attention", default="cbam", choices=["san-c", "san-d", "cbam", "bam"])
    module.add_argument("--channels", type=int, default=6)
    module.add_argument("--size", type=int, default=28)
    module.add_argument("--batch", type=int, default=64)
    module.add_argument("--nchw", action="store_true")
    module.set_defaults(run=module_profile)
    commands.add_parser("layouts").set_defaults(run=layouts)
    commands.add_parser("compile").set_defaults(run=compile_comparison)
    commands.add_parser("compile-model").set_defaults(run=compile_model)
    commands.add_parser("direct-convs").set_defaults(run=direct_convs)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
