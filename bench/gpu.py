"""SAN on one CUDA GPU: train-step throughput and memory, eager and compiled, and SAN's correctness on the device.

    python bench/gpu.py --out /some/dir            # on a CUDA machine; under 8 minutes on one H200
    python bench/gpu.py --dry-run --out /some/dir  # every code path on CPU at toy sizes (about 30 s on 2 cores)

Imports only torch and `san`, so it runs from a bare checkout: `python bench/gpu.py` from the repository root. In
order, within a global time budget (``--budget-s``; cases that would not fit are recorded as skipped, with why):

1. **train step, eager**: resnet18 and resnet50 × {none, cbam, bam, san-c, san-d} at bottleneck placement, 176 px,
   ImageNet stem, 1000 classes, bf16 autocast + channels_last, SGD with momentum: img/s from the median step time
   (after warm-up, each step between ``torch.cuda.synchronize`` calls) and the peak of
   ``torch.cuda.max_memory_allocated``. The batch starts at 256 (resnet18) / 128 (resnet50) and halves on
   ``torch.cuda.OutOfMemoryError``; the batch used is reported;
2. **train step, torch.compile** (default mode) of the same cases, none and SAN first; a failed compile is that
   row's error, not the run's. Compiles stop early enough to leave ``--reserve-s`` for 3 and 4;
3. **SAN on the GPU vs the CPU**: the san-c and san-d resnet18, same weights, one 4×3×64×64 batch in train mode,
   in fp32 with TF32 off (tolerance 1e-3) and in fp64 (1e-9, which tells a rounding-triggered flip of SAN's
   discrete extrema count from a real difference): logits, input gradient and parameter gradients;
4. **fused path vs the reference formulation** (`san.attention.reference_formulation`): for each attention on the
   resnet18 at 176 px, fp32 and bf16 autocast (channels_last both): the train-step time and peak memory of each,
   the forward + backward time of the attention modules alone on their captured inputs, and the equality of the
   modules' outputs, input gradients and parameter gradients between the two.

Errors are ``max|a - b| / max|b|`` (the largest difference relative to the reference's largest magnitude, so one
tolerance fits logits and tiny gradients alike; a module's or model's parameter gradients are one set). Tolerances:
fp32 1e-3 (a bias before batch norm has a true gradient of 0: its fp32 value is rounding of terms on the scale of
the largest gradient, 1.1e-4 of it seen on CPU), fp64 1e-9, bf16 3e-2 between devices; the fused paths in bf16 are
measured against the float64 truth beside the reference and pass within 1.1× its error + 1e-3. fp32 timings keep
PyTorch's defaults (cuDNN TF32 on).

``--dry-run`` runs all four parts on the CPU, one thread, at toy sizes (resnet18 at 32 px, batch 2, one warm-up and
one timed step; compiled only resnet18 × san-d, with the ``aot_eager`` backend: inductor would need minutes of
C++ compiles) and writes the same files; the device-vs-CPU check then compares the CPU with itself.

Writes ``gpu.json`` (machine, configuration, every row) and ``gpu.md`` (the tables) into ``--out`` (default
``bench/results/gpu``), atomically, after every case, so a run cut short still leaves what it measured
(``"status": "running"``). Without CUDA and without ``--dry-run`` it prints ``no CUDA device: ...`` and exits 0
writing nothing, so an earlier GPU result is never overwritten by a CPU machine.
"""

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from san.attention import attention_modules, reference_formulation  # noqa: E402
from san.registry import build_model  # noqa: E402

PLACEMENT = "bottleneck"
NUM_CLASSES = 1000
# Train-step cases of the compiled phase run in this order: the bare model and SAN before the competitors.
ATTENTION_PRIORITY = ("none", "san-c", "san-d", "cbam", "bam")
SAN_ATTENTIONS = ("san-c", "san-d")
# Largest error relative to the reference's peak magnitude; bf16 has an 8-bit mantissa (2^-8 ≈ 0.004 per op).
TOLERANCE = {"fp32": 1e-3, "fp64": 1e-9, "bf16": 3e-2}
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Config:
    device: str
    dry_run: bool
    models: tuple[tuple[str, int], ...]  # (model, starting batch)
    attentions: tuple[str, ...]
    size: int
    warmup: int
    steps: int
    compile_backend: str
    # None: compile every train-step case; otherwise only these (model, attention) pairs.
    compile_cases: tuple[tuple[str, str], ...] | None
    check_model: str
    check_shape: tuple[int, int, int, int]
    fused_model: str
    fused_size: int
    fused_batch: int
    budget_s: float
    reserve_s: float
    # First guesses of a case's wall time, until one has been measured.
    eager_estimate_s: float
    compile_estimate_s: float
    check_estimate_s: float


