"""Is a difference real? Two sets of runs paired on the seeds both have: the differences' mean, its 95 %
confidence interval (Student's t on the paired differences, as SciPy's ``ttest_rel`` tests them), on how many seeds
it was positive, and how many seeds the spread observed would need before the interval excludes zero."""

import statistics
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
MAX_SEEDS = 10_000  # past this, "seeds to resolve" is None: the difference is noise at any budget anyone runs


def half_width(std: float, n: np.ndarray | int) -> np.ndarray | float:
    """Half the width of the interval around a mean of ``n`` paired differences with sample std ``std``."""
    return stats.t.ppf(0.5 + CONFIDENCE / 2, np.asarray(n) - 1) * std / np.sqrt(n)


def seeds_to_resolve(mean: float, std: float | None) -> int | None:
    """The fewest seeds whose interval, at this mean and spread, would exclude zero; None when no number would
    (a zero mean, a single seed's unknown spread, or more than `MAX_SEEDS`)."""
    if std is None or mean == 0:
        return None
    if std == 0:
        return 2
    counts = np.arange(2, MAX_SEEDS + 1)
    enough = np.flatnonzero(half_width(std, counts) < abs(mean))
    return int(counts[enough[0]]) if enough.size else None


def paired_difference(a: dict[int, float], b: dict[int, float], higher_is_better: bool = True) -> dict[str, Any] | None:
    """``a − b`` seed by seed, over the seeds both have (None when they share none). ``better`` counts the seeds
    where ``a`` was better: higher, or lower for an error."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[seed] - b[seed] for seed in seeds]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if len(diffs) > 1 else None
    ci95 = None
    if std is not None:
        half = float(half_width(std, len(diffs)))
        ci95 = [mean - half, mean + half]
    return {
        "mean": mean,
        "std": std,
        "n": len(diffs),
        "values": diffs,
        "seeds": seeds,
        "positive": sum(d > 0 for d in diffs),
        "better": sum(d > 0 if higher_is_better else d < 0 for d in diffs),
        "ci95": ci95,
        "resolved": ci95 is not None and (ci95[0] > 0 or ci95[1] < 0),
        "seeds_to_resolve": seeds_to_resolve(mean, std),
    }
