"""Paired comparisons: the bootstrap interval against hand-worked cases, scipy's bootstrap and its
coverage on synthetic data; McNemar's exact test against scipy's binomial test."""

import math
import statistics

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from course_lib import stats


def test_constant_differences_give_a_zero_width_interval():
    """Every item improves by exactly 0.25: every resample's mean difference is 0.25."""
    a = np.array([0.1, 0.5, 0.2, 0.7])
    result = stats.paired_bootstrap(a, a + 0.25, n_resamples=500)
    assert result.difference == pytest.approx(0.25)
    assert result.low == pytest.approx(0.25) and result.high == pytest.approx(0.25)
    assert result.excludes_zero and result.verdict() == "gain" and result.verdict(higher_is_better=False) == "loss"


def test_two_item_interval_is_the_exact_bootstrap_distribution():
    """Differences [0, 1]: a resample of 2 items has mean 0, ½, 1 with probability ¼, ½, ¼, so the
    2.5% and 97.5% quantiles are exactly 0 and 1, and the interval does not exclude zero."""
    result = stats.paired_bootstrap([0.0, 0.0], [0.0, 1.0], n_resamples=4000, seed=3)
    assert (result.low, result.high, result.difference) == (0.0, 1.0, 0.5)
    assert not result.excludes_zero and result.verdict() == "within noise"


def test_pairing_removes_the_shared_variation():
    """Items vary a lot (sd 1) and B beats A by 0.1 ± 0.02 on each: paired, the interval is about
    ±0.004 around 0.1; unpaired (scipy's independent-samples bootstrap) it spans zero."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=400)
    b = a + 0.1 + rng.normal(scale=0.02, size=400)
    paired = stats.paired_bootstrap(a, b)
    assert paired.low > 0.09 and paired.high < 0.11
    unpaired = scipy_stats.bootstrap((b, a), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis),
                                     method="percentile", n_resamples=2000, rng=np.random.default_rng(1))
    assert unpaired.confidence_interval.low < 0 < unpaired.confidence_interval.high


def test_interval_agrees_with_scipys_paired_percentile_bootstrap():
    """scipy.stats.bootstrap(paired=True, method="percentile") resamples the same way with its own
    random numbers: the two intervals agree within Monte-Carlo error (20,000 resamples each)."""
    rng = np.random.default_rng(5)
    a = (rng.random(300) < 0.55).astype(float)      # per-query recall@10 of two systems
    b = np.where(rng.random(300) < 0.15, 1.0, a)
    ours = stats.paired_bootstrap(a, b, n_resamples=20_000)
    ref = scipy_stats.bootstrap((b, a), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis), paired=True,
                                method="percentile", n_resamples=20_000, rng=np.random.default_rng(6))
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.004)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.004)


def test_coverage_on_synthetic_data_is_close_to_95_percent():
    """400 synthetic experiments with a true mean difference of 0.3: the 95% interval contains 0.3
    in 95% of them, up to the percentile method's small-sample shortfall and sampling error
    (binomial sd of the coverage over 400 runs: 1.1 points)."""
    rng = np.random.default_rng(11)
    hits = 0
    for seed in range(400):
        a = rng.normal(size=60)
        b = a + 0.3 + rng.normal(size=60)
        r = stats.paired_bootstrap(a, b, n_resamples=1000, seed=seed)
        hits += r.low <= 0.3 <= r.high
    assert 0.91 <= hits / 400 <= 0.98


def test_seeded_interval_is_reproducible_and_a_seed_changes_it():
    a, b = np.sin(np.arange(50.0)), np.cos(np.arange(50.0))
    assert stats.paired_bootstrap(a, b, seed=1) == stats.paired_bootstrap(a, b, seed=1)
    assert stats.paired_bootstrap(a, b, seed=1).low != stats.paired_bootstrap(a, b, seed=2).low


def test_corpus_perplexity_statistic_weights_answers_by_tokens():
    """Rows [nll, tokens]: perplexity is exp(Σnll / Σtokens), not the mean of per-answer perplexities.
    A system that halves every answer's NLL has lower perplexity on every resample."""
    rows = np.array([[2.0, 1.0], [6.0, 3.0], [1.0, 4.0]])
    assert stats.corpus_perplexity(rows[None])[0] == pytest.approx(math.exp(9 / 8))
    better = rows * [0.5, 1.0]
    r = stats.paired_bootstrap(rows, better, stats.corpus_perplexity, n_resamples=300)
    assert r.difference == pytest.approx(math.exp(9 / 16) - math.exp(9 / 8))
    assert r.high < 0 and r.verdict(higher_is_better=False) == "gain"


