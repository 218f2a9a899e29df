"""Statistics of ``geolora bench``: intervals over seeds, paired differences, lr robustness and
the headline that names a winner only where the intervals separate it.

Intervals are Student-t intervals (not bootstrap: with 3–5 seeds a bootstrap interval is too
narrow, since resampling 3 values has only 10 distinct outcomes):

* mean over ``n`` seeds: ``x̄ ± t_{n−1, 1−α/2} · s / √n`` with ``s`` the sample standard
  deviation (``ddof = 1``); Student (1908), the interval of ``scipy.stats.ttest_1samp``;
* paired difference ``d_i = x_i − y_i`` on the same seeds: the same interval applied to ``d``
  (the interval of ``scipy.stats.ttest_rel``).

With one seed, or one finite value, no interval exists: the functions return NaN bounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

__all__ = [
    "Headline",
    "Interval",
    "headline",
    "lr_robust_decades",
    "paired_difference",
    "t_interval",
]


@dataclass(frozen=True)
class Interval:
    """``mean`` and the two-sided ``confidence`` interval ``[low, high]`` of ``n`` values."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    @property
    def defined(self) -> bool:
        """True when both bounds are finite (n ≥ 2)."""
        return math.isfinite(self.low) and math.isfinite(self.high)

    def as_list(self) -> list[float | None]:
        """``[low, high]`` for JSON (None where undefined)."""
        return [self.low if self.defined else None, self.high if self.defined else None]

    def overlaps(self, other: Interval) -> bool:
        """True unless both intervals are defined and disjoint."""
        if not (self.defined and other.defined):
            return True
        return not (self.high < other.low or other.high < self.low)


def _finite(values: Sequence[float | None]) -> np.ndarray:
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    return arr[np.isfinite(arr)]


def t_interval(values: Sequence[float | None], confidence: float = 0.95) -> Interval:
    """Student-t interval ``x̄ ± t_{n−1,(1+c)/2} s/√n`` of the finite ``values``.

    Non-finite entries and None (diverged runs) are left out; ``n`` counts the rest. With
    ``n == 0`` the mean is NaN, with ``n == 1`` the bounds are NaN. Identical values give a
    zero-width interval.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    x = _finite(values)
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, confidence)
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, confidence)
    sem = float(x.std(ddof=1)) / math.sqrt(n)
    half = float(_st.t.ppf(0.5 + confidence / 2, df=n - 1)) * sem
    return Interval(mean, mean - half, mean + half, n, confidence)


def paired_difference(
    x: Mapping[int, float | None], y: Mapping[int, float | None], confidence: float = 0.95
) -> Interval:
    """t-interval of ``x[s] − y[s]`` over the seeds ``s`` where both are finite.

    ``x`` and ``y`` map a seed to a metric value (None or NaN: a diverged run, left out).
    """
    common = sorted(s for s in x if s in y)
    d = []
    for s in common:
        a, b = x[s], y[s]
        if a is not None and b is not None and math.isfinite(a) and math.isfinite(b):
            d.append(float(a) - float(b))
    return t_interval(d, confidence)


def lr_robust_decades(
    lrs: Sequence[float],
    scores: Sequence[float | None],
    *,
    higher_is_better: bool,
    tol: float = 0.1,
) -> float:
    """Width in decades of the learning-rate range whose score is near the best.

    A grid point is near-best when ``|score − best| ≤ tol · |best|`` (relative tolerance,
    default 10 %); a non-finite score (diverged) is never near-best. The range is the run of
    consecutive grid points (sorted by lr) around the best point that are all near-best, and
    its width is ``log10(lr_high / lr_low)`` (0 when only the best point qualifies; NaN when
    no point has a finite score).
    """
    if len(lrs) != len(scores):
        raise ValueError(f"lrs and scores must have equal length, got {len(lrs)} and {len(scores)}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    pairs = sorted(zip(lrs, scores), key=lambda p: p[0])
    vals = [math.nan if s is None else float(s) for _, s in pairs]
    finite = [i for i, v in enumerate(vals) if math.isfinite(v)]
    if not finite:
        return math.nan
    best_i = (max if higher_is_better else min)(finite, key=lambda i: vals[i])
    best = vals[best_i]

    def near(i: int) -> bool:
        return math.isfinite(vals[i]) and abs(vals[i] - best) <= tol * abs(best)

    lo = hi = best_i
    while lo > 0 and near(lo - 1):
        lo -= 1
    while hi < len(vals) - 1 and near(hi + 1):
        hi += 1
    return math.log10(pairs[hi][0] / pairs[lo][0])


@dataclass(frozen=True)
class Headline:
    """The verdict of one comparison.

    Attributes:
        winner: the optimizer whose interval lies entirely on the better side of every other
            optimizer's interval, else None.
        tied: the optimizers whose intervals overlap the best mean's interval (best first);
            empty when there is a winner.
        text: one line for the console and the results page.
    """

    winner: str | None
    tied: tuple[str, ...]
    text: str


def headline(
    intervals: Mapping[str, Interval], *, metric: str, higher_is_better: bool
) -> Headline:
    """Name a winner only where its 95 % interval is disjoint from the runner-up's.

    Optimizers are ranked by mean (no finite mean: left out). The best one wins when both its
    interval and the runner-up's are defined (n ≥ 2) and they do not overlap; the runner-up is
    the closest competitor, so the winner is then separated from all. Otherwise every optimizer
    whose interval overlaps the best one's is statistically tied with it.
    """
    ranked = [(k, v) for k, v in intervals.items() if math.isfinite(v.mean)]
    if not ranked:
        return Headline(None, (), f"no {metric} to compare: no finished, finite run at a chosen lr")
    ranked.sort(key=lambda kv: kv[1].mean, reverse=higher_is_better)
    best_name, best = ranked[0]

    def fmt(name: str, iv: Interval) -> str:
        ci = f" [{iv.low:.4g}, {iv.high:.4g}]" if iv.defined else ""
        return f"{name} {iv.mean:.4g}{ci}"

    if len(ranked) == 1:
        return Headline(None, (best_name,), f"only {fmt(best_name, best)} has a finite {metric}")
    if not best.defined:
        n = best.n
        return Headline(
            None,
            tuple(k for k, _ in ranked),
            f"no winner: {n} seed(s) give no interval for {metric}; run --seeds 3 or more",
        )
    runner_name, runner = ranked[1]
    if runner.defined and not best.overlaps(runner):
        return Headline(
            best_name,
            (),
            f"winner on {metric}: {fmt(best_name, best)}; its 95% interval is disjoint from the "
            f"runner-up's, {fmt(runner_name, runner)}",
        )
    tied = tuple(k for k, v in ranked if v.overlaps(best))
    return Headline(
        None,
        tied,
        f"no winner on {metric}: {', '.join(tied)} are statistically tied (95% intervals overlap "
        f"{fmt(best_name, best)})",
    )
