"""A study's result table: statistics over seeds from the children's observations, and its formats — JSON (the
source of the others), Markdown in the paper's layout (rows = modules, columns = positions × the study's metrics:
top-1/top-5 for images, accuracy/MAE for series classification, cosine similarity/MAE for forecasts) and CSV.

Per cell and metric: the value of each seed's **last** epoch (no choosing the best epoch on the validation set) as
mean ± sample standard deviation with n; the paired difference to the baseline cell on the same seed
(`training.paired`: mean ± std, its 95 % confidence interval, on how many seeds it was positive and on how many
better — lower, for an error — and how many seeds its spread would need to resolve it); seconds per epoch (the
median epoch of each run, mean over seeds) and its ratio to the baseline's; parameters; and the paper's figure
where the study knows it.
"""

import csv
import io
import math
import statistics
from collections.abc import Iterable
from typing import Any

from training.metrics import METRICS
from training.paired import paired_difference
from training.states import JobStatus
from training.study import PLACEMENT, Expansion, Observation

NOT_RUN, REFUSED = "…", "-"


def mean_std(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}  # fmt: skip


def final(observation: Observation, key: str) -> float | None:
    for row in reversed(observation.history):
        if key in row and math.isfinite(row[key]):
            return row[key]
    return None


def epoch_seconds(observation: Observation) -> float | None:
    times = [row["time/epoch_s"] for row in observation.history if "time/epoch_s" in row]
    return statistics.median(times) if times else None


def build_table(expansion: Expansion, observations: Iterable[Observation]) -> dict[str, Any]:
    """The table as a JSON-able dict: ``cells`` (one per grid cell, merged cells repeating the numbers of the
    cell that ran for them) and ``layout`` (the paper's rows and columns, as cell keys)."""
    by_cell: dict[str, list[Observation]] = {}
    for observation in observations:
        by_cell.setdefault(observation.cell, []).append(observation)
    done = {key: {o.seed: o for o in found if o.state == JobStatus.SUCCEEDED} for key, found in by_cell.items()}
    cells = []
    for cell in expansion.cells:
        entry: dict[str, Any] = {"key": cell.key, "values": cell.values, "labels": cell.labels, "runs_as": cell.runs_as,
                                 "refused": cell.refused, "paper": cell.paper or None}  # fmt: skip
        cells.append(entry)
        if cell.refused:
            continue
        runs = by_cell.get(cell.runs_as or "", [])
        states = [o.state for o in runs]
        entry["states"] = {state: states.count(state) for state in sorted(set(states))}
        finished = done.get(cell.runs_as or "", {})
        seeds = sorted(finished)
        entry["seeds"] = seeds
        for metric in expansion.study.table_metrics:
            key = METRICS[metric].key
            entry[metric] = mean_std([v for s in seeds if (v := final(finished[s], key)) is not None])
        entry["epoch_s"] = mean_std([v for s in seeds if (v := epoch_seconds(finished[s])) is not None])
        entry["params"] = next((o.params for o in runs if o.params is not None), None)
        baseline = expansion.baseline_of(cell)
        entry["baseline"] = baseline.key if baseline else None
        if baseline is None or baseline.runs_as == cell.runs_as or baseline.refused:
            continue
        base = done.get(baseline.runs_as or "", {})
        paired = [s for s in seeds if s in base]
        for metric in expansion.study.table_metrics:
            key = METRICS[metric].key
            ours = {s: v for s in paired if (v := final(finished[s], key)) is not None}
            theirs = {s: v for s in paired if (v := final(base[s], key)) is not None}
            entry[f"diff_{metric}"] = paired_difference(ours, theirs, METRICS[metric].higher_is_better)
        # On the seeds both have, as the accuracy differences.
        cell_seconds = mean_std([v for s in paired if (v := epoch_seconds(finished[s])) is not None])
        base_seconds = mean_std([v for s in paired if (v := epoch_seconds(base[s])) is not None])
        if cell_seconds and base_seconds and base_seconds["mean"] > 0:
            entry["epoch_s_ratio"] = cell_seconds["mean"] / base_seconds["mean"]
    return {"study": expansion.study.name, "seeds": expansion.study.seeds,
            "metrics": list(expansion.study.table_metrics),
            "paper_source": expansion.study.paper.source if expansion.study.paper else None,
            "cells": cells, "layout": layout(expansion)}  # fmt: skip


