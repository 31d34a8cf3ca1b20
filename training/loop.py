"""The training loop: `train_one_epoch`, `evaluate` (global top-1/top-5) and `train_worker`, the function each
Ray Train worker runs."""

import logging
import math
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from training.config import JobSpec, trusted_spec
from training.data.loaders import make_loader
from training.data.manifest import Manifest, load_manifest
from training.data.series_loader import make_series_loader
from training.schedule import learning_rate, resolution_at
from training.states import JobStatus
from training.stop import Preempted, Stop, StopWatch
from training.tasks import Task, task_of, validation_metrics
from training.tracking import RunLogger

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
ATTENTION_IMAGES = 4  # validation images whose attention maps rank 0 logs at the end (the paper's Fig. 4 and 8)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on conv and linear weights only: none on norm layers and biases (ffcv-imagenet)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, spec: JobSpec) -> torch.optim.Optimizer:
    """The spec's optimizer at LR 0 (the schedule sets it every step), fused: one kernel updates every tensor, where
    torch's default on CPU is a loop over them — BAM's 50 small tensors on LeNet-5 took 0.30 ms a step so, 0.09 ms
    fused (bench/attention_overhead.py steps its models with the same optimizer)."""
    groups, settings = parameter_groups(model, spec.optimizer.weight_decay), spec.optimizer
    if settings.name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=(settings.momentum, 0.999), fused=True)
    return torch.optim.SGD(groups, lr=0.0, momentum=settings.momentum, nesterov=settings.nesterov, fused=True)


def memory_format(spec: JobSpec) -> torch.memory_format:
    """The loader delivers channels-last batches; the model gets the layout the spec asks for."""
    return torch.channels_last if spec.training.channels_last else torch.contiguous_format


def in_layout(inputs: torch.Tensor, spec: JobSpec) -> torch.Tensor:
    """Image batches in the spec's memory format; sequences (N×T×F) have one layout."""
    return inputs.contiguous(memory_format=memory_format(spec)) if inputs.dim() == 4 else inputs


def autocast(spec: JobSpec, device: torch.device):
    if spec.training.amp == "none" or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if spec.training.amp == "bf16" else torch.float16)


