"""Studies without a cluster: expansion rules, errors naming the axis, the table's statistics (checked against
numbers computed here independently) and its formats."""

import csv
import io
import json
import re
import statistics

import pytest
import scipy.stats
from pydantic import ValidationError

from training.config import JobSpec
from training.report import build_table, markdown, to_csv
from training.study import STORED, Observation, StudyError, StudySpec, expand

BASE = {"model": {"name": "lenet5"}, "training": {"epochs": 2, "batch_size": 32}, "lr": {"peak_epoch": 1}}


def study(**fields) -> StudySpec:
    return StudySpec.model_validate({"base": BASE, **fields})


def test_the_base_model_runs_once_for_both_placements_and_lenet5_placements_are_merged():
    expansion = expand(study(axes={"model.attention": ["none", "cbam", "san-d"],
                                   "model.placement": ["bottleneck", "full"]}, seeds=[0, 1]))  # fmt: skip
    runs_as = {(c.values["model.attention"], c.values["model.placement"]): c.runs_as for c in expansion.cells}
    assert runs_as[("none", "full")] == runs_as[("none", "bottleneck")] == "c000"
    assert runs_as[("cbam", "full")] == runs_as[("cbam", "bottleneck")] == "c002"
    assert runs_as[("san-d", "full")] == runs_as[("san-d", "bottleneck")] == "c004"
    assert [(c.cell, c.seed) for c in expansion.children] == [
        ("c000", 0), ("c000", 1), ("c002", 0), ("c002", 1), ("c004", 0), ("c004", 1)]  # fmt: skip


def test_vgg16_placements_are_different_networks_but_its_base_model_runs_once():
    base = {**BASE, "model": {"name": "vgg16", "stem": "small"}, "data": {"dataset": "cifar10"}}
    expansion = expand(StudySpec.model_validate({"base": base, "axes": {
        "model.attention": ["none", "san-c"], "model.placement": ["bottleneck", "full"]}}))  # fmt: skip
    assert [c.runs_as for c in expansion.cells] == ["c000", "c000", "c002", "c003"]
    assert len(expansion.children) == 3


def test_ablations_the_library_refuses_are_dash_cells_with_the_reason_and_the_base_ignores_kwargs():
    expansion = expand(StudySpec.load("configs/studies/table9-fmnist.yaml"))
    refused = [c for c in expansion.cells if c.refused]
    assert [c.labels["model.attention_kwargs"][:2] for c in refused] == ["1:", "2:"]
    assert all("use_cca=False needs equal channel counts, got C'=1" in c.refused for c in refused)
    assert {c.runs_as for c in expansion.cells if c.values["model.attention"] == "none"} == {"c000"}
    assert sorted({child.cell for child in expansion.children}) == ["c000", "c007", "c008", "c009"]
    assert len(expansion.children) == 4 * 3


def test_children_are_named_tagged_nested_and_seeded():
    expansion = expand(StudySpec.load("configs/studies/table9-fmnist.yaml"), study_id="study-x", parent_run_id="p")
    child = next(c for c in expansion.children if c.cell == "c008" and c.seed == 2)
    assert child.spec.run_name == "lenet5-san-c-bottleneck-s2-4-abs-cca-extrema-no-smoothing"
    assert child.spec.training.seed == 2 and child.spec.model.attention_kwargs == {"use_smoothing": False}
    assert child.spec.tracking.tags == {"san.study_id": "study-x", "san.cell": "c008", "san.seed": "2",
                                        "mlflow.parentRunId": "p"}  # fmt: skip
    assert child.spec.experiment == "san/fashion-mnist"
    JobSpec.model_validate(child.spec.model_dump())  # a child is a valid job as it stands