def make_config(args: argparse.Namespace) -> Config:
    common = {"attentions": ("none", "cbam", "bam", "san-c", "san-d"), "budget_s": args.budget_s}
    if args.dry_run:
        return Config(
            device="cpu", dry_run=True, models=(("resnet18", 2),), size=32,
            warmup=1, steps=1, compile_backend=args.compile_backend or "aot_eager",
            # Inductor needs ~100 s for one resnet18 on 2 CPU cores; aot_eager still traces forward and backward.
            compile_cases=(("resnet18", "san-d"),),
            check_model="resnet18", check_shape=(2, 3, 32, 32), fused_model="resnet18", fused_size=32,
            fused_batch=2, reserve_s=args.reserve_s, eager_estimate_s=1, compile_estimate_s=10, check_estimate_s=2,
            **common,
        )  # fmt: skip
    return Config(
        device="cuda", dry_run=False, models=(("resnet18", 256), ("resnet50", 128)), size=176,
        warmup=args.warmup, steps=args.steps, compile_backend=args.compile_backend or "inductor", compile_cases=None,
        check_model="resnet18", check_shape=(4, 3, 64, 64), fused_model="resnet18", fused_size=176, fused_batch=128,
        reserve_s=args.reserve_s, eager_estimate_s=5, compile_estimate_s=60, check_estimate_s=10, **common,
    )  # fmt: skip


class Budget:
    """The run's wall-clock budget; each phase asks before a case whether its estimate still fits."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.start = time.perf_counter()
        self.longest: dict[str, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def skip_reason(self, kind: str, first_guess_s: float, reserve_s: float = 0.0) -> str | None:
        estimate = self.longest.get(kind, first_guess_s)
        limit = self.total_s - reserve_s
        if self.elapsed() + estimate <= limit:
            return None
        return (
            f"time budget: {self.elapsed():.0f} s spent, a {kind} case takes ~{estimate:.0f} s, "
            f"this phase ends at {limit:.0f} s (--budget-s {self.total_s:.0f})"
        )

    def record(self, kind: str, seconds: float) -> None:
        self.longest[kind] = max(seconds, self.longest.get(kind, 0.0))


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device.type,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": props.name,
            "gpu_count": torch.cuda.device_count(),
            "compute_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        }
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()  # compiled models hold reference cycles; their CUDA memory returns only after a collection
        torch.cuda.empty_cache()


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def formulation(reference: bool) -> contextlib.AbstractContextManager[Any]:
    return reference_formulation() if reference else contextlib.nullcontext()


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off: equality checks compare fp32 arithmetic, not TF32's 10-bit mantissa."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> tuple[float, list[float]]:
    """(seconds of the first call, which includes any compile; seconds of each timed call after the warm-up)."""
    first, timed = 0.0, []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        seconds = time.perf_counter() - start
        if i == 0:
            first = seconds
        if i >= warmup:
            timed.append(seconds)
    return first, timed


def peak_memory_mib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def build(model_name: str, attention: str, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    with device:  # initialising on the device is several times faster than on the CPU and a copy
        return build_model(model_name, NUM_CLASSES, attention=attention, placement=PLACEMENT, stem="imagenet")


def train_step(
    cfg: Config,
    model_name: str,
    attention: str,
    batch: int,
    size: int,
    precision: str,
    compiled: bool = False,
    reference: bool = False,
) -> dict[str, Any]:
    """Time forward + backward + SGD step on random data; returns the measurement row."""
    device = torch.device(cfg.device)
    model = build(model_name, attention, device).to(memory_format=torch.channels_last).train()
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model, backend=cfg.compile_backend) if compiled else model
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = F.cross_entropy(forward(x), target)
        loss.backward()
        optimizer.step()

    reset_peak_memory(device)
    with formulation(reference):
        first, timed = time_steps(step, cfg.warmup, cfg.steps, device)
    median = statistics.median(timed)
    return {
        "status": "ok",
        "batch": batch,
        "img_per_s": round(batch / median, 1),
        "step_ms": round(median * 1e3, 3),
        "step_ms_min": round(min(timed) * 1e3, 3),
        "step_ms_max": round(max(timed) * 1e3, 3),
        "first_step_s": round(first, 3),
        "peak_memory_mib": peak_memory_mib(device),
        "params": params,
    }


def with_batch_that_fits(device: torch.device, batch: int, run: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    while True:
        try:
            return run(batch)
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        # Outside the except block: the traceback's frames, which hold the failed step's tensors, are gone.
        release(device)
        print(f"    out of memory at batch {batch}; retrying at {batch // 2}", flush=True)
        batch //= 2


def guarded(label: str, device: torch.device, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one case; an exception becomes the row's error instead of ending the benchmark."""
    start = time.perf_counter()
    try:
        row = run()
    except Exception as error:
        traceback.print_exc(limit=4, file=sys.stderr)
        row = {"status": "error", "error": f"{type(error).__name__}: {error}"[:2000]}
    release(device)
    row["wall_s"] = round(time.perf_counter() - start, 2)
    print(f"  {label}: {summary(row)} ({row['wall_s']:.1f} s)", flush=True)
    return row