def flush_denormals_on_cpu(device: torch.device) -> None:
    """Denormal floats are many times slower on x86 CPUs; a run whose activations or gradients drift into that
    range (a high peak LR) fell to a third of its speed. Flushed to zero, the same run logged the same losses."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)


def train_one_epoch(model, loader, optimizer, scaler, spec: JobSpec, epoch: int, device, world_size: int,
                    resume: dict | None = None, watch: StopWatch | None = None,
                    task: Task | None = None) -> dict:  # fmt: skip
    """One pass over this worker's shard; the LR follows the schedule per iteration. Returns the global mean
    loss, images seen by all workers, seconds, the last LR, the resolution the loader delivered and the steps done.

    ``resume`` (a mid-epoch checkpoint's ``partial``) skips the steps it already holds — the loader repeats an
    epoch's batches exactly, see `epoch_order` — and carries their loss, images and seconds. With ``watch``, the
    ranks agree after every step whether to stop: then ``stop`` is a `Stop` and ``partial`` what a checkpoint needs
    to finish the epoch later."""
    model.train()
    criterion = (task or task_of(loader.manifest, spec.optimizer.label_smoothing)).criterion()
    iterations = len(loader)
    resume = resume or {}
    first = resume.get("step", 0)
    carried = not dist.is_initialized() or dist.get_rank() == 0  # the carried sums are global: counted once
    loss_sum = torch.tensor(resume.get("loss_sum", 0.0) if carried else 0.0, dtype=torch.float64, device=device)
    images = resume.get("images", 0) if carried else 0
    resolution = 0
    lr = learning_rate(spec, epoch + first / iterations, world_size)
    stop, done = None, first
    started = time.perf_counter() - resume.get("seconds", 0.0)
    for step, (inputs, targets) in enumerate(loader):
        resolution = inputs.shape[-1] if inputs.dim() == 4 else inputs.shape[1]  # px, or a sequence's steps
        if step < first:
            continue  # done before the checkpoint this run resumed from
        lr = learning_rate(spec, epoch + step / iterations, world_size)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs = in_layout(inputs, spec)
        optimizer.zero_grad(set_to_none=True)
        with autocast(spec, device):
            loss = criterion(model(inputs), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_sum += loss.detach().double() * len(targets)
        images += len(targets)
        done = step + 1
        if watch is not None and (stop := watch.check(epoch * iterations + done)):
            break
    totals = torch.stack([loss_sum, torch.tensor(float(images), dtype=torch.float64, device=device)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    seconds = time.perf_counter() - started
    partial = {"step": done, "loss_sum": totals[0].item(), "images": int(totals[1].item()), "seconds": seconds}
    return {"loss": (totals[0] / totals[1]).item() if totals[1] else float("nan"), "images": int(totals[1].item()),
            "seconds": seconds, "lr": lr, "resolution": resolution, "steps": done - first, "stop": stop,
            "partial": partial if stop and done < iterations else None}  # fmt: skip


def epoch_order(loader, epoch: int) -> None:
    """FFCV draws an epoch's order from (seed, its count of epochs started): counted from the run's epoch instead,
    a worker restarted mid-run sees the same batches an uninterrupted run would (the augmentations follow the
    batches, `training.data.augment`)."""
    loader.loader.next_epoch = epoch


@torch.no_grad()
def evaluate(model, loader, spec: JobSpec, device, keep: int = 0, task: Task | None = None) -> dict:
    """The task's metrics (`training.tasks`: loss, top-1, top-5, … for classification) over the *whole* validation
    set: every worker sums over its exact shard, then the sums are added across workers (not averaged, not rank 0's
    shard alone) and divided once. With ``keep``, the first ``keep`` inputs of this worker's shard and their targets
    come back too (``sample``), for the attention pictures."""
    task = task or task_of(loader.manifest)
    model.eval()
    totals = torch.zeros(len(task.sums) + 1, dtype=torch.float64, device=device)  # the task's sums, then samples
    sample = None
    # a forecast loader also gives each window's level, which its targets are relative to (training.tasks)
    batches = loader.with_levels() if getattr(loader, "forecast", False) else ((x, y, None) for x, y in loader)
    for inputs, targets, level in batches:
        inputs = in_layout(inputs, spec)
        if sample is None and keep:
            sample = (inputs[:keep].clone(), targets[:keep].clone())
        with autocast(spec, device):
            outputs = model(inputs).float()
            if spec.validation.flip_tta and inputs.dim() == 4:
                outputs = outputs + model(inputs.flip(3)).float()
        totals[:-1] += task.batch_sums(outputs, targets, level)
        totals[-1] += len(targets)
    if dist.is_initialized():
        dist.all_reduce(totals)
    count = int(totals[-1].item())
    return {**validation_metrics(task, totals[:-1], count), "val/images": count, "sample": sample}


def make_loaders(spec: JobSpec, config: dict, train_manifest, device, rank: int, world_size: int):
    """This worker's train loader (a distributed shard, the spec's seed) and validation loader (its exact shard),
    normalised with the train split's statistics: images by `make_loader`, sequences by `make_series_loader`."""
    common = {"device": device, "num_workers": spec.data.loader_workers, "os_cache": spec.data.in_memory,
              "epochs": spec.training.epochs}  # fmt: skip
    train = {"train": True, "batch_size": spec.training.batch_size, "distributed": world_size > 1,
             "seed": spec.training.seed}  # fmt: skip
    val = {"train": False, "batch_size": spec.validation.batch_size,
           "shard": (rank, world_size) if world_size > 1 else None}  # fmt: skip
    if train_manifest.kind == "series":
        return (make_series_loader(config["train_path"], **train, **common),
                make_series_loader(config["val_path"], **val, **common))  # fmt: skip
    common.update(in_chans=train_manifest.channels, mean=train_manifest.mean, std=train_manifest.std)
    return (make_loader(config["train_path"], **train, **common),
            make_loader(config["val_path"], **val, resolution=spec.resolution.val_res, **common))  # fmt: skip