@pytest.mark.parametrize(("fields", "loc", "message"), [
    ({"axes": {"model.colour": ["red"]}}, ("axes",), "model has no field 'colour'"),
    ({"axes": {"modle.name": ["lenet5"]}}, ("axes",), "no section 'modle'"),
    ({"axes": {"model.attention": []}}, ("axes",), "axis 'model.attention' has no values"),
    ({"axes": {"training.seed": [1, 2]}}, ("axes",), "set by the study itself"),
    ({"seeds": []}, ("seeds",), "at least 1 item"),
    ({"seeds": [1, 1]}, ("seeds",), "seeds repeat a value"),
    ({"seeds": [-1]}, ("seeds", 0), "greater than or equal to 0"),
    ({"axes": {"lr.lr": [0.1, float("nan")]}}, ("axes", "lr.lr", 1), "nan is not a finite number"),
    ({"axes": {"model.attention": ["none"]}, "baseline": {"model.placement": "full"}}, (),
     "baseline.model.placement: no such axis"),
])  # fmt: skip
def test_bad_study_specs_are_refused_by_validation_naming_the_field(fields, loc, message):
    with pytest.raises(ValueError, match="validation error") as error:
        study(**fields)
    first = error.value.errors()[0]
    assert tuple(first["loc"]) == loc and message in first["msg"]


@pytest.mark.parametrize(("axes", "loc", "message"), [
    ({"model.attention": ["none", "sanc"]}, ("axes", "model.attention"), "unknown attention 'sanc'"),
    ({"training.batch_size": [32, 0]}, ("axes", "training.batch_size"), "greater than or equal to 1"),
    ({"lr.peak_epoch": [1, 3]}, ("axes", "lr.peak_epoch"), "lr.peak_epoch 3.0 is after the last epoch (2)"),
    ({"scaling.use_gpu": [False], "training.amp": ["none", "bf16"]}, ("axes", "training.amp"), "needs scaling.use_gpu"),
])  # fmt: skip
def test_cells_the_job_rules_refuse_are_study_errors_naming_the_axis(axes, loc, message):
    with pytest.raises(StudyError) as error:
        expand(study(axes=axes))
    assert error.value.loc[: len(loc)] == loc and message in error.value.message, error.value


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        (
            {"model.attention": ["cbam"], "model.attention_kwargs": [{"bogus": 1}]},
            "axis 'model.attention_kwargs': cbam takes no argument 'bogus'; it takes: reduction, spatial_kernel_size",
        ),
        (
            {"model.attention": ["bam"], "model.attention_kwargs": [{"reduction": 0}]},
            "axis 'model.attention_kwargs': reduction=0: Input should be greater than or equal to 1",
        ),
        (
            {"model.attention": ["san-c"], "model.attention_kwargs": [{"use_abs": "maybe"}]},
            "axis 'model.attention_kwargs': use_abs=\"maybe\": Input should be a valid boolean",
        ),
        (
            {"model.attention": ["san-c", "cbam"], "model.attention_kwargs.nope": [1, 2]},
            "axis 'model.attention_kwargs.nope': san-c, cbam take no argument 'nope'",
        ),
        ({"model.attention_kwargs.reduction": [4, -1]}, "axis 'model.attention_kwargs.reduction': reduction=-1"),
    ],
)
def test_attention_kwarg_axes_are_checked_against_the_modules_signatures_before_any_cell(axes, message):
    with pytest.raises(ValidationError, match=re.escape(message)):
        study(axes=axes)


def test_the_schema_bounds_the_grid_so_its_size_is_known_before_anything_is_built():
    """Issue 24: 30 axes of two values expanded 2**30 cells in memory before the cell limit was compared (fails
    on b867172 with a MemoryError or the OOM killer, not a ValidationError)."""
    with pytest.raises(ValidationError, match="30 axes; at most 8"):
        study(axes={f"model.attention_kwargs.k{i}": [1, 2] for i in range(30)})
    with pytest.raises(ValidationError, match="has 65 values; at most 64"):
        study(axes={"training.batch_size": list(range(1, 66))})
    wide = study(
        axes={
            "training.batch_size": list(range(1, 65)),
            "training.epochs": list(range(1, 65)),
            "lr.lr": [0.1 * k for k in range(1, 65)],
        },
        seeds=[0, 1, 2],
    )
    assert (wide.cell_count, wide.size) == (64**3, 3 * 64**3)
    with pytest.raises(StudyError, match=r"262144 cells \(64 × 64 × 64\) is more than this service's limit of 200"):
        expand(wide, max_cells=200)  # at once: nothing built, nothing listed


