"""A study's results from its children's MLflow runs: the observations, the table in every format, and the
figures, written together into one directory (atomically: a temp directory renamed into place)."""

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from training.metrics import METRICS
from training.mlflow_runs import (
    download_attention_maps,
    end_unfinished_runs,
    metric_history,
    study_child_runs,
)
from training.report import build_table, epoch_seconds, markdown, to_csv
from training.states import JobStatus
from training.study import ATTENTION, PLACEMENT, Expansion, Observation

FIG8_MODULES = ("cbam", "bam", "ran", "san-c", "san-d")
TABLE_KEYS = (*(metric.key for metric in METRICS.values()), "time/epoch_s")  # what the table and figures read


def observations(uri: str, parent_run_id: str, states: dict[tuple[str, int], str] | None = None) -> list[Observation]:
    """One per child run, newest run per (cell, seed). ``states``: the job states the caller knows better than
    MLflow (the service's: a job can fail before its run ends), by (cell, seed)."""
    latest: dict[tuple[str, int], Any] = {}
    for run in study_child_runs(uri, parent_run_id):
        tags = run.data.tags
        if "san.cell" in tags and "san.seed" in tags:
            latest[(tags["san.cell"], int(tags["san.seed"]))] = run
    found = []
    client = MlflowClient(uri)
    for (cell, seed), run in latest.items():
        state = (states or {}).get((cell, seed)) or JobStatus.from_mlflow(run.info.status)
        params = run.data.params.get("model.num_params")
        found.append(Observation(cell, seed, state, metric_history(client, run.info.run_id, TABLE_KEYS),
                                 int(params) if params else None, run.info.run_id))  # fmt: skip
    for (cell, seed), state in (states or {}).items():  # children whose run does not exist yet
        if (cell, seed) not in latest:
            found.append(Observation(cell, seed, state, []))
    return found


def table(expansion: Expansion, uri: str, parent_run_id: str, states=None) -> dict[str, Any]:
    return build_table(expansion, observations(uri, parent_run_id, states))


def cell_label(expansion: Expansion, key: str) -> str:
    """The cell's labels, less its placement when its runs serve another placement too (LeNet-5, the base)."""
    cell = expansion.cell(key)
    placement = cell.values.get(PLACEMENT)
    serves_both = any(c.runs_as == cell.runs_as and c.values.get(PLACEMENT) != placement for c in expansion.cells)
    return " · ".join(v for p, v in cell.labels.items() if not (serves_both and p == PLACEMENT)) or key


def write_results(expansion: Expansion, uri: str, parent_run_id: str, directory: Path, states=None) -> dict[str, Any]:
    """``table.json``, ``table.md``, ``table.csv`` and ``figures/*.png`` in ``directory``; returns the table."""
    found = observations(uri, parent_run_id, states)
    end_unfinished_runs(uri, {o.run_id: o.state for o in found if o.run_id})
    result = build_table(expansion, found)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    old = directory.with_name(f".{directory.name}.old")
    try:
        temp.chmod(0o755)
        (temp / "table.json").write_text(json.dumps(result, indent=2, default=str))
        (temp / "table.md").write_text(markdown(result))
        (temp / "table.csv").write_text(to_csv(result))
        draw_figures(expansion, uri, found, temp / "figures")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():  # aside, not deleted, until the new one is in place
            directory.rename(old)
        temp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return result


def draw_figures(expansion: Expansion, uri: str, found: list[Observation], directory: Path) -> list[Path]:
    """Accuracy per epoch per cell, seconds per epoch per cell (Fig. 9/10), SAN's stages (Fig. 4) and the
    modules' masks side by side (Fig. 8) — each drawn when the runs it needs have finished."""
    from training import figures  # matplotlib: only where figures are drawn (never in the service's API process)

    directory.mkdir(parents=True, exist_ok=True)
    running = [cell for cell in expansion.cells if cell.runs]
    by_cell: dict[str, list[Observation]] = {}
    for observation in sorted(found, key=lambda o: o.seed):
        by_cell.setdefault(observation.cell, []).append(observation)
    first = METRICS[expansion.study.table_metrics[0]]  # the curves show the table's first metric per epoch
    succeeded = {
        key: [o for o in found if o.history and o.state == JobStatus.SUCCEEDED] for key, found in by_cell.items()
    }
    curves = {cell_label(expansion, c.key): [[row[first.key] for row in o.history if first.key in row]
                                             for o in succeeded.get(c.key, [])]
              for c in running}  # fmt: skip
    curves = {label: series for label, series in curves.items() if series}
    drawn = []
    if curves:
        curve_path = directory / f"{first.key.replace('/', '_')}.png"
        figures.plot_accuracy_curves(curves, curve_path, ylabel=f"val {first.title}", percent=first.percent)
        drawn.append(curve_path)
    seconds = {cell_label(expansion, c.key): [s for o in by_cell.get(c.key, []) if o.state == JobStatus.SUCCEEDED
                                              and (s := epoch_seconds(o)) is not None]
               for c in running}  # fmt: skip
    seconds = {label: values for label, values in seconds.items() if values}
    if seconds:
        base = expansion.baseline_of(running[0])
        baseline = cell_label(expansion, base.runs_as) if base and base.runs_as else None
        figures.plot_epoch_seconds(seconds, directory / "epoch_seconds.png",
                                   baseline if baseline in seconds else None)  # fmt: skip
        drawn.append(directory / "epoch_seconds.png")
    maps = _first_maps(expansion, uri, by_cell)
    san = next((name for name in ("san-d", "san-c") if name in maps), None)
    if san:
        figures.plot_scale_space_stages(maps[san][1], directory / "fig4_scale_space.png",
                                        title=f"{maps[san][0]}: {maps[san][1]['path']}")  # fmt: skip
        drawn.append(directory / "fig4_scale_space.png")
    compared = {maps[name][0]: maps[name][1] for name in FIG8_MODULES if name in maps}
    if len(compared) >= 2:
        figures.plot_mask_comparison(compared, directory / "fig8_masks.png")
        drawn.append(directory / "fig8_masks.png")
    return drawn


def _first_maps(expansion: Expansion, uri: str, by_cell: dict[str, list[Observation]]) -> dict[str, tuple]:
    """Per attention module: (cell label, maps) of the first finished run of its first cell — at the bottleneck
    placement where the study has one — with its paper-default kwargs (no ablation)."""
    chosen: dict[str, tuple] = {}
    cells = sorted((c for c in expansion.cells if c.runs and c.spec is not None),
                   key=lambda c: (c.values.get(PLACEMENT, "bottleneck") != "bottleneck",
                                  bool(c.spec.model.attention_kwargs)))  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        for cell in cells:
            name = cell.values.get(ATTENTION, cell.spec.model.attention)
            if name in chosen or name == "none":
                continue
            run = next((o for o in by_cell.get(cell.key, []) if o.state == JobStatus.SUCCEEDED and o.run_id), None)
            if run is None:
                continue
            maps = download_attention_maps(uri, run.run_id, Path(scratch) / cell.key)
            if maps is not None:
                label = cell_label(expansion, cell.key)
                maps["path"] = str(maps["path"])
                chosen[name] = (label, maps)
    return chosen