def summary(row: dict[str, Any]) -> str:
    if row["status"] == "ok":
        if "img_per_s" in row:
            memory = "" if row["peak_memory_mib"] is None else f", {row['peak_memory_mib']:.0f} MiB"
            return f"batch {row['batch']}, {row['img_per_s']:.0f} img/s{memory}"
        return "ok"
    return f"{row['status']}: {first_line(row.get('error') or row.get('reason', ''))}"


def skipped(reason: str) -> dict[str, Any]:
    return {"status": "skipped", "reason": reason}


def relative_error(actual: Sequence[Tensor | None], expected: Sequence[Tensor | None]) -> float:
    """max|a - e| over the pairs / max|e| over the expected tensors; inf for a missing side or a non-finite value.

    One scale for a set of tensors: a bias followed by batch norm has a gradient of pure rounding noise, which
    measured against its own size would be all error.
    """
    difference = scale = 0.0
    for a, e in zip(actual, expected, strict=True):
        if a is None and e is None:
            continue
        if a is None or e is None:
            return float("inf")
        wide = torch.float64 if torch.float64 in (a.dtype, e.dtype) else torch.float32
        a, e = a.detach().to(wide), e.detach().to(device=a.device, dtype=wide)
        if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
            return float("inf")
        scale = max(scale, e.abs().max().item())
        difference = max(difference, (a - e).abs().max().item())
    return difference / scale if scale > 0 else difference


ERROR_KINDS = ("output", "input_grad", "param_grad")


def add_errors(errors: dict[str, float], actual: tuple, expected: tuple) -> None:
    """Raise ``errors`` to this module's: output, each input's gradient, its parameter gradients together."""
    (output, input_grads, param_grads), (ref_output, ref_input_grads, ref_param_grads) = actual, expected
    errors["output"] = max(errors["output"], relative_error([output], [ref_output]))
    for grad, ref_grad in zip(input_grads, ref_input_grads, strict=True):
        errors["input_grad"] = max(errors["input_grad"], relative_error([grad], [ref_grad]))
    module_error = relative_error([param_grads[name] for name in ref_param_grads], list(ref_param_grads.values()))
    errors["param_grad"] = max(errors["param_grad"], module_error)


def as_close_as_reference(errors: dict[str, float], reference_errors: dict[str, float]) -> dict[str, Any]:
    """The bf16 equality record: per kind, the fast path no farther from the float64 truth than the reference
    (10 % and 1e-3 of slack), the rule tests/test_attention_fused.py applies on CPU to all gradients at once."""
    record = comparison(errors, float("inf"))
    reference = comparison(reference_errors, float("inf"))["errors"]  # non-finite: null, and a failure
    record.update(tolerance=None, reference_errors=reference)
    record["ok"] = record["ok"] and all(
        reference[k] is not None and errors[k] <= 1.1 * reference[k] + 1e-3 for k in ERROR_KINDS
    )
    return record


def comparison(errors: dict[str, float], tolerance: float) -> dict[str, Any]:
    """One equality record; infinite errors are stored as null (JSON has no infinity) and fail."""
    finite = {name: (error if error != float("inf") else None) for name, error in errors.items()}
    ok = all(error is not None and error <= tolerance for error in finite.values())
    return {"errors": finite, "tolerance": tolerance, "ok": ok}