def test_a_stored_study_is_read_back_under_the_caps_of_its_day_and_odd_axis_values_are_errors_not_crashes():
    wide = {"base": BASE, "axes": {"training.batch_size": list(range(1, 101))}}  # admitted before the caps
    with pytest.raises(ValidationError, match="has 100 values; at most 64"):
        StudySpec.model_validate(wide)
    assert StudySpec.model_validate(wide, context={STORED: True}).cell_count == 100
    for odd in ({"a": 1}, [1], 3, None):  # a TypeError (a 500) in the first version of the kwargs check
        odd_study = study(axes={"model.attention": ["san-c", odd], "model.attention_kwargs.use_abs": [True]})
        with pytest.raises(StudyError, match=r"model\.attention"):  # the cell names the axis, as any bad value does
            expand(odd_study)


def test_more_cells_than_the_limit_is_refused_before_anything_else():
    with pytest.raises(StudyError, match=r"30 cells \(5 × 2 × 3\) is more than this service's limit of 29"):
        expand(study(axes={"model.attention": ["none", "cbam", "bam", "san-c", "san-d"],
                           "model.placement": ["bottleneck", "full"], "training.batch_size": [16, 32, 64]}),
               max_cells=29)  # fmt: skip


def history(top1: float, top5: float, seconds: list[float]) -> list[dict[str, float]]:
    """Epochs ending at ``top1``, after a better epoch before the last: the table must take the last, not the best."""
    values = [top1 - 0.1 * (len(seconds) - 1 - i) for i in range(len(seconds))]
    if len(values) > 1:
        values[-2] = top1 + 0.05
    return [{"val/top1": v, "val/top5": top5, "time/epoch_s": s} for v, s in zip(values, seconds, strict=True)]