@dataclass
class Worker:
    """What `set_up` gives the rest of the loop: this worker's place, its data, what it trains and how it reports."""

    spec: JobSpec
    rank: int
    world_size: int
    device: torch.device
    manifest: Manifest  # the training set's
    task: Task
    train_loader: Any
    val_loader: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    watch: StopWatch
    logger: RunLogger | None  # rank 0's only


@dataclass
class Progress:
    """Where the model's lineage stands: what `resume` restores from a checkpoint and every epoch adds to."""

    start_epoch: int = 0  # the first epoch this attempt trains
    history: list[dict] = field(default_factory=list)  # each finished epoch's metrics
    best_score: float = -math.inf  # the task's score of the best epoch so far (`training.tasks`: top-1, or -MAE)
    steps: int = 0  # optimizer steps in this model's lineage
    stops: list[dict] = field(default_factory=list)  # the preemptions and cancels it went through
    partial: dict | None = None  # the steps of `start_epoch` a stop's checkpoint holds (`train_one_epoch`'s resume)


def set_up(config: dict) -> Worker:
    """This worker's spec, device, loaders, model, optimizer, scaler, stop watch and (rank 0) run logger."""
    spec = trusted_spec(config["spec_path"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.training.seed)
    flush_denormals_on_cpu(device)
    manifest = load_manifest(Path(config["train_path"]))
    task = task_of(manifest, spec.optimizer.label_smoothing)
    loaders = make_loaders(spec, config, manifest, device, rank, world_size)  # train, validation
    torch.set_num_threads(max(1, int(config.get("torch_threads", 1))))  # ffcv resets it while building loaders
    model = prepared_model(spec, manifest)
    optimizer = make_optimizer(model, spec)
    scaler = torch.amp.GradScaler(device.type, enabled=spec.training.amp == "fp16")
    watch = StopWatch(config.get("stop_file"), rank, world_size)
    logger = None
    if rank == 0:
        logger = RunLogger(config["mlflow_uri"], config["mlflow_run_id"], spec.tracking.system_metrics_interval_s)
        logger.log_model_size(unwrap(model))
    return Worker(spec, rank, world_size, device, manifest, task, *loaders, model, optimizer, scaler, watch, logger)


def prepared_model(spec: JobSpec, manifest: Manifest) -> nn.Module:
    """The spec's model for this data, in the spec's memory format, prepared by Ray Train (DDP, device)."""
    model = spec.build_model(manifest.num_classes, manifest.channels)
    if spec.training.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return ray.train.torch.prepare_model(model)


def resume(worker: Worker) -> Progress:
    """From ``ray.train.get_checkpoint()``, when Ray restarted the workers after a failure or a preemption: the
    weights, optimizer and scaler loaded, and the progress to go on from — the next epoch, or the step a stop
    saved. Epochs the checkpoint holds but the run does not (a previous attempt's last) are logged now."""
    progress, checkpoint = Progress(), ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(Path(directory) / CHECKPOINT_FILE, map_location=worker.device, weights_only=True)
        unwrap(worker.model).load_state_dict(state["model"])
        worker.optimizer.load_state_dict(state["optimizer"])
        worker.scaler.load_state_dict(state["scaler"])
        partial = state["partial"]
        progress = Progress(
            start_epoch=state["epoch"] + (0 if partial else 1),  # a stop's checkpoint holds part of its epoch
            history=state["history"],
            best_score=state["best_score"],
            steps=state["steps"],
            stops=state["stops"],
            partial=partial,
        )
        if partial and worker.rank == 0:
            steps = len(worker.train_loader)
            log.info("resuming epoch %d at step %d of %d", progress.start_epoch + 1, partial["step"], steps)
    if worker.logger:
        worker.logger.log_epochs(progress.history)
    return progress


def state_at(worker: Worker, progress: Progress, epoch: int, partial: dict | None = None) -> dict:
    """What a checkpoint holds: after ``epoch``, or, with ``partial``, ``partial["step"]`` steps into it."""
    return {
        "model": unwrap(worker.model).state_dict(),
        "optimizer": worker.optimizer.state_dict(),
        "scaler": worker.scaler.state_dict(),
        "epoch": epoch,
        "partial": partial,
        "history": progress.history,
        "best_score": progress.best_score,
        "steps": progress.steps,
        "stops": progress.stops,
        "spec": worker.spec.model_dump(mode="json"),
    }


def train_epoch(worker: Worker, progress: Progress, epoch: int) -> dict:
    """`train_one_epoch` at the epoch's resolution and batch order (from the saved step in a restart's first
    epoch); its steps, and the stop it ended at if any, added to ``progress``."""
    spec, loader = worker.spec, worker.train_loader
    if worker.manifest.kind != "series":  # progressive resizing: images only
        loader.set_resolution(resolution_at(spec, epoch, max(worker.manifest.resolution)))
    epoch_order(loader, epoch)
    trained = train_one_epoch(
        worker.model,
        loader,
        worker.optimizer,
        worker.scaler,
        spec,
        epoch,
        worker.device,
        worker.world_size,
        resume=progress.partial if epoch == progress.start_epoch else None,
        watch=worker.watch,
        task=worker.task,
    )
    progress.steps += trained["steps"]
    if trained["stop"]:
        note_stop(worker, progress, epoch, trained["stop"])
    return trained


def note_stop(worker: Worker, progress: Progress, epoch: int, stop: Stop) -> None:
    """A stop the ranks agreed on in ``epoch``, into ``progress.stops`` (and rank 0's log)."""
    progress.stops.append(
        {
            "reason": stop.reason,
            "epoch": epoch,
            "step": stop.at_step - epoch * len(worker.train_loader),
            "at_step": stop.at_step,
            "requested_at_step": stop.requested_at_step,
            "check_every": stop.check_every,
        }
    )
    if worker.rank == 0:
        step, asked = progress.stops[-1]["step"], stop.requested_at_step
        log.warning(
            "%s: stopping at epoch %d step %d (global step %d, asked at %d)",
            stop.reason,
            epoch + 1,
            step,
            stop.at_step,
            asked,
        )


def checkpoint_partial(worker: Worker, progress: Progress, epoch: int, trained: dict) -> None:
    """Stopped mid-epoch: rank 0 checkpoints the steps done, which a restart finishes the epoch from; every worker
    reports it (Ray's barrier)."""
    with tempfile.TemporaryDirectory() as directory:
        saved = None
        if worker.rank == 0:
            torch.save(state_at(worker, progress, epoch, trained["partial"]), Path(directory) / CHECKPOINT_FILE)
            saved = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(
            {"epoch": epoch, "step": trained["partial"]["step"], "stop": trained["stop"].reason}, checkpoint=saved
        )
        if worker.logger:
            worker.logger.log_checkpoint(Path(directory) / CHECKPOINT_FILE, "last")


def end_epoch(worker: Worker, progress: Progress, metrics: dict, stop: Stop | None) -> None:
    """A validated epoch's ``metrics`` into the history, checkpointed when scheduled (Ray keeps the last
    `checkpoint.keep` of these: restart points, and MLflow the latest as checkpoints/last) or when the epoch
    improved (MLflow's checkpoints/best), reported by every worker and logged by rank 0."""
    spec, task, epoch = worker.spec, worker.task, metrics["epoch"]
    progress.history.append(metrics)
    improved = task.score(metrics) > progress.best_score
    progress.best_score = max(progress.best_score, task.score(metrics))
    scheduled = (epoch + 1) % spec.checkpoint.every_epochs == 0 or epoch == spec.training.epochs - 1 or stop is not None
    with tempfile.TemporaryDirectory() as directory:
        path, saved = Path(directory) / CHECKPOINT_FILE, None
        if worker.rank == 0 and (scheduled or improved):
            torch.save(state_at(worker, progress, epoch), path)
            if scheduled:
                saved = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=saved)  # a barrier: every worker calls it once per epoch
        if worker.rank == 0:  # logged, not printed: Ray Train's print patch echoes a print twice on the driver
            log.info(progress_line(metrics, spec.training.epochs, task, worker.manifest.kind == "series"))
        if worker.logger:
            worker.logger.log_epochs(progress.history)
            if scheduled:
                worker.logger.log_checkpoint(path, "last")
            if improved:
                worker.logger.log_checkpoint(path, "best")


