"""milp.stats: paired bootstrap by user, wins/ties/losses, LaMP's ROUGE aggregation."""

import numpy as np
import pytest
from rouge_score import rouge_scorer, scoring

from milp.errors import MilpError
from milp.metrics import rouge_l
from milp.stats import (
    bootstrap_aggregate,
    compare,
    lower_is_better,
    paired_bootstrap,
    wins_ties_losses,
)

PAIRS = [
    ("police arrest man in city", "police arrest a man downtown"),
    ("storm hits coast", "storm batters the coast overnight"),
    ("council approves budget", "city council approves new budget"),
    ("team wins final", "local team loses the final"),
    ("just in: mayor resigns", "mayor resigns after vote"),
]


@pytest.mark.parametrize(
    "n, n_samples, seed", [(1, 10, 0), (5, 1000, 0), (48, 1000, 3), (301, 200, 7)]
)
def test_bootstrap_aggregate_is_rouge_scores_aggregator_bit_for_bit(n, n_samples, seed):
    """Same per-example scores, same numpy seed and resample count -> the same low/mid/high
    as rouge_score's BootstrapAggregator (what HF evaluate's rouge reports as the score)."""
    rng = np.random.default_rng(seed)
    precision, recall, fmeasure = rng.random((3, n))
    aggregator = scoring.BootstrapAggregator(n_samples=n_samples)
    for p, r, f in zip(precision, recall, fmeasure, strict=True):
        aggregator.add_scores({"rougeL": scoring.Score(p, r, f)})
    np.random.seed(seed)
    theirs = aggregator.aggregate()["rougeL"]
    ours = bootstrap_aggregate(fmeasure, n_samples=n_samples, seed=seed)
    assert ours.estimate == theirs.mid.fmeasure
    assert (ours.low, ours.high) == (theirs.low.fmeasure, theirs.high.fmeasure)


def test_bootstrap_aggregate_on_real_rouge_scores_matches_the_package():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    aggregator = scoring.BootstrapAggregator()
    for prediction, gold in PAIRS:
        aggregator.add_scores(scorer.score(gold, prediction))
    np.random.seed(0)
    mid = aggregator.aggregate()["rougeL"].mid.fmeasure
    ours = bootstrap_aggregate([rouge_l(p, g) for p, g in PAIRS], seed=0)
    # milp's ROUGE-L equals rouge_score's up to float rounding (tests/test_metrics.py).
    assert ours.estimate == pytest.approx(mid, abs=1e-12)
    assert ours.low <= ours.estimate <= ours.high
    assert bootstrap_aggregate([rouge_l(p, g) for p, g in PAIRS], seed=0) == ours  # seeded


def test_bootstrap_median_sits_below_the_plain_mean_on_right_skewed_scores():
    """Mostly-zero scores with a few high ones (ROUGE on a hard task): the resampled means
    are right-skewed, so their median is at or below the plain mean, never above."""
    scores = [0.0] * 6 + [0.2, 0.5, 1.0, 1.0]
    mids = [bootstrap_aggregate(scores, seed=seed).estimate for seed in range(5)]
    assert all(mid <= np.mean(scores) for mid in mids) and min(mids) < np.mean(scores)


def test_paired_bootstrap_interval_is_seeded_and_brackets_the_mean():
    d = [0.1, 0.3, -0.05, 0.2, 0.0, 0.15, 0.25, 0.05]
    first = paired_bootstrap(d, resamples=5000, seed=1)
    assert first == paired_bootstrap(d, resamples=5000, seed=1)
    assert first != paired_bootstrap(d, resamples=5000, seed=2)
    assert first.estimate == pytest.approx(np.mean(d))
    assert first.low < first.estimate < first.high and first.excludes_zero()
    # Wider at 99%, and the percentile interval of a constant difference is that constant.
    wider = paired_bootstrap(d, resamples=5000, confidence=0.99, seed=1)
    assert wider.low <= first.low and wider.high >= first.high
    constant = paired_bootstrap([0.2] * 5)
    assert (constant.estimate, constant.low, constant.high) == pytest.approx((0.2, 0.2, 0.2))


def test_paired_bootstrap_covers_zero_for_noise_and_shrinks_with_more_users():
    rng = np.random.default_rng(0)
    small = paired_bootstrap(rng.normal(0, 1, 10), seed=0)
    large = paired_bootstrap(rng.normal(0, 1, 1000), seed=0)
    assert not large.excludes_zero()
    assert (large.high - large.low) < (small.high - small.low) / 5


def test_compare_pairs_users_by_id_and_counts_wins_ties_losses():
    memory = {"u1": 0.9, "u2": 0.5, "u3": 0.40, "u4": 0.7, "only-here": 1.0}
    baseline = {"u4": 0.2, "u3": 0.45, "u2": 0.504, "u1": 0.3, "elsewhere": 0.0}
    result = compare(memory, baseline, "rougeL", tolerance=0.01, resamples=2000)
    assert result.users == 4  # users scored by both only
    assert (result.wins, result.ties, result.losses) == (2, 1, 1)
    assert result.mean_a == pytest.approx(np.mean([0.9, 0.5, 0.4, 0.7]))
    assert result.difference.estimate == pytest.approx(np.mean([0.6, -0.004, -0.05, 0.5]))


def test_lower_is_better_metrics_count_a_lower_value_as_a_win():
    assert lower_is_better("nll") and lower_is_better("gold_nll") and not lower_is_better("rougeL")
    result = compare({"a": 1.0, "b": 2.0}, {"a": 1.5, "b": 1.9}, "nll", resamples=100)
    assert (result.wins, result.ties, result.losses) == (1, 0, 1)
    assert result.difference.estimate == pytest.approx(-0.2)
    assert wins_ties_losses([1.0], [1.0]) == (0, 1, 0)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(MilpError, match="no user is scored in both"):
        compare({"a": 1.0}, {"b": 1.0}, "rougeL")
    with pytest.raises(MilpError, match="non-empty"):
        paired_bootstrap([])
    with pytest.raises(MilpError, match="non-empty"):
        bootstrap_aggregate([])