def test_table_statistics_equal_numbers_computed_independently():
    expansion = expand(study(axes={"model.attention": ["none", "cbam", "san-d"],
                                   "model.placement": ["bottleneck", "full"]}, seeds=[0, 1, 2]))  # fmt: skip
    top1 = {"c000": [0.80, 0.82, 0.81], "c002": [0.79, 0.85, 0.80], "c004": [0.84, 0.86, 0.83]}
    seconds = {"c000": [[9, 5, 5], [9, 6, 6], [9, 5, 5]], "c002": [[9, 7, 7], [9, 8, 7], [9, 7, 7]],
               "c004": [[9, 6, 6], [9, 6, 6], [9, 6, 7]]}  # fmt: skip
    observations = [Observation(cell, seed, "succeeded", history(top1[cell][seed], 0.99, seconds[cell][seed]), 100)
                    for cell in top1 for seed in range(3)]  # fmt: skip
    observations[-1] = Observation("c004", 2, "running", history(0.5, 0.9, [9]))  # not finished: not counted
    table = build_table(expansion, observations)
    cells = {cell["key"]: cell for cell in table["cells"]}
    cbam, san = cells["c003"], cells["c005"]  # the full-placement cells repeat the runs of their bottleneck twins
    assert cbam["runs_as"] == "c002" and cbam["top1"]["mean"] == pytest.approx(statistics.fmean(top1["c002"]))
    assert cbam["top1"]["std"] == pytest.approx(statistics.stdev([0.79, 0.85, 0.80]))
    diffs = [0.79 - 0.80, 0.85 - 0.82, 0.80 - 0.81]
    assert cbam["diff_top1"]["mean"] == pytest.approx(statistics.fmean(diffs))
    assert cbam["diff_top1"]["std"] == pytest.approx(statistics.stdev(diffs)) and cbam["diff_top1"]["positive"] == 1
    assert san["top1"]["n"] == 2 and san["diff_top1"]["n"] == 2 and san["diff_top1"]["positive"] == 2
    # the 95 % interval is SciPy's paired t-test's, computed here from the seeds' values directly
    expected = scipy.stats.ttest_rel(top1["c002"], top1["c000"]).confidence_interval(0.95)
    assert cbam["diff_top1"]["ci95"] == pytest.approx([expected.low, expected.high])
    assert cbam["diff_top1"]["resolved"] is False and cbam["diff_top1"]["seeds"] == [0, 1, 2]
    spread, size = statistics.stdev(diffs), abs(statistics.fmean(diffs))
    needed = next(n for n in range(2, 10_000) if scipy.stats.t.ppf(0.975, n - 1) * spread / n**0.5 < size)
    assert cbam["diff_top1"]["seeds_to_resolve"] == needed
    row = next(row for row in csv.DictReader(io.StringIO(to_csv(table))) if row["cell"] == "c002")
    assert float(row["diff_top1_ci_low"]) == pytest.approx(expected.low)
    assert int(row["diff_top1_seeds_to_resolve"]) == needed
    line = next(line for line in markdown(table).splitlines() if "(c002)" in line)
    assert f"| [{100 * expected.low:+.2f}, {100 * expected.high:+.2f}] | 1/3 | {needed} |" in line
    assert san["states"] == {"running": 1, "succeeded": 2}
    base_seconds = statistics.fmean([5, 6, 5])  # the median epoch of each run, then the mean over seeds
    cbam_seconds = statistics.fmean([7, 8, 7])
    assert cbam["epoch_s"]["mean"] == pytest.approx(cbam_seconds)
    assert cbam["epoch_s_ratio"] == pytest.approx(cbam_seconds / base_seconds)
    assert cells["c000"].get("diff_top1") is None and cbam["params"] == 100
    assert json.loads(json.dumps(table)) == table


def test_markdown_has_the_papers_layout_and_csv_one_row_per_cell():
    spec = StudySpec.load("configs/studies/table9-fmnist.yaml")
    expansion = expand(spec)
    observations = [Observation(c.cell, c.seed, "succeeded", history(0.89 + c.seed / 100, 0.99, [5, 5]), 10)
                    for c in expansion.children]  # fmt: skip
    table = build_table(expansion, observations)
    text = markdown(table)
    lines = text.splitlines()
    assert lines[1] == "| Module | Top-1 | Top-5 | paper Top-1 | paper Top-5 |"
    rows = [line for line in lines[3:9]]
    assert rows[0] == "| Base Model | 90.00 ± 1.00 | 99.00 ± 0.00 | 89.43 |  |"
    assert rows[1].startswith("| SAN-c · 1: no-Abs, no-CCA, no-Extrema, no-Smoothing | - | - |")
    assert rows[5].startswith("| SAN-c · 5: Abs, CCA, Extrema, Smoothing | 90.00 ± 1.00 | 99.00 ± 0.00 | 89.75 |")
    assert "use_cca=False needs equal channel counts" in text
    parsed = list(csv.DictReader(io.StringIO(to_csv(table))))
    assert len(parsed) == len(expansion.cells) == 10
    assert parsed[5]["refused"] and parsed[5]["top1_mean"] == ""
    assert float(parsed[9]["top1_mean"]) == pytest.approx(0.90) and parsed[9]["paper_top1"] == "89.75"


def test_the_tracking_uri_is_not_a_param():
    with_uri = JobSpec.model_validate({"tracking": {"mlflow_uri": "http://mlflow:5000", "tags": {"a": "b"}}})
    named = JobSpec.model_validate({"tracking": {"experiment": "a", "run_name": "b"}})
    assert with_uri.flat() == JobSpec().flat() == named.flat()
    assert not [key for key in with_uri.flat() if key.startswith("tracking.")]
