"""Statistics of the bench: intervals against scipy.stats, lr robustness, the headline."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from geolora.bench.stats import (
    Interval,
    headline,
    lr_robust_decades,
    paired_difference,
    t_interval,
)

SAMPLES = [
    [0.512, 0.538, 0.527],
    [1.0, 2.0, 3.0, 4.0, 10.0],
    [-3.2, 0.1],
    list(np.random.default_rng(0).normal(5.0, 2.0, size=17)),
]


@pytest.mark.parametrize("xs", SAMPLES)
@pytest.mark.parametrize("conf", [0.95, 0.9, 0.99])
def test_t_interval_matches_scipy(xs, conf) -> None:
    iv = t_interval(xs, conf)
    ref = stats.ttest_1samp(xs, 0.0).confidence_interval(confidence_level=conf)
    assert iv.n == len(xs) and iv.mean == pytest.approx(np.mean(xs), abs=1e-14)
    assert iv.low == pytest.approx(ref.low, rel=1e-12, abs=1e-14)
    assert iv.high == pytest.approx(ref.high, rel=1e-12, abs=1e-14)
    lo, hi = stats.t.interval(conf, len(xs) - 1, loc=np.mean(xs), scale=stats.sem(xs))
    assert (iv.low, iv.high) == pytest.approx((lo, hi), rel=1e-12)


def test_t_interval_known_value_and_edge_cases() -> None:
    # 1, 2, 3: mean 2, s = 1, t_{2, 0.975} = 4.30265273 (tables) -> half width 4.30265273 / sqrt(3)
    iv = t_interval([1.0, 2.0, 3.0])
    assert iv.high - 2.0 == pytest.approx(4.30265273 / math.sqrt(3), rel=1e-8)
    # diverged runs (None / NaN / inf) are left out and not counted
    assert t_interval([1.0, None, 2.0, math.nan, 3.0, math.inf]) == iv
    one = t_interval([0.5])
    assert one.n == 1 and one.mean == 0.5 and not one.defined and one.as_list() == [None, None]
    none = t_interval([None, math.nan])
    assert none.n == 0 and math.isnan(none.mean)
    same = t_interval([0.25, 0.25, 0.25])
    assert same.low == same.high == 0.25
    with pytest.raises(ValueError, match="confidence"):
        t_interval([1.0, 2.0], confidence=1.0)


def test_paired_difference_matches_ttest_rel() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(0.6, 0.02, size=5)
    b = a - 0.01 + rng.normal(0, 0.003, size=5)
    iv = paired_difference(dict(enumerate(a)), dict(enumerate(b)))
    ref = stats.ttest_rel(a, b).confidence_interval()
    assert iv.n == 5 and iv.mean == pytest.approx(np.mean(a - b), abs=1e-15)
    assert (iv.low, iv.high) == pytest.approx((ref.low, ref.high), rel=1e-12)
    # pairing matters: only common seeds with finite values on both sides count
    part = paired_difference({0: 1.0, 1: 2.0, 2: None, 3: 4.0}, {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.0})
    assert part.n == 2 and part.mean == pytest.approx(0.75)


def test_lr_robust_decades() -> None:
    lrs = [1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2]
    # best at 1e-3; 3.16e-4 and 3.16e-3 within 2 % of it; 1e-2 diverged
    scores = [0.40, 0.595, 0.60, 0.591, None]
    assert lr_robust_decades(lrs, scores, higher_is_better=True, tol=0.02) == pytest.approx(1.0, rel=1e-3)
    # default tolerance 10 %: 0.55 is near 0.6, 0.5 is not
    assert lr_robust_decades(lrs, [0.5, 0.55, 0.6, 0.3, None], higher_is_better=True) == pytest.approx(
        0.5, rel=1e-3
    )
    # a gap breaks the range: 1e-4 is near-best but 3.16e-4 is not
    assert lr_robust_decades(lrs, [0.6, 0.5, 0.6, 0.3, 0.2], higher_is_better=True, tol=0.02) == 0.0
    # lower is better, relative tolerance on an error scale
    err = [1e-2, 1.01e-3, 1e-3, 1.5e-3, 1e-1]
    assert lr_robust_decades(lrs, err, higher_is_better=False) == pytest.approx(0.5, rel=1e-3)
    assert lr_robust_decades(lrs, err, higher_is_better=False, tol=0.6) == pytest.approx(1.0, rel=1e-3)
    assert math.isnan(lr_robust_decades(lrs, [None] * 5, higher_is_better=True))
    # grid order does not matter
    assert lr_robust_decades(lrs[::-1], scores[::-1], higher_is_better=True, tol=0.02) == pytest.approx(
        1.0, rel=1e-3
    )


def _iv(xs):
    return t_interval(xs)


def test_headline_names_a_winner_only_when_intervals_separate() -> None:
    separated = {
        "adamw": _iv([0.50, 0.51, 0.52]),
        "adams": _iv([0.60, 0.61, 0.62]),
        "lora_rite": _iv([0.55, 0.555, 0.56]),
    }
    h = headline(separated, metric="accuracy", higher_is_better=True)
    assert h.winner == "adams" and h.tied == ()
    assert h.text.startswith("winner on accuracy: adams") and "lora_rite" in h.text

    tied = {
        "adamw": _iv([0.50, 0.53, 0.56]),
        "adams": _iv([0.52, 0.55, 0.58]),
        "far": _iv([0.10, 0.11, 0.12]),
    }
    h = headline(tied, metric="accuracy", higher_is_better=True)
    assert h.winner is None and h.tied == ("adams", "adamw")
    assert "statistically tied" in h.text and "far" not in h.text

    # lower is better: the smallest mean wins when separated
    low = {"a": _iv([1.0, 1.1, 1.2]), "b": _iv([2.0, 2.1, 2.2])}
    assert headline(low, metric="rel_error", higher_is_better=False).winner == "a"
    # one seed: no interval, no winner, however large the gap
    one = {"a": _iv([0.9]), "b": _iv([0.1])}
    h = headline(one, metric="accuracy", higher_is_better=True)
    assert h.winner is None and "1 seed" in h.text
    # a diverged optimizer is left out of the ranking
    h = headline({"a": _iv([None, None]), "b": _iv([0.1, 0.2])}, metric="m", higher_is_better=True)
    assert h.winner is None and h.tied == ("b",)
    assert headline({}, metric="m", higher_is_better=True).winner is None


def test_interval_overlap() -> None:
    a = Interval(0.5, 0.4, 0.6, 3)
    assert a.overlaps(Interval(0.65, 0.6, 0.7, 3))  # touching counts as overlapping
    assert not a.overlaps(Interval(0.75, 0.61, 0.9, 3))
    assert a.overlaps(Interval(0.9, math.nan, math.nan, 1))  # undefined: cannot separate