def finish(worker: Worker, sample: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """After the last epoch, rank 0 logs the attention maps of a few validation images and the final model, and
    ends the run FINISHED."""
    if worker.logger:
        if sample is not None:
            worker.logger.log_attention_maps(unwrap(worker.model), *sample)
        worker.logger.finish(unwrap(worker.model))


def train_worker(config: dict) -> None:
    """Run by every Ray Train worker. ``config``: the spec's file (`trusted_spec`), the resolved .beton paths, the
    MLflow URI and run id, and the cancel marker (``stop_file``, `training.stop`). Resumes from Ray's checkpoint
    when Ray restarts the workers after a failure or a preemption (`resume`)."""
    worker = set_up(config)
    progress = resume(worker)
    spec, sample = worker.spec, None
    for epoch in range(progress.start_epoch, spec.training.epochs):
        trained = train_epoch(worker, progress, epoch)
        stop = trained["stop"]
        if trained["partial"]:  # stopped mid-epoch: checkpoint the steps done, finish the epoch after a restart
            checkpoint_partial(worker, progress, epoch, trained)
            return stopped(stop, worker.logger)
        last = epoch == spec.training.epochs - 1
        keep = ATTENTION_IMAGES if last and worker.logger else 0  # rank 0 draws the last epoch's attention maps
        validated = evaluate(worker.model, worker.val_loader, spec, worker.device, keep=keep, task=worker.task)
        sample = validated.pop("sample")
        metrics = {
            "epoch": epoch,
            "train/loss": trained["loss"],
            **validated,
            "time/epoch_s": trained["seconds"],
            "throughput/img_s": trained["images"] / trained["seconds"],
            "lr": trained["lr"],
            "resolution": trained["resolution"],  # as delivered, not as planned
            "timestamp_ms": time.time() * 1000,
        }
        end_epoch(worker, progress, metrics, stop)
        if stop and not last:
            return stopped(stop, worker.logger)
    finish(worker, sample)


def stopped(stop: Stop, logger: RunLogger | None) -> None:
    """After a stop's checkpoint: a cancel ends the run KILLED and returns (the driver ends too); a preemption fails
    on purpose, so Ray Train restarts the workers from that checkpoint."""
    if stop.reason == "cancelled":
        if logger:
            logger.end(JobStatus.CANCELLED.mlflow_status())
        return
    raise Preempted(f"SIGTERM: checkpoint at global step {stop.at_step}, resuming from it")


def progress_line(metrics: dict, epochs: int, task: Task, series: bool = False) -> str:
    size, unit = (f"{metrics['resolution']} steps", "samples") if series else (f"{metrics['resolution']} px", "img")
    return (
        f"epoch {metrics['epoch'] + 1}/{epochs}  train/loss {metrics['train/loss']:.4f}  {task.progress(metrics)}  "
        f"{metrics['throughput/img_s']:,.0f} {unit}/s  {metrics['time/epoch_s']:.1f} s  {size}"
    )


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model
