"""A study's result table: statistics over seeds from the children's observations, and its formats — JSON (the
source of the others), Markdown in the paper's layout (rows = modules, columns = positions × top-1/top-5) and CSV.

Per cell: top-1/top-5 of each seed's **last** epoch (no choosing the best epoch on the validation set) as mean ±
sample standard deviation with n; the paired difference to the baseline cell on the same seed (mean ± std, and
on how many seeds it was positive); seconds per epoch (the median epoch of each run, mean over seeds) and its
ratio to the baseline's; parameters; and the paper's figure where the study knows it.
"""

import csv
import io
import math
import statistics
from collections.abc import Iterable
from typing import Any

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
    done = {key: {o.seed: o for o in found if o.state == "succeeded"} for key, found in by_cell.items()}
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
        for metric, key in (("top1", "val/top1"), ("top5", "val/top5")):
            entry[metric] = mean_std([v for s in seeds if (v := final(finished[s], key)) is not None])
        entry["epoch_s"] = mean_std([v for s in seeds if (v := epoch_seconds(finished[s])) is not None])
        entry["params"] = next((o.params for o in runs if o.params is not None), None)
        baseline = expansion.baseline_of(cell)
        entry["baseline"] = baseline.key if baseline else None
        if baseline is None or baseline.runs_as == cell.runs_as or baseline.refused:
            continue
        base = done.get(baseline.runs_as or "", {})
        paired = [s for s in seeds if s in base]
        for metric, key in (("top1", "val/top1"), ("top5", "val/top5")):
            diffs = [final(finished[s], key) - final(base[s], key) for s in paired
                     if final(finished[s], key) is not None and final(base[s], key) is not None]  # fmt: skip
            stats = mean_std(diffs)
            if stats:
                stats["positive"] = sum(d > 0 for d in diffs)
            entry[f"diff_{metric}"] = stats
        # On the seeds both have, as the accuracy differences.
        cell_seconds = mean_std([v for s in paired if (v := epoch_seconds(finished[s])) is not None])
        base_seconds = mean_std([v for s in paired if (v := epoch_seconds(base[s])) is not None])
        if cell_seconds and base_seconds and base_seconds["mean"] > 0:
            entry["epoch_s_ratio"] = cell_seconds["mean"] / base_seconds["mean"]
    return {"study": expansion.study.name, "seeds": expansion.study.seeds,
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


def percent(stats: dict[str, Any] | None, seeds: int, signed: bool = False) -> str:
    if not stats:
        return NOT_RUN
    text = f"{100 * stats['mean']:+.2f}" if signed else f"{100 * stats['mean']:.2f}"
    if stats["std"] is not None:
        text += f" ± {100 * stats['std']:.2f}"
    if stats["n"] != seeds:
        text += f" (n={stats['n']})"
    return text


def paper_value(cell: dict[str, Any], metric: str) -> str:
    value = (cell.get("paper") or {}).get(metric)
    return f"{value:.2f}" if value is not None else ""


def markdown(table: dict[str, Any]) -> str:
    """The paper's layout, then one line per cell with every statistic, then the reasons for "-" cells."""
    cells = {cell["key"]: cell for cell in table["cells"]}
    seeds, has_paper = len(table["seeds"]), table["paper_source"] is not None
    per_column = ["Top-1", "Top-5"] + (["paper Top-1", "paper Top-5"] if has_paper else [])
    columns = table["layout"]["columns"]
    lines = [f"### {table['study']}: top-1 / top-5 (%), mean ± std over {seeds} seed{'s' * (seeds != 1)}, last epoch"
             + (f"; paper: {table['paper_source']}" if has_paper else "")]  # fmt: skip
    header = ["Module"] + [f"{c} {m}".strip() for c in columns for m in per_column]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["layout"]["rows"]:
        entries = [row["label"]]
        for key in row["cells"]:
            cell = cells[key]
            if cell["refused"]:
                entries += [REFUSED, REFUSED]
            else:
                entries += [percent(cell.get("top1"), seeds), percent(cell.get("top5"), seeds)]
            if has_paper:
                entries += [paper_value(cell, "top1"), paper_value(cell, "top5")]
        lines.append("| " + " | ".join(entries) + " |")
    lines += ["", "| cell | runs | top-1 % | top-5 % | Δ top-1 vs baseline (paired) | Δ > 0 | s/epoch | × baseline "
              "| params |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for cell in table["cells"]:
        name = " · ".join(cell["labels"].values()) or cell["key"]
        if cell["refused"]:
            lines.append(f"| {name} | {REFUSED} | | | | | | | |")
            continue
        if cell["runs_as"] != cell["key"]:  # the same network as a cell above: its line says it all
            continue
        runs = ", ".join(f"{n} {s}" for s, n in cell.get("states", {}).items()) or "none yet"
        diff = cell.get("diff_top1")
        seconds = cell.get("epoch_s")
        lines.append(" | ".join([
            f"| {name} ({cell['key']})", runs, percent(cell.get("top1"), seeds), percent(cell.get("top5"), seeds),
            percent(diff, seeds, signed=True) if diff else "", f"{diff['positive']}/{diff['n']}" if diff else "",
            f"{seconds['mean']:.1f}" if seconds else NOT_RUN,
            f"{cell['epoch_s_ratio']:.2f}" if cell.get("epoch_s_ratio") else "",
            f"{cell['params']:,}" if cell.get("params") else "",
        ]) + " |")  # fmt: skip
    refused = [cell for cell in table["cells"] if cell["refused"]]
    if refused:
        lines += ["", f"{REFUSED}: " + "; ".join(f"{' · '.join(c['labels'].values())}: {c['refused']}"
                                                 for c in refused)]  # fmt: skip
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ["cell", "labels", "runs_as", "refused", "n", "top1_mean", "top1_std", "top5_mean", "top5_std",
               "diff_top1_mean", "diff_top1_std", "diff_top1_positive", "diff_top5_mean", "diff_top5_std",
               "epoch_s_mean", "epoch_s_std", "epoch_s_ratio", "params", "paper_top1", "paper_top5"]  # fmt: skip


def to_csv(table: dict[str, Any]) -> str:
    """One row per cell, fractions (not percent), empty where there is no value."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for cell in table["cells"]:
        row: dict[str, Any] = {"cell": cell["key"], "labels": " · ".join(cell["labels"].values()),
                               "runs_as": cell["runs_as"] or "", "refused": cell["refused"] or ""}  # fmt: skip
        for name in ("top1", "top5", "diff_top1", "diff_top5", "epoch_s"):
            stats = cell.get(name) or {}
            row[f"{name}_mean"], row[f"{name}_std"] = stats.get("mean"), stats.get("std")
            row["n"] = row.get("n") or (stats.get("n") if name == "top1" else None)
            if name.startswith("diff_top1"):
                row["diff_top1_positive"] = stats.get("positive")
        row["epoch_s_ratio"], row["params"] = cell.get("epoch_s_ratio"), cell.get("params")
        paper = cell.get("paper") or {}
        row["paper_top1"], row["paper_top5"] = paper.get("top1"), paper.get("top5")
        writer.writerow({k: ("" if v is None else v) for k, v in row.items() if k in CSV_COLUMNS})
    return buffer.getvalue()


FORMATS = {"md": markdown, "csv": to_csv}
