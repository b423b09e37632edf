"""Paired comparisons: is system B better than system A on the same test items, beyond noise?

Two fine-tuned models scored on the same queries differ partly by chance: which queries happen to
be in the test split. Comparing them *paired* (item by item) removes the variation the two share,
so a small real difference can be seen. Two tools, both exact about what they assume:

* `paired_bootstrap`: a percentile bootstrap confidence interval for ``statistic(B) - statistic(A)``,
  resampling test items with replacement (the same items for both systems). Works for any metric
  computed from per-item values: recall@k (per query 0/1), MRR (per query 1/rank), exact match,
  and corpus perplexity (per answer ``[nll, tokens]``, the statistic ``exp(Σnll / Σtokens)``).
  Seeded, so a notebook prints the same interval every run.
* `time_ratio`: the ratio of two mean times measured in pairs (rounds of a benchmark, each timing
  both sides), with the bootstrap interval of `paired_bootstrap` resampling whole rounds;
  `median_time_ratio`: the median of the rounds' ratios, with its interval so; `speedup`: the same
  number read the other way, how many times faster one side runs than a baseline.
* `mcnemar`: McNemar's exact test for two systems' right/wrong answers on the same items. Only
  the items where exactly one system is right carry information; under "no difference" each of
  those is equally likely to favour either system, a Binomial(n, ½) count.

The convention the chapters follow: call a difference a gain (or a loss) only when the 95%
interval excludes zero, and "within noise" otherwise. A difference prints with its interval to two
significant digits of the interval's half-width (`format_difference`): ``-430 [95% CI -640, -300]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .checks import positive_int


@dataclass(frozen=True)
class PairedDifference:
    """``statistic(B) - statistic(A)`` on the test items, with its bootstrap interval."""
    a: float
    b: float
    difference: float
    low: float
    high: float
    confidence: float
    n: int
    n_resamples: int

    @property
    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of zero (strictly)."""
        return self.low > 0 or self.high < 0

    def verdict(self, higher_is_better: bool = True) -> str:
        """"gain", "loss" or "within noise", from the interval (not from the point estimate)."""
        if not self.excludes_zero:
            return "within noise"
        better = self.low > 0 if higher_is_better else self.high < 0
        return "gain" if better else "loss"

    def __str__(self) -> str:
        return format_difference(self.difference, self.low, self.high, label=f"{self.confidence:.0%} CI ")


def interval_decimals(low: float, high: float) -> int:
    """Decimal places worth printing for an interval: two significant digits of its half-width.

    The rule physicists use for a value and its uncertainty (the Particle Data Group's): digits
    below the uncertainty's second are noise. They are also the digits that change when the same
    chapter runs on another CPU (AVX-512 and AVX2 sum in different orders). A half-width of 168
    gives -1 (tens), 0.45 gives 2, 0.023 gives 3; a zero-width interval (two identical systems)
    gives 3. Negative means rounding to tens, hundreds, ...
    """
    half_width = (high - low) / 2
    if not half_width > 0:
        return 3
    return 1 - math.floor(math.log10(half_width))


def format_difference(difference: float, low: float, high: float, label: str = "95% CI ") -> str:
    """``+x [95% CI lo, hi]``, each number to the places of `interval_decimals` (also for a
    difference a benchmark recorded: its ``difference``, ``low`` and ``high``)."""
    places = interval_decimals(low, high)

    def show(x: float) -> str:
        return f"{round(x, places):+.{max(places, 0)}f}"

    return f"{show(difference)} [{label}{show(low)}, {show(high)}]"


def _as_items(name: str, values) -> np.ndarray:
    array = np.asarray(values.detach().cpu().numpy() if hasattr(values, "detach") else values, dtype=np.float64)
    if array.ndim not in (1, 2):
        raise ValueError(f"{name} must hold one value per test item (1-D) or one row per item (2-D), "
                         f"got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values: score every item with a finite number")
    return array


def _mean(rows: np.ndarray) -> np.ndarray:
    return rows.mean(axis=-1)


def paired_bootstrap(a, b, statistic: Callable[[np.ndarray], np.ndarray] | None = None, *,
                     n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0) -> PairedDifference:
    """Percentile bootstrap interval of ``statistic(b) - statistic(a)`` over the same test items.

    ``a`` and ``b`` hold one value per item (or one row per item, e.g. ``[nll, tokens]``), in the
    same item order. ``statistic`` maps items to a number and must be *batched*: it receives an
    array of shape ``(n_resamples, n)`` (or ``(n_resamples, n, columns)``) and returns one value per
    resample; the default is the mean. Each resample draws n item indices with replacement and uses
    them for both systems (that is what makes it paired).
    """
    a, b = _as_items("a", a), _as_items("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must score the same test items: shapes {a.shape} and {b.shape} differ")
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"a paired interval needs at least 2 test items, got {n}")
    positive_int("n_resamples", n_resamples)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1 (0.95 for a 95% interval), got {confidence}")
    statistic = statistic or _mean
    point_a, point_b = float(statistic(a[None])[0]), float(statistic(b[None])[0])
    rng = np.random.default_rng(seed)
    differences = np.empty(n_resamples)
    for start in range(0, n_resamples, 1000):       # bounded memory: 1000 resamples at a time
        idx = rng.integers(0, n, size=(min(1000, n_resamples - start), n))
        differences[start:start + len(idx)] = statistic(b[idx]) - statistic(a[idx])
    tail = (1 - confidence) / 2
    low, high = np.quantile(differences, [tail, 1 - tail])
    return PairedDifference(a=point_a, b=point_b, difference=point_b - point_a, low=float(low), high=float(high),
                            confidence=confidence, n=n, n_resamples=n_resamples)


