"""Torch's own Linear and BatchNorm against the C that BAM's fused op runs instead (issue 26's rule: keep C only
where torch's op is not within 10 %), on the maps BAM's C path sees: the channel MLP (Linear C → K, BatchNorm1d,
ReLU, Linear K → C) on the (N, C) channel means, and a spatial stage's BatchNorm2d + ReLU on (N, K, H, W), forward
and backward, training (batch statistics, running statistics moved).

The C is native.c's own functions (``san_mlp_forward``/``san_mlp_backward``; ``batch_norm_statistics``,
``batch_norm_apply``, ``batch_norm_backward``), compiled from it with its flags into a harness that loops them
``reps`` times in C, so a ctypes call's cost is not charged to them (inside BAM's op they run within one C call).
Torch runs its ops as a module would: ``F.linear``/``F.batch_norm``/``F.relu`` and ``torch.autograd.grad``. Both
on 1 thread, interleaved round by round; the outputs and gradients are compared first (a benchmark of different
sums would prove nothing).

    python bench/bam_torch_ops.py [--rounds 15] [--quick] [--json PATH]
"""

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads libgomp: the C's OpenMP loops on 1 thread too

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import measured, parse_args, this_command, write_rows
from san.kernels import native

EPS, MOMENTUM = 1e-5, 0.1
# BAM's inputs where its C path runs (branch width = channels // 16 ≤ native.MAX_CHANNELS): LeNet-5's two BAMs at
# batch 64, and ResNet-18's second and third at batch 8 @224.
CASES = [
    ("lenet5 BAM(6)", 64, 6, 28, 28),
    ("lenet5 BAM(16)", 64, 16, 10, 10),
    ("resnet18 BAM(64)", 8, 64, 56, 56),
    ("resnet18 BAM(128)", 8, 128, 28, 28),
]
TARGET = (">", 1.10)  # torch's time / C's: C is kept only while torch is more than 10 % slower

HARNESS = r"""
#include "{source}"

void bench_mlp(long reps, const float *mean, long N, long C, long K, const float *w1, const float *b1,
               const float *gamma, const float *beta, float *running_mean, float *running_var, const float *w2,
               const float *b2, const float *grad_channel, float *channel, float *grad_mean, float *grads,
               float *work) {
    float *hidden = work, *bn_mean = hidden + N * K, *bn_invstd = bn_mean + K, *active = bn_invstd + K,
          *scratch = active + N * K;
    float *gw1 = grads, *gb1 = gw1 + K * C, *ggamma = gb1 + K, *gbeta = ggamma + K, *gw2 = gbeta + K,
          *gb2 = gw2 + C * K;
    for (long r = 0; r < reps; r++) {
        san_mlp_forward(mean, N, C, K, w1, b1, gamma, beta, 1, EPS, MOMENTUM, running_mean, running_var, w2, b2,
                        hidden, bn_mean, bn_invstd, active, channel);
        san_mlp_backward(grad_channel, mean, N, C, K, w1, gamma, 1, w2, hidden, bn_mean, bn_invstd, active, grad_mean,
                         gw1, gb1, ggamma, gbeta, gw2, gb2, scratch);
    }
}

void bench_bn(long reps, const float *y, long N, long K, long P, const float *gamma, const float *beta,
              float *running_mean, float *running_var, const float *grad_out, float *out, float *grad_y,
              float *grads, float *work) {
    float *mean = work, *invstd = work + K;
    for (long r = 0; r < reps; r++) {
        batch_norm_statistics(y, N, K, P, 1, EPS, MOMENTUM, running_mean, running_var, mean, invstd);
        batch_norm_apply(y, N, K, P, 1, gamma, beta, mean, invstd, 1, out);
        for (long i = 0; i < N * K * P; i++) grad_y[i] = out[i] <= 0.0f ? 0.0f : grad_out[i];
        batch_norm_backward(grad_y, y, N, K, P, gamma, 1, mean, invstd, grads, grads + K);
    }
}
"""


def harness() -> ctypes.CDLL:
    """native.c with the two loops above, built as native.py builds it (its compiler, flags and OpenMP)."""
    with tempfile.TemporaryDirectory(prefix="bam_torch_ops_") as directory:
        source, target = Path(directory) / "harness.c", Path(directory) / "harness.so"
        constants = f"#define EPS {EPS}f\n#define MOMENTUM {MOMENTUM}f\n"
        source.write_text(constants + HARNESS.replace("{source}", str(native.SOURCE)))
        compiler = os.environ.get("CC", "cc")
        command = [compiler, *native._FLAGS, "-fopenmp", str(source), "-o", str(target), *native._LIBRARIES]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=180)
        return ctypes.CDLL(str(target))  # loaded: the file may go