def forward_backward(
    model: nn.Module, x: Tensor, target: Tensor, device: torch.device
) -> tuple[Tensor, Tensor | None, dict[str, Tensor | None]]:
    leaf = x.detach().to(device, copy=True).requires_grad_(True)
    logits = model(leaf)
    F.cross_entropy(logits, target.to(device)).backward()
    return logits.detach(), leaf.grad, {name: p.grad for name, p in model.named_parameters()}


def device_vs_cpu(cfg: Config, attention: str, dtype_name: str) -> dict[str, Any]:
    """The same model and batch on the benchmark device and on the CPU: logits, input and parameter gradients."""
    device = torch.device(cfg.device)
    torch.manual_seed(0)
    cpu_model = build_model(cfg.check_model, NUM_CLASSES, attention=attention, placement=PLACEMENT, stem="imagenet")
    cpu_model = cpu_model.to(DTYPES[dtype_name]).train()
    device_model = copy.deepcopy(cpu_model).to(device)
    x = torch.randn(cfg.check_shape, dtype=DTYPES[dtype_name])
    target = torch.randint(0, NUM_CLASSES, (cfg.check_shape[0],))
    with exact_fp32():
        expected = forward_backward(cpu_model, x, target, torch.device("cpu"))
        actual = forward_backward(device_model, x, target, device)
    errors = {
        "output": relative_error([actual[0]], [expected[0]]),
        "input_grad": relative_error([actual[1]], [expected[1]]),
        "param_grad": relative_error([actual[2][name] for name in expected[2]], list(expected[2].values())),
    }
    return {"status": "ok", **comparison(errors, TOLERANCE[dtype_name])}