def corpus_perplexity(rows: np.ndarray) -> np.ndarray:
    """Batched statistic for `paired_bootstrap` on rows ``[nll, tokens]`` per answer:
    ``exp(Σ nll / Σ tokens)``, the perplexity of all answers together (as `instruct.perplexity`)."""
    return np.exp(rows[..., 0].sum(-1) / rows[..., 1].sum(-1))


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test: ``a_only`` items only A got right, ``b_only`` only B; ``p_value`` two-sided."""
    a_only: int
    b_only: int
    both: int
    neither: int
    p_value: float

    def __str__(self) -> str:
        return (f"only A right: {self.a_only}, only B right: {self.b_only} "
                f"(both {self.both}, neither {self.neither}); exact McNemar p = {self.p_value:.3g}")


def mcnemar(a_correct, b_correct) -> McNemar:
    """Exact two-sided McNemar test of two systems' right/wrong answers on the same items.

    With ``n = a_only + b_only`` discordant items and ``k = min(a_only, b_only)``, the p-value is
    ``min(1, 2 · P[Binomial(n, ½) ≤ k])``; with no discordant item it is 1 (no evidence either way).
    """
    a = np.asarray(a_correct.detach().cpu().numpy() if hasattr(a_correct, "detach") else a_correct)
    b = np.asarray(b_correct.detach().cpu().numpy() if hasattr(b_correct, "detach") else b_correct)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a_correct and b_correct must be 1-D, one entry per item, same length: "
                         f"shapes {a.shape} and {b.shape}")
    for name, x in (("a_correct", a), ("b_correct", b)):
        if not np.isin(x, (0, 1)).all():
            raise ValueError(f"{name} must hold right/wrong values (True/False or 1/0), got {sorted(set(x.tolist()))[:5]}")
    a, b = a.astype(bool), b.astype(bool)
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    n, k = a_only + b_only, min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n if n else 1.0
    return McNemar(a_only=a_only, b_only=b_only, both=int((a & b).sum()), neither=int((~a & ~b).sum()),
                   p_value=min(1.0, 2 * tail))


def time_ratio(numerator_seconds, denominator_seconds) -> dict:
    """``mean(numerator) / mean(denominator)`` of times measured in pairs (the same round, the same
    input), with a seeded 95% percentile bootstrap interval that resamples whole rounds, so each
    resample keeps the pairs together (`paired_bootstrap` on the log of the mean time).
    Verdict: ``"slower"`` (the numerator's) when the interval lies above 1, ``"faster"`` below 1,
    else ``"within noise"``. The benchmarks record their paired timings so (`benchmarks.report`)."""
    d = paired_bootstrap(denominator_seconds, numerator_seconds, lambda t: np.log(t.mean(axis=-1)))
    return _ratio_record(math.exp(d.difference), math.exp(d.low), math.exp(d.high), d.n)


def median_time_ratio(numerator_seconds, denominator_seconds) -> dict:
    """The median over rounds of ``numerator / denominator``, each the two times of one round, with
    a seeded 95% percentile bootstrap interval that resamples whole rounds (`paired_bootstrap`, the
    statistic the median of the resampled rounds' ratios). Where `time_ratio` weighs every second
    alike, this counts every round alike: one round a slow spell spoiled moves the median little,
    which suits calls of a millisecond, where a spell lasts longer than the call. The same keys and
    verdicts as `time_ratio`; the point is ``statistics.median`` of the ratios."""
    numerator, denominator = _as_items("numerator_seconds", numerator_seconds), _as_items(
        "denominator_seconds", denominator_seconds)
    if numerator.ndim != 1 or numerator.shape != denominator.shape:
        raise ValueError(f"numerator_seconds and denominator_seconds must hold one time per round, the same "
                         f"rounds: shapes {numerator.shape} and {denominator.shape}")
    for name, seconds in (("numerator_seconds", numerator), ("denominator_seconds", denominator)):
        if not (seconds > 0).all():
            raise ValueError(f"{name} holds a time <= 0: a measured time is positive")
    ratios = numerator / denominator
    d = paired_bootstrap(np.zeros_like(ratios), ratios, lambda r: np.median(r, axis=-1))
    return _ratio_record(d.difference, d.low, d.high, d.n)


def speedup(baseline_seconds, seconds) -> dict:
    """How many times faster ``seconds``' side runs than the baseline's, measured in the same
    rounds: `median_time_ratio` ``(baseline_seconds, seconds)``, the median of the rounds'
    ``baseline / seconds`` with its interval, and the verdict named for ``seconds``' side:
    ``"faster"`` when the whole interval lies above 1, ``"slower"`` below 1, else
    ``"within noise"``. (A throughput ratio, ours over a library's, is such a speed-up.)"""
    record = median_time_ratio(baseline_seconds, seconds)
    record["verdict"] = "faster" if record["low"] > 1 else "slower" if record["high"] < 1 else "within noise"
    return record


def _ratio_record(ratio: float, low: float, high: float, rounds: int) -> dict:
    verdict = "slower" if low > 1 else "faster" if high < 1 else "within noise"
    return {"ratio": ratio, "low": low, "high": high, "rounds": rounds, "verdict": verdict}