@pytest.mark.parametrize("a_only,b_only", [(0, 0), (0, 7), (3, 12), (10, 10), (25, 40), (1, 0)])
def test_mcnemar_equals_scipys_exact_binomial_test(a_only, b_only):
    """The exact McNemar p-value is the two-sided binomial test of b_only out of the discordant
    items at p = ½ (scipy.stats.binomtest), and concordant items change nothing."""
    a = np.array([1] * a_only + [0] * b_only + [1] * 5 + [0] * 8)
    b = np.array([0] * a_only + [1] * b_only + [1] * 5 + [0] * 8)
    result = stats.mcnemar(a.astype(bool), torch.tensor(b))
    assert (result.a_only, result.b_only, result.both, result.neither) == (a_only, b_only, 5, 8)
    expected = 1.0 if a_only + b_only == 0 else scipy_stats.binomtest(b_only, a_only + b_only, 0.5).pvalue
    assert result.p_value == pytest.approx(expected, rel=1e-12)


def test_mcnemar_hand_worked_case():
    """0 against 7 discordant items: p = 2 · (½)^7 = 1/64."""
    assert stats.mcnemar([0] * 7, [1] * 7).p_value == pytest.approx(1 / 64)


@pytest.mark.parametrize("call,message", [
    (lambda: stats.paired_bootstrap([1, 2, 3], [1, 2]), "same test items"),
    (lambda: stats.paired_bootstrap([1.0], [2.0]), "at least 2"),
    (lambda: stats.paired_bootstrap([1, float("nan")], [1, 2]), "NaN"),
    (lambda: stats.paired_bootstrap([1, 2], [1, 2], confidence=95), "between 0 and 1"),
    (lambda: stats.paired_bootstrap(np.zeros((2, 2, 2)), np.zeros((2, 2, 2))), "one value per test item"),
    (lambda: stats.mcnemar([1, 0], [1]), "same length"),
    (lambda: stats.mcnemar([0.3, 1], [1, 0]), "right/wrong"),
])
def test_bad_input_is_refused_with_a_message(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _difference(difference, low, high):
    return stats.PairedDifference(a=0.0, b=difference, difference=difference, low=low, high=high,
                                  confidence=0.95, n=100, n_resamples=1000)


@pytest.mark.parametrize("difference, low, high, printed", [
    # half-width 0.0225: two significant digits are thousandths
    (0.0593, 0.0378, 0.0828, "+0.059 [95% CI +0.038, +0.083]"),
    # half-width 168.0: tens
    (-433.583, -638.646, -302.691, "-430 [95% CI -640, -300]"),
    # half-width 2.264: tenths
    (-0.968, -4.011, 0.517, "-1.0 [95% CI -4.0, +0.5]"),
    # half-width 2626: hundreds
    (-1689.493, -5844.963, -592.043, "-1700 [95% CI -5800, -600]"),
    # a zero-width interval keeps three places
    (0.25, 0.25, 0.25, "+0.250 [95% CI +0.250, +0.250]"),
])
def test_printed_to_two_significant_digits_of_the_half_width(difference, low, high, printed):
    assert str(_difference(difference, low, high)) == printed


@pytest.mark.parametrize("avx2, avx512", [
    # the same comparisons computed on an AVX2 and on an AVX-512 CPU (chapters 01, 02, 06): they differ
    # below the interval's second significant digit, so they print the same
    ((-433.583, -638.646, -302.691), (-433.587, -638.653, -302.694)),
    ((-1689.493, -5844.963, -592.043), (-1689.512, -5845.010, -592.048)),
    ((1552.497, 545.189, 5351.164), (1552.588, 545.221, 5351.449)),
    ((-0.968, -4.011, 0.517), (-0.966, -4.009, 0.520)),
    ((1050.195, 360.500, 3558.778), (1050.210, 360.497, 3558.844)),
])
def test_digits_that_differ_between_cpus_are_not_printed(avx2, avx512):
    assert str(_difference(*avx2)) == str(_difference(*avx512))


def test_a_recorded_difference_prints_by_the_same_rule():
    # a benchmark's JSON keeps difference, low and high; half-width 0.0195 -> thousandths
    assert stats.format_difference(0.0356, 0.016, 0.055, label="") == "+0.036 [+0.016, +0.055]"
    assert stats.interval_decimals(-0.79, 0.62) == 2 and stats.interval_decimals(545, 5351) == -2
    assert stats.interval_decimals(0.1, 0.1) == 3


def test_time_ratio_keeps_the_rounds_paired():
    # rounds that differ tenfold (a busy spell), one side always 5% slower in its own round: every
    # resample of whole rounds gives exactly 1.05, so the interval is that point, clear of 1
    base = [1.0, 10.0, 1.2, 9.0, 1.1, 11.0]
    slower = stats.time_ratio([1.05 * t for t in base], base)
    assert slower["ratio"] == pytest.approx(1.05) and slower["rounds"] == 6
    assert (slower["low"], slower["high"]) == (pytest.approx(1.05), pytest.approx(1.05))
    assert slower["verdict"] == "slower"
    assert stats.time_ratio([0.5 * t for t in base], base)["verdict"] == "faster"
    # means 4 / 5 = 0.8, but a resample of only the first-kind rounds gives 2 and of the second 0.5:
    # the interval spans 1
    mixed = stats.time_ratio([1.0, 1.0, 1.0, 1.0], [0.5, 2.0, 0.5, 2.0])
    assert mixed["ratio"] == pytest.approx(0.8)
    assert mixed["low"] < 1 < mixed["high"] and mixed["verdict"] == "within noise"


def test_median_time_ratio_counts_rounds_not_seconds():
    # every round's ratio 1.05 whatever its length: the interval is that point, as for time_ratio
    base = [1.0, 10.0, 1.2, 9.0, 1.1, 11.0]
    slower = stats.median_time_ratio([1.05 * t for t in base], base)
    assert slower["ratio"] == pytest.approx(1.05) and slower["rounds"] == 6 and slower["verdict"] == "slower"
    assert (slower["low"], slower["high"]) == (pytest.approx(1.05), pytest.approx(1.05))
    # one round of nine spoiled (the numerator 100 times as long): the median of the ratios stays 1
    # (the spoiled round would need 5 of a resample's 9 draws to move it, p < 0.001), while the
    # ratio of mean times is (8 + 100) / 9 = 12
    spoiled = [1.0] * 8 + [100.0]
    assert stats.median_time_ratio(spoiled, [1.0] * 9) == {
        "ratio": 1.0, "low": 1.0, "high": 1.0, "rounds": 9, "verdict": "within noise"}
    assert stats.time_ratio(spoiled, [1.0] * 9)["ratio"] == pytest.approx(12.0)
    # an even number of rounds: the point is statistics.median's, the mean of the middle two ratios
    assert stats.median_time_ratio([1.0, 3.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0])["ratio"] == pytest.approx(2.5)
    assert stats.median_time_ratio([0.5, 0.6, 0.55], [1.0, 1.0, 1.0])["verdict"] == "faster"


def test_median_time_ratio_agrees_with_scipy_s_percentile_bootstrap():
    rng = np.random.default_rng(1)
    den = rng.uniform(1, 2, 41)
    num = den * rng.lognormal(0.05, 0.1, 41)
    ours = stats.median_time_ratio(num, den)
    theirs = scipy_stats.bootstrap((num / den,), np.median, method="percentile", n_resamples=10_000,
                       random_state=3).confidence_interval
    assert ours["ratio"] == statistics.median(num / den)
    # other random resamples: the ends agree to well within the gap between neighbouring rounds' ratios
    assert ours["low"] == pytest.approx(theirs.low, abs=0.005) and ours["high"] == pytest.approx(theirs.high, abs=0.005)
    assert ours["low"] < ours["ratio"] < ours["high"]


def test_speedup_is_the_median_ratio_read_from_the_faster_side():
    # a search timed against brute force in 5 rounds: brute force's time over the search's, each
    # round 2x whatever the machine's pace, so the speed-up and its interval are 2 and the search's
    # verdict "faster", where median_time_ratio names the numerator's (brute force's) time "slower"
    brute, search = [0.8, 1.0, 0.9, 1.2, 0.7], [0.4, 0.5, 0.45, 0.6, 0.35]
    up = stats.speedup(brute, search)
    assert up == {**stats.median_time_ratio(brute, search), "verdict": "faster"}
    assert (up["ratio"], up["low"], up["high"]) == (pytest.approx(2.0),) * 3
    assert stats.median_time_ratio(brute, search)["verdict"] == "slower"
    # read the other way round: half as fast, "slower"; a 1x ratio between noisy rounds: within noise
    assert stats.speedup(search, brute)["verdict"] == "slower"
    assert stats.speedup([1.0, 1.1, 0.9, 1.0], [1.05, 1.0, 1.0, 0.95])["verdict"] == "within noise"
    with pytest.raises(ValueError, match="the same rounds"):
        stats.speedup([1.0, 2.0], [1.0])


@pytest.mark.parametrize("num, den, match", [
    ([1.0, 2.0], [1.0], "the same rounds"),
    ([1.0, 2.0], [1.0, 0.0], "denominator_seconds holds a time <= 0"),
    ([0.0, 2.0], [1.0, 1.0], "numerator_seconds holds a time <= 0"),
    ([1.0], [1.0], "at least 2"),
])
def test_median_time_ratio_refuses_unpaired_or_impossible_times(num, den, match):
    with pytest.raises(ValueError, match=match):
        stats.median_time_ratio(num, den)
