"""The one definition of "reaches fp32's accuracy", used by every FL report.

* A run's **accuracy** is the mean test accuracy of its last ``TAIL_ROUNDS`` evaluated rounds
  (one round's accuracy jumps by a point or more on a few hundred test samples).
* A codec is **within P points of fp32** only if the 95% confidence interval of its
  accuracy minus fp32's, paired by seed (same data split, initial model and client sample),
  lies above -P points. If the interval lies wholly below -P it **lags**; if it straddles
  -P the runs are **inconclusive**; with one seed there is no interval (**undetermined**).
* The **target accuracy** for time- and bytes-to-accuracy is fp32's mean accuracy minus P
  points; a run **reaches** it at the first round whose trailing ``TAIL_ROUNDS``-round mean
  accuracy is at least the target.

Intervals are Student-t intervals over seeds (``scipy.stats.t``); with 3 seeds the 95%
interval is mean +- 4.30 standard errors, so only clear differences are called.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

TAIL_ROUNDS = 3
TARGET_POINTS = 1.0
LEVEL = 0.95

WITHIN, LAGS, INCONCLUSIVE, UNDETERMINED = "within", "lags", "inconclusive", "undetermined"


@dataclass(frozen=True)
class Interval:
    """Mean of n values and its two-sided confidence interval (nan bounds when n < 2)."""

    mean: float
    low: float
    high: float
    n: int

    def text(self, scale: float = 1.0, digits: int = 1, signed: bool = False) -> str:
        """"94.1 [93.2, 95.0]" (values times `scale`); just the mean when n < 2."""
        sign = "+" if signed else ""
        mean = f"{self.mean * scale:{sign}.{digits}f}"
        if self.n < 2:
            return mean
        return f"{mean} [{self.low * scale:{sign}.{digits}f}, {self.high * scale:{sign}.{digits}f}]"


def json_default(value: object) -> object:
    """``json.dumps(..., default=json_default)``: an Interval as a dict, anything else as
    its text."""
    if isinstance(value, Interval):
        return {"mean": value.mean, "low": value.low, "high": value.high, "n": value.n}
    return str(value)


def mean_ci(values: Sequence[float], level: float = LEVEL) -> Interval:
    """The mean of `values` and its Student-t confidence interval at `level`."""
    from scipy import stats

    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_ci needs at least one value")
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(f"mean_ci got a non-finite value: {vals}")
    n = len(vals)
    mean = sum(vals) / n
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def run_accuracy(accuracies: Sequence[float], tail: int = TAIL_ROUNDS) -> float:
    """A run's accuracy: the mean of its last `tail` evaluated rounds."""
    if not accuracies:
        raise ValueError("run_accuracy needs at least one round")
    last = list(accuracies)[-tail:]
    return sum(last) / len(last)


def verdict(difference: Interval, points: float = TARGET_POINTS) -> str:
    """WITHIN, LAGS, INCONCLUSIVE or UNDETERMINED for a (codec - fp32) accuracy interval."""
    margin = -points / 100
    if difference.n < 2:
        return UNDETERMINED
    if difference.low >= margin:
        return WITHIN
    if difference.high < margin:
        return LAGS
    return INCONCLUSIVE


def paired_difference(codec: dict[int, float], reference: dict[int, float]) -> Interval:
    """The interval of codec - reference accuracy over the seeds both ran."""
    seeds = sorted(set(codec) & set(reference))
    if not seeds:
        raise ValueError("no seed in common between the codec's and the reference's runs")
    return mean_ci([codec[s] - reference[s] for s in seeds])


def first_reach(accuracies: Sequence[float], target: float, tail: int = TAIL_ROUNDS
                ) -> int | None:
    """The first index i whose trailing mean of accuracies[i-tail+1 .. i] is >= target, or
    None when the run never gets there (index 0 is the initial model)."""
    accs = list(accuracies)
    for i in range(len(accs)):
        window = accs[max(0, i - tail + 1):i + 1]
        if sum(window) / len(window) >= target:
            return i
    return None


__all__ = ["INCONCLUSIVE", "LAGS", "LEVEL", "TAIL_ROUNDS", "TARGET_POINTS", "UNDETERMINED",
           "WITHIN", "Interval", "first_reach", "json_default", "mean_ci", "paired_difference",
           "run_accuracy", "verdict"]