def pointer(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


def mlp_case(library: ctypes.CDLL, n: int, c: int, k: int):
    """(torch step, C step of ``reps``, check): the channel MLP forward and backward."""
    torch.manual_seed(0)
    mean = torch.randn(n, c, requires_grad=True)
    w1, b1, w2, b2 = (torch.randn(*shape, requires_grad=True) for shape in ((k, c), (k,), (c, k), (c,)))
    gamma, beta = (torch.rand(k) + 0.5).requires_grad_(), torch.randn(k, requires_grad=True)
    grad_channel = torch.randn(n, c)
    running = [torch.zeros(k), torch.ones(k)]
    inputs = (mean, w1, b1, gamma, beta, w2, b2)

    def torch_step():
        hidden = F.linear(mean, w1, b1)
        active = F.relu(F.batch_norm(hidden, *running, gamma, beta, True, MOMENTUM, EPS))
        channel = F.linear(active, w2, b2)
        return channel, torch.autograd.grad(channel, inputs, grad_channel)

    c_running = [torch.zeros(k), torch.ones(k)]
    channel, grad_mean = torch.empty(n, c), torch.empty(n, c)
    grads, work = torch.empty(2 * k * c + 3 * k + c), torch.empty(3 * n * k + 2 * k)
    plain = [t.detach() for t in inputs]

    def c_step(reps: int):
        library.bench_mlp(
            ctypes.c_long(reps),
            pointer(plain[0]),
            ctypes.c_long(n),
            ctypes.c_long(c),
            ctypes.c_long(k),
            *map(pointer, plain[1:5]),
            *map(pointer, c_running),
            *map(pointer, plain[5:]),
            pointer(grad_channel),
            pointer(channel),
            pointer(grad_mean),
            pointer(grads),
            pointer(work),
        )

    def check():
        out, expected = torch_step()
        c_step(1)
        gw1, gb1, ggamma, gbeta, gw2, gb2 = grads.split([k * c, k, k, k, c * k, c])
        got = [grad_mean, gw1.view(k, c), gb1, ggamma, gbeta, gw2.view(c, k), gb2]
        assert torch.allclose(channel, out, atol=1e-4, rtol=1e-4), "the MLP's outputs differ"
        for a, b in zip(got, expected, strict=True):
            assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), "the MLP's gradients differ"

    return torch_step, c_step, check


def bn_case(library: ctypes.CDLL, n: int, k: int, h: int, w: int):
    """(torch step, C step of ``reps``, check): a spatial stage's BatchNorm2d + ReLU forward and backward."""
    torch.manual_seed(0)
    y = torch.randn(n, k, h, w, requires_grad=True)
    gamma, beta = (torch.rand(k) + 0.5).requires_grad_(), torch.randn(k, requires_grad=True)
    grad_out = torch.randn(n, k, h, w)
    running = [torch.zeros(k), torch.ones(k)]

    def torch_step():
        out = F.relu(F.batch_norm(y, *running, gamma, beta, True, MOMENTUM, EPS))
        return out, torch.autograd.grad(out, (y, gamma, beta), grad_out)

    c_running = [torch.zeros(k), torch.ones(k)]
    out, grad_y, grads, work = torch.empty(n, k, h, w), torch.empty(n, k, h, w), torch.empty(2 * k), torch.empty(2 * k)
    plain_y = y.detach()

    def c_step(reps: int):
        library.bench_bn(
            ctypes.c_long(reps),
            pointer(plain_y),
            ctypes.c_long(n),
            ctypes.c_long(k),
            ctypes.c_long(h * w),
            pointer(gamma.detach()),
            pointer(beta.detach()),
            *map(pointer, c_running),
            pointer(grad_out),
            pointer(out),
            pointer(grad_y),
            pointer(grads),
            pointer(work),
        )

    def check():
        expected_out, expected = torch_step()
        c_step(1)
        assert torch.allclose(out, expected_out, atol=1e-4, rtol=1e-4), "the batch norms' outputs differ"
        for a, b in zip((grad_y, grads[:k], grads[k:]), expected, strict=True):
            assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), "the batch norms' gradients differ"

    return torch_step, c_step, check


def timed(torch_step, c_step, rounds: int, budget_s: float) -> tuple[list[float], list[float]]:
    """µs per forward+backward, one sample per round and side, the sides alternating within each round."""
    for _ in range(20):
        torch_step()
    reps = 1
    while True:  # as many repetitions as take about budget_s for torch's side
        start = time.perf_counter()
        for _ in range(reps):
            torch_step()
        if time.perf_counter() - start > budget_s or reps > 1 << 16:
            break
        reps *= 2
    c_step(reps)
    torch_us, c_us = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            torch_step()
        torch_us.append((time.perf_counter() - start) / reps * 1e6)
        start = time.perf_counter()
        c_step(reps)
        c_us.append((time.perf_counter() - start) / reps * 1e6)
    return torch_us, c_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--budget-s", type=float, default=0.1, help="torch's side per round")
    args = parse_args(parser, quick={"rounds": 5})
    torch.set_num_threads(1)
    library = harness()
    rows, command = [], this_command()
    print("\nBAM's Linear and BatchNorm, forward + backward, training, 1 thread: torch's ops against native.c's\n")
    print("| case | piece | shape | torch µs | C µs | torch / C |")
    print("|---|---|---|---:|---:|---:|")
    for name, n, c, h, w in CASES:
        k = max(c // 16, 1)  # BAM's branch width (reduction 16)
        pieces = [
            ("MLP (Linear, BatchNorm1d, ReLU, Linear)", f"({n}, {c}) → {k}", mlp_case(library, n, c, k)),
            ("BatchNorm2d + ReLU", f"({n}, {k}, {h}, {w})", bn_case(library, n, k, h, w)),
        ]
        for piece, shape, (torch_step, c_step, check) in pieces:
            check()
            torch_us, c_us = timed(torch_step, c_step, args.rounds, args.budget_s)
            ratio = statistics.median(a / b for a, b in zip(torch_us, c_us, strict=True))
            print(
                f"| {name} | {piece} | {shape} | {statistics.median(torch_us):.1f} | {statistics.median(c_us):.1f} "
                f"| {ratio:.2f} |"
            )
            rows.append(
                measured(
                    "attention kernels",
                    f"{name} · {piece} {shape} · torch's ops",
                    torch_us,
                    "µs",
                    baseline="native.c",
                    ratio=ratio,
                    target=TARGET,
                    command=command,
                    note=f"C {statistics.median(c_us):.1f} µs; ratio: median of paired rounds; 1 thread",
                )
            )
    if args.json:
        write_rows(args.json, rows)


if __name__ == "__main__":
    main()
