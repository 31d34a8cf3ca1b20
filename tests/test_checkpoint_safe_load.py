"""Checkpoints resume with ``torch.load(..., weights_only=True)`` (training/loop.py): what the loop saves is tensors
and plain Python types only, so it loads without unpickling arbitrary objects, and a checkpoint that would run code
when unpickled — anyone who can write to the storage root could plant one — is refused."""

import ast
import math
import pickle
import time
from pathlib import Path

import pytest
import torch

from training.config import JobSpec
from training.loop import evaluate, make_optimizer, train_one_epoch
from training.stop import Stop
from training.tasks import Classification

LOOP = Path(__file__).resolve().parent.parent / "training" / "loop.py"
STOP_AT_STEP = 2  # of BATCHES: a mid-epoch stop, so the checkpoint carries a `partial`
BATCHES = 4


def loop_function(name: str) -> ast.FunctionDef:
    (found,) = [
        node
        for node in ast.walk(ast.parse(LOOP.read_text()))
        if isinstance(node, ast.FunctionDef) and node.name == name
    ]
    return found


def constant_keys(node: ast.Dict) -> set[str]:
    return {key.value for key in node.keys if isinstance(key, ast.Constant)}


def state_at_keys() -> set[str]:
    """The keys of the dict ``train_worker``'s ``state_at`` saves."""
    (returned,) = [node.value for node in ast.walk(loop_function("state_at")) if isinstance(node, ast.Return)]
    assert isinstance(returned, ast.Dict)
    return constant_keys(returned)


def history_keys() -> set[str]:
    """The literal keys of an epoch's ``metrics`` in ``train_worker`` (the validation metrics are spread into it)."""
    (metrics,) = [
        node.value
        for node in ast.walk(loop_function("train_worker"))
        if isinstance(node, ast.Assign) and [getattr(target, "id", None) for target in node.targets] == ["metrics"]
    ]
    return constant_keys(metrics)


class StopAt:
    """`training.stop.StopWatch`'s interface: a cancel agreed at a fixed step."""

    def check(self, at_step: int) -> Stop | None:
        return Stop("cancelled", at_step, at_step - 1, 1) if at_step >= STOP_AT_STEP else None


def batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, 1, 28, 28, generator=generator), torch.randint(0, 10, (8,), generator=generator))
        for _ in range(BATCHES)
    ]


def spec_for(optimizer: str) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": {"name": "lenet5", "attention": "san-c"},
            "data": {"train_path": "train.beton", "val_path": "val.beton"},
            "training": {"epochs": 2, "batch_size": 8},
            "optimizer": {"name": optimizer},
        }
    )


def loop_checkpoint(spec: JobSpec, scaler_enabled: bool):
    """A checkpoint as ``train_worker`` saves one at a mid-epoch stop, from a real epoch, validation and stop."""
    torch.manual_seed(0)
    model = spec.build_model(10, 1)
    optimizer = make_optimizer(model, spec)
    # fp16 (the only AMP that enables the scaler) needs a GPU; its state dict is the same on the CPU
    scaler = torch.amp.GradScaler("cpu", enabled=scaler_enabled)
    task, device = Classification(), torch.device("cpu")
    trained = train_one_epoch(model, batches(1), optimizer, scaler, spec, 0, device, 1, task=task)
    validated = evaluate(model, batches(2), spec, device, task=task)
    validated.pop("sample")
    history = [
        {
            "epoch": 0,
            "train/loss": trained["loss"],
            **validated,
            "time/epoch_s": trained["seconds"],
            "throughput/img_s": trained["images"] / trained["seconds"],
            "lr": trained["lr"],
            "resolution": trained["resolution"],
            "timestamp_ms": time.time() * 1000,
        }
    ]
    assert set(history[0]) - set(validated) == history_keys(), "build the history entry as train_worker does"
    stopped = train_one_epoch(model, batches(3), optimizer, scaler, spec, 1, device, 1, watch=StopAt(), task=task)
    stop = stopped["stop"]
    assert stopped["partial"] and stop is not None
    stops = [
        {
            "reason": stop.reason,
            "epoch": 1,
            "step": stop.at_step - BATCHES,
            "at_step": stop.at_step,
            "requested_at_step": stop.requested_at_step,
            "check_every": stop.check_every,
        }
    ]
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": 1,
        "partial": stopped["partial"],
        "history": history,
        "best_score": task.score(history[0]),
        "steps": trained["steps"] + stopped["steps"],
        "stops": stops,
        "spec": spec.model_dump(mode="json"),
    }
    assert set(state) == state_at_keys(), "build the checkpoint as train_worker's state_at does"
    return state, (model, optimizer, scaler)


def test_the_loop_resumes_with_weights_only():
    calls = [
        node
        for node in ast.walk(ast.parse(LOOP.read_text()))
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load"
    ]
    assert calls, "training/loop.py resumes with torch.load"
    for call in calls:
        keywords = {keyword.arg: keyword.value for keyword in call.keywords}
        assert isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value is True


@pytest.mark.parametrize(("optimizer", "scaler_enabled"), [("sgd", False), ("adamw", True)])
def test_a_loop_checkpoint_loads_with_weights_only_and_restores_the_same_state(tmp_path, optimizer, scaler_enabled):
    spec = spec_for(optimizer)
    state, (model, trained_optimizer, scaler) = loop_checkpoint(spec, scaler_enabled)
    path = tmp_path / "checkpoint.pt"
    torch.save(state, path)

    loaded = torch.load(path, map_location="cpu", weights_only=True)

    for key in ("epoch", "partial", "history", "best_score", "steps", "stops", "spec"):
        assert loaded[key] == state[key], key
    assert loaded["scaler"] == scaler.state_dict() and bool(loaded["scaler"]) is scaler_enabled
    fresh = spec.build_model(10, 1)
    fresh.load_state_dict(loaded["model"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    restored = make_optimizer(fresh, spec)
    restored.load_state_dict(loaded["optimizer"])
    before, after = trained_optimizer.state_dict(), restored.state_dict()
    assert before["param_groups"] == after["param_groups"]
    for index, slots in before["state"].items():
        for slot, value in slots.items():
            assert torch.equal(torch.as_tensor(after["state"][index][slot]), torch.as_tensor(value)), (index, slot)
    torch.amp.GradScaler("cpu", enabled=scaler_enabled).load_state_dict(loaded["scaler"])

    torch.save(state | {"epoch": 0, "history": [], "best_score": -math.inf}, path)  # a stop within the first epoch
    assert torch.load(path, map_location="cpu", weights_only=True)["best_score"] == -math.inf


def ran_on_unpickle(marker: str) -> str:
    Path(marker).write_text("unpickling ran this")
    return marker


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return ran_on_unpickle, (str(self.marker),)


def test_a_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "checkpoint.pt"
    torch.save({"model": {"weight": torch.zeros(2)}, "history": [RunsCodeWhenUnpickled(marker)]}, path)

    with pytest.raises(pickle.UnpicklingError, match="ran_on_unpickle"):
        torch.load(path, map_location="cpu", weights_only=True)
    assert not marker.exists()

    torch.load(path, map_location="cpu", weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.read_text() == "unpickling ran this"