def layout(expansion: Expansion) -> dict[str, Any]:
    """The paper's layout: columns = the placement axis' values (one column when every row's placements are the
    same network, as for LeNet-5), rows = the other axes' combinations; a row that would repeat an earlier row's
    runs (the base model under each ablation) is dropped."""
    placements = expansion.study.axes.get(PLACEMENT, [None])
    rows: dict[tuple, list] = {}
    for cell in expansion.cells:
        others = tuple((path, repr(value)) for path, value in cell.values.items() if path != PLACEMENT)
        rows.setdefault(others, []).append(cell)
    merged = all(len({c.runs_as or c.key for c in row}) == 1 for row in rows.values())
    columns = [" = ".join(str(p) for p in placements)] if merged and len(placements) > 1 else \
        [str(p) if p is not None else "" for p in placements]  # fmt: skip
    out, seen = [], set()
    for row in rows.values():
        keys = [row[0].key] if merged else [c.key for c in row]
        runs = tuple(expansion.cell(k).runs_as or k for k in keys)
        if runs in seen:
            continue
        seen.add(runs)
        label = " · ".join(v for p, v in row[0].labels.items() if p != PLACEMENT) or "all"
        out.append({"label": label, "cells": keys})
    return {"columns": columns, "rows": out}


def shown(stats: dict[str, Any] | None, seeds: int, metric: str, signed: bool = False) -> str:
    """Mean ± std (n when some seeds are missing): percent with 2 decimals, other metrics with 4."""
    if not stats:
        return NOT_RUN
    scale, digits = (100, 2) if METRICS[metric].percent else (1, 4)
    text = f"{scale * stats['mean']:+.{digits}f}" if signed else f"{scale * stats['mean']:.{digits}f}"
    if stats["std"] is not None:
        text += f" ± {scale * stats['std']:.{digits}f}"
    if stats["n"] != seeds:
        text += f" (n={stats['n']})"
    return text


def interval(diff: dict[str, Any] | None, metric: str) -> str:
    """The paired difference's 95 % confidence interval, in the metric's units; a star where it excludes zero."""
    if not diff or not diff.get("ci95"):
        return ""
    scale, digits = (100, 2) if METRICS[metric].percent else (1, 4)
    low, high = (scale * bound for bound in diff["ci95"])
    return f"[{low:+.{digits}f}, {high:+.{digits}f}]" + (" *" if diff["resolved"] else "")


def resolving(diff: dict[str, Any] | None) -> str:
    """How many seeds the observed spread needs before the interval excludes zero ("already" when it does)."""
    if not diff or diff.get("std") is None:
        return ""
    if diff["resolved"]:
        return "resolved"
    needed = diff.get("seeds_to_resolve")
    return str(needed) if needed is not None else "never"


def paper_value(cell: dict[str, Any], metric: str) -> str:
    """As the paper prints it: percent for accuracies, the value itself otherwise."""
    value = (cell.get("paper") or {}).get(metric)
    if value is None:
        return ""
    return f"{value:.2f}" if METRICS[metric].percent or abs(value) >= 1 else f"{value:.4f}"  # 33.40, 0.0084


def metrics_of(table: dict[str, Any]) -> list[str]:
    return table.get("metrics") or ["top1", "top5"]  # tables written before metrics were named: images


