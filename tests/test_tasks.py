"""The tasks' metrics (Tables VI and VII) on hand-computed batches, and a series study's table and formats."""

import csv
import io
import math

import pytest
import torch

from training.report import build_table, markdown, to_csv
from training.study import Observation, StudySpec, expand
from training.tasks import Classification, Forecast, validation_metrics


def test_classification_sums_loss_hits_and_the_softmax_mae():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    targets = torch.tensor([0, 1])
    task = Classification()
    metrics = validation_metrics(task, task.batch_sums(logits, targets), 2)
    probabilities = logits.softmax(dim=1)
    loss = -(math.log(probabilities[0, 0]) + math.log(probabilities[1, 1])) / 2
    # |p - onehot| averaged over the 3 classes, then over the 2 samples
    mae = ((1 - probabilities[0, 0]) * 2 / 3 + (1 - probabilities[1, 1]) * 2 / 3) / 2
    assert metrics["val/loss"] == pytest.approx(loss)
    assert metrics["val/top1"] == 0.5 and metrics["val/top5"] == 1.0  # 3 classes: top-5 is every class
    assert metrics["val/mae"] == pytest.approx(float(mae))


def test_forecast_mae_is_in_the_datas_units_and_cosine_in_normalised_ones():
    outputs = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    targets = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    task = Forecast(target_std=(10.0,))
    metrics = validation_metrics(task, task.batch_sums(outputs, targets), 2)
    normalised_mae = ((1 + 1) / 2 + (1 + 1) / 2) / 2
    assert metrics["val/loss"] == pytest.approx(normalised_mae)
    assert metrics["val/mae"] == pytest.approx(10 * normalised_mae)
    assert metrics["val/cosine"] == pytest.approx((0.0 + 1.0) / 2)  # orthogonal, then parallel
    assert task.score(metrics) == -metrics["val/mae"]  # the best epoch: the lowest error
    # relative targets: the cosine is of the forecasts (level added back), the errors unchanged
    level = torch.tensor([[1.0], [-1.0]])
    relative = validation_metrics(task, task.batch_sums(outputs - level, targets - level, level), 2)
    assert relative["val/mae"] == pytest.approx(metrics["val/mae"])
    assert relative["val/cosine"] == pytest.approx(metrics["val/cosine"])
    two_targets = Forecast(target_std=(10.0, 100.0))  # horizon 2 × targets (a, b), step by step: a0 b0 a1 b1
    errors = validation_metrics(two_targets, two_targets.batch_sums(torch.zeros(1, 4), torch.ones(1, 4)), 1)
    assert errors["val/mae"] == pytest.approx((10 + 100 + 10 + 100) / 4)


def series_history(cosine: float, mae: float) -> list[dict[str, float]]:
    return [{"val/cosine": cosine - 0.1, "val/mae": mae + 5, "time/epoch_s": 2.0},
            {"val/cosine": cosine, "val/mae": mae, "time/epoch_s": 2.0}]  # fmt: skip


def test_a_forecast_studys_table_shows_cosine_and_mae_beside_the_papers():
    spec = StudySpec.load("configs/studies/table7-forecast.yaml")
    assert spec.table_metrics == ("cosine", "mae")
    expansion = expand(spec)
    runs = {c.cell for c in expansion.children}
    values = {cell: (0.9 + index / 100, 30.0 - index) for index, cell in enumerate(sorted(runs))}
    observations = [Observation(c.cell, c.seed, "succeeded", series_history(*values[c.cell]), 1000)
                    for c in expansion.children]  # fmt: skip
    table = build_table(expansion, observations)
    cells = {cell["key"]: cell for cell in table["cells"]}
    assert table["metrics"] == ["cosine", "mae"]
    base, san_full = cells["c000"], next(c for c in table["cells"] if c["labels"]["model.attention"] == "SAN"
                                          and c["values"]["model.placement"] == "full")  # fmt: skip
    assert base["mae"]["mean"] == pytest.approx(values["c000"][1]) and base["mae"]["std"] == 0
    diff = san_full["diff_mae"]
    assert diff["mean"] == pytest.approx(values[san_full["key"]][1] - values["c000"][1]) and diff["mean"] < 0
    assert diff["better"] == 3 and diff["positive"] == 0  # lower error on every seed: better, not positive
    text = markdown(table)
    lines = text.splitlines()
    assert lines[0].startswith("### table7-forecast: cos. sim. / MAE, mean ± std over 3 seeds")
    assert lines[1] == ("| Module | bottleneck cos. sim. | bottleneck MAE | bottleneck paper cos. sim. "
                        "| bottleneck paper MAE | full cos. sim. | full MAE | full paper cos. sim. "
                        "| full paper MAE |")  # fmt: skip
    assert lines[3].startswith(f"| Base Model | {values['c000'][0]:.4f} ± 0.0000 | {values['c000'][1]:.4f} ± 0.0000 "
                               "| 0.9672 | 40.88 |")  # fmt: skip
    assert "| Δ cos. sim. vs baseline (paired) | 95 % CI | Δ > 0 | seeds to resolve |" in text
    parsed = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert float(parsed[0]["mae_mean"]) == pytest.approx(values["c000"][1]) and parsed[0]["paper_mae"] == "40.88"
    assert "top1_mean" not in parsed[0]


def test_a_series_classification_study_shows_accuracy_and_mae():
    spec = StudySpec.load("configs/studies/table6-motion.yaml")
    assert spec.table_metrics == ("top1", "mae")
    text = markdown(build_table(expand(spec), []))
    assert text.splitlines()[0].startswith("### table6-motion: Top-1 (%) / MAE, mean ± std over 3 seeds")
    assert "| Base Model | … | … | 100.00 | 0.1118 |" in text


def test_a_study_mixing_tasks_on_its_dataset_axis_or_asking_for_unlogged_metrics_is_refused():
    base = {"model": {"name": "lstm4"}, "data": {"dataset": "airline"}, "training": {"batch_size": 8}}
    with pytest.raises(ValueError, match=r"axis 'data\.dataset' mixes kinds of data or tasks"):
        StudySpec.model_validate({"base": base, "axes": {"data.dataset": ["airline", "basic-motions"]}})
    with pytest.raises(ValueError, match="metrics: a forecast job logs no top5; it logs cosine, mae"):
        StudySpec.model_validate({"base": base, "metrics": ["top5"]})
    by_axis = StudySpec.model_validate({"base": {**base, "data": {"dataset": "basic-motions"}},
                                        "axes": {"data.dataset": ["airline"]}})  # fmt: skip
    assert by_axis.table_metrics == ("cosine", "mae")  # the axis sets every cell's dataset