def capture_attention_inputs(model: nn.Module, x: Tensor, precision: str) -> list[tuple[nn.Module, tuple[Tensor, ...]]]:
    """Each attention module with the inputs it receives in one forward pass of ``model``."""
    captured: list[tuple[nn.Module, tuple[Tensor, ...]]] = []

    def keep(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        captured.append((module, tuple(arg.detach().clone() for arg in args)))

    hooks = [module.register_forward_pre_hook(keep) for module in attention_modules(model).values()]
    try:
        with torch.no_grad(), autocast(x.device, precision):
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


def attention_forward_backward(
    module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor | None, precision: str
) -> tuple[Tensor, list[Tensor | None], dict[str, Tensor | None]]:
    """One forward + backward of ``module`` on fresh leaf copies of ``inputs``: (output, input grads, param grads).
    ``grad_output`` None: a seeded random one."""
    leaves = [arg.detach().clone().requires_grad_(arg.is_floating_point()) for arg in inputs]
    module.zero_grad(set_to_none=True)
    with autocast(leaves[0].device, precision):
        output = module(*leaves)
    if grad_output is None:
        torch.manual_seed(1)
        grad_output = torch.randn_like(output)
    output.backward(grad_output)
    return output.detach(), [leaf.grad for leaf in leaves], {n: p.grad for n, p in module.named_parameters()}


def fast_vs_reference(cfg: Config, attention: str, precision: str) -> dict[str, Any]:
    """The fused fast path against the step-by-step reference: equality per attention module, the attention
    modules' own forward + backward time, and the whole train step's time and memory."""
    device = torch.device(cfg.device)
    model = build(cfg.fused_model, attention, device).to(memory_format=torch.channels_last).train()
    torch.manual_seed(0)
    x = torch.randn(cfg.fused_batch, 3, cfg.fused_size, cfg.fused_size, device=device)
    captured = capture_attention_inputs(model, x.contiguous(memory_format=torch.channels_last), precision)
    del x

    # fp32: the fast path against the reference. bf16: both against the float64 truth, since two correct bf16
    # computations in a different order differ by bf16's own error (~0.07 of BAM's input gradient on CPU).
    errors = dict.fromkeys(ERROR_KINDS, 0.0)
    reference_errors = dict.fromkeys(ERROR_KINDS, 0.0)
    with exact_fp32() if precision == "fp32" else contextlib.nullcontext():
        for module, inputs in captured:
            output, input_grads, param_grads = attention_forward_backward(module, inputs, None, precision)
            torch.manual_seed(1)
            grad_output = torch.randn_like(output)
            with reference_formulation():
                reference = attention_forward_backward(module, inputs, grad_output, precision)
                if precision == "bf16":  # the truth from the reference formulation, independent of the fused code
                    truth = attention_forward_backward(
                        copy.deepcopy(module).double(), tuple(t.double() for t in inputs), grad_output.double(), "fp64"
                    )
            if precision == "bf16":
                add_errors(errors, (output, input_grads, param_grads), truth)
                add_errors(reference_errors, reference, truth)
            else:
                add_errors(errors, (output, input_grads, param_grads), reference)

    def attention_step() -> None:
        for module, inputs in captured:
            attention_forward_backward(module, inputs, None, precision)

    attention_ms = {}
    for mode, reference in (("fast", False), ("reference", True)):
        with formulation(reference):
            _, timed = time_steps(attention_step, cfg.warmup, cfg.steps, device)
        attention_ms[mode] = round(statistics.median(timed) * 1e3, 3)
    modules = len(captured)
    captured.clear()
    del model
    release(device)

    steps = {}
    for mode, reference in (("fast", False), ("reference", True)):
        steps[mode] = with_batch_that_fits(
            device,
            cfg.fused_batch,
            lambda batch, reference=reference: train_step(
                cfg, cfg.fused_model, attention, batch, cfg.fused_size, precision, reference=reference
            ),
        )
        release(device)
    return {
        "status": "ok",
        "train_step": steps,
        "train_step_speedup": round(steps["reference"]["step_ms"] / steps["fast"]["step_ms"], 3),
        "attention_only_ms": attention_ms,
        "attention_only_speedup": round(attention_ms["reference"] / attention_ms["fast"], 3),
        "attention_modules": modules,
        "equality": comparison(errors, TOLERANCE[precision])
        if precision != "bf16"
        else as_close_as_reference(errors, reference_errors),
    }


class Report:
    """The run's results, written as gpu.json and gpu.md after every case."""

    def __init__(self, cfg: Config, out: Path, device: torch.device) -> None:
        self.out = out
        self.data: dict[str, Any] = {
            "status": "running",
            "dry_run": cfg.dry_run,
            "machine": machine_info(device),
            "config": asdict(cfg),
            "elapsed_s": 0.0,
            "train": [],
            "device_vs_cpu": [],
            "fused": [],
        }

    def save(self, elapsed_s: float, status: str = "running") -> None:
        self.data["status"] = status
        self.data["elapsed_s"] = round(elapsed_s, 1)
        write_atomic(self.out / "gpu.json", json.dumps(self.data, indent=2, allow_nan=False) + "\n")
        write_atomic(self.out / "gpu.md", render_markdown(self.data))


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def first_line(text: str, limit: int = 160) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def fmt(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def fmt_error(value: float | None) -> str:
    return "inf/nan" if value is None else f"{value:.1e}"


def render_markdown(data: dict[str, Any]) -> str:
    cfg, machine = data["config"], data["machine"]
    where = machine.get("gpu", f"CPU ({machine['cpu_count']} cores)")
    lines = [
        "# SAN on one GPU" + (" (dry run on CPU: toy sizes, not a measurement)" if data["dry_run"] else ""),
        "",
        f"{where}; torch {machine['torch']}, CUDA {machine['cuda']}, cuDNN {machine['cudnn']}, Python "
        f"{machine['python']}; {machine['date_utc']}. Status: **{data['status']}** after {data['elapsed_s']:.0f} s "
        f"(budget {cfg['budget_s']:.0f} s).",
        "",
        f"## Train step: bf16 autocast + channels_last, {cfg['size']} px, {PLACEMENT} placement",
        "",
        f"Median of {cfg['steps']} steps after {cfg['warmup']} warm-up; forward + backward + SGD step, "
        f"{NUM_CLASSES} classes. × none: img/s relative to the bare model of the same mode. Compiled: "
        f"`torch.compile(backend={cfg['compile_backend']!r})`; compile s is the first step.",
        "",
        "| model | attention | batch | eager img/s | × none | eager peak MiB | compiled img/s | × none "
        "| compiled peak MiB | compile s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    base = {
        (row["model"], mode): row[mode].get("img_per_s") for row in data["train"] if row["attention"] == "none"
        for mode in ("eager", "compiled")
    }  # fmt: skip
    for row in data["train"]:
        cells = [row["model"], row["attention"], str(row["eager"].get("batch", "–"))]
        for mode in ("eager", "compiled"):
            result = row[mode]
            speed, base_speed = result.get("img_per_s"), base.get((row["model"], mode))
            ratio = speed / base_speed if speed and base_speed else None
            cells += [fmt(speed), fmt(ratio, 2), fmt(result.get("peak_memory_mib"))]
            if result["status"] != "ok":
                notes.append(f"- {row['model']} × {row['attention']}, {mode}: {summary(result)}")
            elif mode == "compiled" and result["batch"] != row["eager"].get("batch"):
                notes.append(f"- {row['model']} × {row['attention']}, compiled: batch {result['batch']}")
        cells.append(fmt(row["compiled"].get("first_step_s"), 1))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *notes] if notes else []

    lines += [
        "",
        f"## SAN on {machine['device']} vs CPU",
        "",
        f"{cfg['check_model']}, same weights, one {'×'.join(map(str, cfg['check_shape']))} batch in train mode, "
        "TF32 off. Error: max|device − CPU| / max|CPU|, over all parameters at once for their gradients. SAN's "
        "extrema count is discrete: a last-bit difference can flip one count, which fails fp32 alone; a real "
        "difference fails fp64 too.",
        "",
        "| model | attention | dtype | logits | input grad | param grad | tolerance | equal |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for row in data["device_vs_cpu"]:
        if row["status"] != "ok":
            lines.append(f"| {row['model']} | {row['attention']} | {row['dtype']} | {summary(row)} | | | | |")
            continue
        errors = row["errors"]
        lines.append(
            f"| {row['model']} | {row['attention']} | {row['dtype']} | {fmt_error(errors['output'])} "
            f"| {fmt_error(errors['input_grad'])} | {fmt_error(errors['param_grad'])} | {row['tolerance']:.0e} "
            f"| {'yes' if row['ok'] else '**no**'} |"
        )

    lines += [
        "",
        f"## Fused path vs reference formulation ({machine['device']})",
        "",
        f"{cfg['fused_model']} at {cfg['fused_size']} px, channels_last, eager. Train step: the whole step, batch "
        f"{cfg['fused_batch']} (or the largest half that fits); attention only: forward + backward of every "
        "attention module on the inputs it received in the model. Speedup: reference time / fast time. Errors: "
        "max|fast − reference| / max|reference|, the worst module (parameter gradients: each module's together); "
        "bf16: the fast path's and the reference's errors against float64, the fast one within 1.1× + 1e-3.",
        "",
        "| attention | precision | step ms fast | step ms ref | speedup | peak MiB fast | peak MiB ref "
        "| attn ms fast | attn ms ref | speedup | output | input grad | param grad | equal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in data["fused"]:
        if row["status"] != "ok":
            lines.append(f"| {row['attention']} | {row['precision']} | {summary(row)} |" + " |" * 11)
            continue
        fast, ref = row["train_step"]["fast"], row["train_step"]["reference"]
        errors, equality = row["equality"]["errors"], row["equality"]
        lines.append(
            f"| {row['attention']} | {row['precision']} | {fmt(fast['step_ms'], 1)} | {fmt(ref['step_ms'], 1)} "
            f"| {row['train_step_speedup']:.2f} | {fmt(fast['peak_memory_mib'])} | {fmt(ref['peak_memory_mib'])} "
            f"| {fmt(row['attention_only_ms']['fast'], 2)} | {fmt(row['attention_only_ms']['reference'], 2)} "
            f"| {row['attention_only_speedup']:.2f} | {fmt_error(errors['output'])} "
            f"| {fmt_error(errors['input_grad'])} | {fmt_error(errors['param_grad'])} "
            f"| {'yes' if equality['ok'] else '**no**'} ({bound(equality)}) |"
        )
    return "\n".join(lines) + "\n"


def bound(equality: dict[str, Any]) -> str:
    if equality["tolerance"] is not None:
        return f"≤ {equality['tolerance']:.0e}"
    reference = equality["reference_errors"]
    return "vs fp64, reference " + " / ".join(fmt_error(reference[kind]) for kind in ERROR_KINDS)


def run(cfg: Config, out: Path) -> dict[str, Any]:
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # training's usual setting: the fastest conv algorithm per shape
    else:
        # Toy sizes gain nothing from threads, and on a busy CPU an OpenMP barrier can turn a 0.2 ms batch norm
        # into 50 ms.
        torch.set_num_threads(1)
    budget = Budget(cfg.budget_s)
    report = Report(cfg, out, device)
    print(f"bench/gpu.py on {report.data['machine'].get('gpu', 'CPU')}; results in {out}", flush=True)

    def attempt(
        label: str, kind: str, first_guess_s: float, work: Callable[[], dict[str, Any]], reserve_s: float = 0.0
    ) -> dict[str, Any]:
        reason = budget.skip_reason(kind, first_guess_s, reserve_s)
        if reason:
            print(f"  {label}: skipped, {reason}", flush=True)
            return skipped(reason)
        row = guarded(label, device, work)
        budget.record(kind, row["wall_s"])
        return row

    print("train step, eager", flush=True)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for model_name, start_batch in cfg.models:
        for attention in cfg.attentions:
            row = {"model": model_name, "attention": attention, "size": cfg.size, "precision": "bf16"}
            row["memory_format"] = "channels_last"
            row["eager"] = attempt(
                f"{model_name} × {attention}",
                "eager",
                cfg.eager_estimate_s,
                lambda m=model_name, a=attention, b=start_batch: with_batch_that_fits(
                    device, b, lambda batch: train_step(cfg, m, a, batch, cfg.size, "bf16")
                ),
            )
            row["compiled"] = skipped("not reached")
            rows[model_name, attention] = row
            report.data["train"].append(row)
            report.save(budget.elapsed())

    print(f"train step, torch.compile (backend {cfg.compile_backend})", flush=True)
    for model_name, attention in sorted(rows, key=lambda key: ATTENTION_PRIORITY.index(key[1])):
        row = rows[model_name, attention]
        if cfg.compile_cases is not None and (model_name, attention) not in cfg.compile_cases:
            cases = ", ".join(f"{m} × {a}" for m, a in cfg.compile_cases)
            row["compiled"] = skipped(f"dry run compiles only {cases}")
            continue

        def compiled_case(
            m: str = model_name, a: str = attention, b: int = row["eager"].get("batch", dict(cfg.models)[model_name])
        ) -> dict[str, Any]:
            torch.compiler.reset()  # one model instance per compile: stay clear of Dynamo's recompile limit
            try:
                result = with_batch_that_fits(
                    device, b, lambda batch: train_step(cfg, m, a, batch, cfg.size, "bf16", compiled=True)
                )
            finally:
                torch.compiler.reset()
            return result | {"backend": cfg.compile_backend}

        label = f"{model_name} × {attention} compiled"
        row["compiled"] = attempt(label, "compiled", cfg.compile_estimate_s, compiled_case, cfg.reserve_s)
        report.save(budget.elapsed())

    print(f"SAN on {device.type} vs CPU", flush=True)
    for attention in SAN_ATTENTIONS:
        for dtype_name in ("fp32", "fp64"):
            row = {"model": cfg.check_model, "attention": attention, "dtype": dtype_name}
            row |= attempt(
                f"{attention} {dtype_name}",
                "check",
                cfg.check_estimate_s,
                lambda a=attention, d=dtype_name: device_vs_cpu(cfg, a, d),
            )
            report.data["device_vs_cpu"].append(row)
            report.save(budget.elapsed())

    print("fused path vs reference formulation", flush=True)
    for attention in (a for a in ATTENTION_PRIORITY if a != "none" and a in cfg.attentions):
        for precision in ("fp32", "bf16"):
            row = {"model": cfg.fused_model, "size": cfg.fused_size, "attention": attention, "precision": precision}
            row |= attempt(
                f"{attention} {precision}",
                "check",
                cfg.check_estimate_s,
                lambda a=attention, p=precision: fast_vs_reference(cfg, a, p),
            )
            report.data["fused"].append(row)
            report.save(budget.elapsed())

    report.save(budget.elapsed(), status="complete")
    print(f"done in {budget.elapsed():.0f} s: {out / 'gpu.json'}, {out / 'gpu.md'}", flush=True)
    return report.data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "gpu")
    parser.add_argument("--dry-run", action="store_true", help="every code path on CPU at toy sizes")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget for all measurements")
    parser.add_argument(
        "--reserve-s", type=float, default=60.0, help="part of the budget the compiled phase leaves to the checks"
    )
    parser.add_argument("--warmup", type=int, default=10, help="warm-up steps per case (GPU)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per case (GPU)")
    parser.add_argument("--compile-backend", help="torch.compile backend (default: inductor; aot_eager on a dry run)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda}); nothing measured, nothing written (--dry-run runs every path on CPU)"
        )
        return 0
    run(make_config(args), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