def markdown(table: dict[str, Any]) -> str:
    """The paper's layout, then one line per cell with every statistic, then the reasons for "-" cells."""
    cells = {cell["key"]: cell for cell in table["cells"]}
    seeds, has_paper = len(table["seeds"]), table["paper_source"] is not None
    metrics = metrics_of(table)
    titles = [METRICS[m].title for m in metrics]
    per_column = titles + ([f"paper {title}" for title in titles] if has_paper else [])
    columns = table["layout"]["columns"]
    if all(METRICS[m].percent for m in metrics):
        what = " / ".join(title.lower() for title in titles) + " (%)"
    else:
        what = " / ".join(METRICS[m].title + (" (%)" if METRICS[m].percent else "") for m in metrics)
    lines = [f"### {table['study']}: {what}, mean ± std over {seeds} seed{'s' * (seeds != 1)}, last epoch"
             + (f"; paper: {table['paper_source']}" if has_paper else "")]  # fmt: skip
    header = ["Module"] + [f"{c} {m}".strip() for c in columns for m in per_column]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["layout"]["rows"]:
        entries = [row["label"]]
        for key in row["cells"]:
            cell = cells[key]
            if cell["refused"]:
                entries += [REFUSED] * len(metrics)
            else:
                entries += [shown(cell.get(m), seeds, m) for m in metrics]
            if has_paper:
                entries += [paper_value(cell, m) for m in metrics]
        lines.append("| " + " | ".join(entries) + " |")
    first = metrics[0]
    units = [METRICS[m].title.lower() + (" %" if METRICS[m].percent else "") for m in metrics]
    better = "Δ > 0" if METRICS[first].higher_is_better else "Δ < 0"
    lines += [
        "",
        f"| cell | runs | {' | '.join(units)} | Δ {METRICS[first].title.lower()} vs baseline (paired) "
        f"| 95 % CI | {better} | seeds to resolve | s/epoch | × baseline | params |",
        "|---" * (len(metrics) + 9) + "|",
    ]
    for cell in table["cells"]:
        name = " · ".join(cell["labels"].values()) or cell["key"]
        if cell["refused"]:
            lines.append(f"| {name} | {REFUSED} |" + " |" * (len(metrics) + 7))
            continue
        if cell["runs_as"] != cell["key"]:  # the same network as a cell above: its line says it all
            continue
        runs = ", ".join(f"{n} {s}" for s, n in cell.get("states", {}).items()) or "none yet"
        diff = cell.get(f"diff_{first}")
        seconds = cell.get("epoch_s")
        lines.append(" | ".join([
            f"| {name} ({cell['key']})", runs, *(shown(cell.get(m), seeds, m) for m in metrics),
            shown(diff, seeds, first, signed=True) if diff else "",
            interval(diff, first),
            f"{diff.get('better', diff['positive'])}/{diff['n']}" if diff else "",
            resolving(diff),
            (f"{seconds['mean']:.1f}" if seconds["mean"] >= 1 else f"{seconds['mean']:.2g}") if seconds else NOT_RUN,
            f"{cell['epoch_s_ratio']:.2f}" if cell.get("epoch_s_ratio") else "",
            f"{cell['params']:,}" if cell.get("params") else "",
        ]) + " |")  # fmt: skip
    refused = [cell for cell in table["cells"] if cell["refused"]]
    if refused:
        lines += ["", f"{REFUSED}: " + "; ".join(f"{' · '.join(c['labels'].values())}: {c['refused']}"
                                                 for c in refused)]  # fmt: skip
    return "\n".join(lines) + "\n"


DIFF_PARTS = ("mean", "std", "positive", "better", "ci_low", "ci_high", "seeds_to_resolve")


def csv_columns(metrics: list[str]) -> list[str]:
    per_metric = [f"{m}_{part}" for m in metrics for part in ("mean", "std")]
    diffs = [f"diff_{m}_{part}" for m in metrics for part in DIFF_PARTS]
    return ["cell", "labels", "runs_as", "refused", "n", *per_metric, *diffs, "epoch_s_mean", "epoch_s_std",
            "epoch_s_ratio", "params", *(f"paper_{m}" for m in metrics)]  # fmt: skip


def to_csv(table: dict[str, Any]) -> str:
    """One row per cell, fractions (not percent), empty where there is no value."""
    metrics = metrics_of(table)
    columns = csv_columns(metrics)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    for cell in table["cells"]:
        row: dict[str, Any] = {"cell": cell["key"], "labels": " · ".join(cell["labels"].values()),
                               "runs_as": cell["runs_as"] or "", "refused": cell["refused"] or "",
                               "n": (cell.get(metrics[0]) or {}).get("n")}  # fmt: skip
        for name in [*metrics, *(f"diff_{m}" for m in metrics), "epoch_s"]:
            stats = dict(cell.get(name) or {})
            stats["ci_low"], stats["ci_high"] = stats.get("ci95") or (None, None)
            for part in DIFF_PARTS:
                row[f"{name}_{part}"] = stats.get(part)
        row["epoch_s_ratio"], row["params"] = cell.get("epoch_s_ratio"), cell.get("params")
        paper = cell.get("paper") or {}
        row.update({f"paper_{m}": paper.get(m) for m in metrics})
        writer.writerow({k: ("" if v is None else v) for k, v in row.items() if k in columns})
    return buffer.getvalue()


FORMATS = {"md": markdown, "csv": to_csv}
