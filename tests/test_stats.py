"""experiments/stats.py: paired bootstrap by user, wins/ties/losses, LaMP's ROUGE
aggregation, the paired t-interval, the sign-flip p-value, the NLL decomposition and the
seed spread."""

import json
import sys
from dataclasses import asdict
from fractions import Fraction
from itertools import product

import numpy as np
import pytest
from conftest import ROOT
from rouge_score import rouge_scorer, scoring

from milp.errors import MilpError
from milp.evaluation.metrics import rouge_l

sys.path.insert(0, str(ROOT / "experiments"))
from stats import (  # noqa: E402 (a script folder, not a package)
    bootstrap_aggregate,
    compare,
    lower_is_better,
    nll_decomposition,
    paired_bootstrap,
    paired_t,
    paired_test,
    seed_spread,
    sign_flip_p,
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


def test_paired_t_interval_matches_the_hand_computation():
    # d = 1..4: mean 2.5, sd sqrt(5/3) = 1.2910, se 0.6455, t(0.975, 3 df) = 3.1824,
    # half-width 3.1824 * 0.6455 = 2.0543.
    t = paired_t([1, 2, 3, 4])
    assert (t.users, t.mean) == (4, 2.5)
    assert t.sd == pytest.approx(1.2910, abs=1e-4) and t.se == pytest.approx(0.6455, abs=1e-4)
    assert (t.low, t.high) == pytest.approx((0.4457, 4.5543), abs=1e-4)
    assert t.excludes_zero() and t.format() == "+2.5000 [+0.4457, +4.5543]"
    # 90%: t(0.95, 3 df) = 2.3534 -> half-width 1.5191.
    assert (paired_t([1, 2, 3, 4], confidence=0.9).low) == pytest.approx(0.9809, abs=1e-4)
    # Two users, d = [0, 2]: mean 1, se 1, t(0.975, 1 df) = 12.7062.
    two = paired_t([0.0, 2.0])
    assert (two.low, two.high) == pytest.approx((-11.7062, 13.7062), abs=1e-4)
    assert not two.excludes_zero()


def test_fewer_than_two_users_give_the_mean_and_no_interval():
    one = paired_t([0.3])
    assert (one.users, one.mean) == (1, 0.3)
    assert (one.sd, one.se, one.low, one.high) == (None, None, None, None)
    assert not one.excludes_zero()
    assert one.format() == "+0.3000 (1 user: no interval)" and "±" not in one.format()
    row = paired_test({"u": 0.9, "x": 1.0}, {"u": 0.5, "y": 0.0}, "rougeL")
    assert row.users == 1 and row.difference.low is None and row.better() is None
    assert row.sign_flip.p == 1.0  # both sign patterns of one user reach |0.4|
    assert "no interval" in row.format()


def test_sign_flip_p_enumerates_every_pattern():
    # d = 1, 2, 3: of the 8 sign patterns only +++ and --- reach |mean| = 2.
    result = sign_flip_p([1, 2, 3])
    assert (result.observed, result.p, result.permutations, result.exact) == (2.0, 0.25, 8, True)
    assert sign_flip_p([1.0, -1.0]).p == 1.0  # observed 0: every pattern reaches it
    assert sign_flip_p([0.0, 0.0, 0.0]).p == 1.0


def test_sign_flip_p_counts_float_ties_as_reached():
    """Decimal differences whose sign patterns tie with the observed |sum| only up to float
    rounding: p equals the exact rational count."""
    d = [0.1, 0.2, -0.3, 0.3, 0.6, -0.1]
    exact = [Fraction(str(x)) for x in d]
    reach = sum(
        abs(sum(s * x for s, x in zip(signs, exact, strict=True))) >= abs(sum(exact))
        for signs in product([1, -1], repeat=len(d))
    )
    assert sign_flip_p(d).p == Fraction(reach, 2 ** len(d)) == Fraction(7, 16)


def test_sign_flip_p_monte_carlo_is_seeded_and_never_zero():
    # Forced onto random patterns: close to the exact 0.25 of d = 1, 2, 3.
    drawn = sign_flip_p([1, 2, 3], resamples=20_000, seed=3, exact_users=0)
    assert not drawn.exact and drawn.permutations == 20_000 and drawn.seed == 3
    assert drawn.p == pytest.approx(0.25, abs=0.01)
    assert drawn == sign_flip_p([1, 2, 3], resamples=20_000, seed=3, exact_users=0)
    # 30 equal positive differences: only 2 of 2^30 patterns reach, none drawn -> 1/(m+1).
    many = sign_flip_p([1.0] * 30, resamples=999)
    assert not many.exact and many.p == 1 / 1000


def test_paired_test_row_is_direction_aware_and_agrees_with_compare():
    memory = {"u1": 0.9, "u2": 0.5, "u3": 0.40, "u4": 0.7, "only-here": 1.0}
    baseline = {"u4": 0.2, "u3": 0.45, "u2": 0.504, "u1": 0.3, "elsewhere": 0.0}
    row = paired_test(memory, baseline, "rougeL", tolerance=0.01)
    old = compare(memory, baseline, "rougeL", tolerance=0.01, resamples=200)
    assert (row.users, row.wins, row.ties, row.losses) == (4, 2, 1, 1)
    assert (row.mean_a, row.mean_b) == (old.mean_a, old.mean_b)
    assert row.difference.mean == pytest.approx(old.difference.estimate)
    assert row.sign_flip.exact and row.sign_flip.permutations == 16
    assert not row.lower_better
    # NLL: A lower for every user by 0.4-0.6 nats -> A better, wins counted as lower.
    a = {f"u{i}": 2.0 + 0.1 * i for i in range(6)}
    b = {u: v + 0.5 + 0.02 * (i % 3) for i, (u, v) in enumerate(a.items())}
    nll = paired_test(a, b, "gold_nll")
    assert nll.lower_better and (nll.wins, nll.ties, nll.losses) == (6, 0, 0)
    assert nll.difference.mean < 0 and nll.difference.high < 0 and nll.better() == "a"
    assert nll.sign_flip.p == 2 / 64  # all six the same sign: only +...+ and -...- reach
    assert paired_test(a, b, "rougeL").better() == "b"  # the same numbers, higher better
    json.dumps(asdict(nll))  # a row is stored as plain JSON


def test_nll_decomposition_splits_the_total_into_domain_and_owner():
    none = {"a": 3.0, "b": 4.0, "c": 5.0, "gone": 1.0}
    swapped = {"a": 2.5, "b": 3.0, "c": 4.5}
    own = {"a": 2.0, "b": 3.0, "c": 3.5}
    parts = nll_decomposition(none, swapped, own)
    assert set(parts) == {"domain", "owner", "total"}
    # Per user: domain 0.5, 1.0, 0.5; owner 0.5, 0.0, 1.0; total 1.0, 1.0, 1.5.
    assert parts["domain"].difference.mean == pytest.approx(2 / 3)
    assert parts["owner"].difference.mean == pytest.approx(0.5)
    assert parts["total"].difference.mean == pytest.approx(7 / 6)
    total = parts["total"].difference
    assert total.mean == pytest.approx(parts["domain"].difference.mean + 0.5)
    assert total.sd == pytest.approx(np.std([1.0, 1.0, 1.5], ddof=1))
    assert all(p.users == 3 and not p.lower_better for p in parts.values())
    # A positive part helps: the owner part helps a and c and ties on b.
    assert (parts["owner"].wins, parts["owner"].ties, parts["owner"].losses) == (2, 1, 0)
    assert parts["total"].better() == "a"  # interval above 0: the memory lowers NLL
    assert parts["total"].sign_flip.p == 2 / 8
    with pytest.raises(MilpError, match="no user is scored under none, swapped and own"):
        nll_decomposition({"a": 1.0}, {"b": 1.0}, {"a": 1.0})


def test_seed_spread_shows_no_spread_for_one_seed():
    assert seed_spread([0.73166]) == "0.7317 (1 seed)"
    assert seed_spread([0.8612, 0.8575, 0.8649]) == "0.8612 ± 0.0037 (3 seeds)"
    assert seed_spread([0.5, 0.5], digits=2) == "0.50 ± 0.00 (2 seeds)"  # a real zero spread
    with pytest.raises(MilpError, match="seed_spread: needs a non-empty"):
        seed_spread([])


def test_bad_paired_inputs_are_one_line_errors():
    with pytest.raises(MilpError, match="paired_t: needs a non-empty"):
        paired_t([])
    with pytest.raises(MilpError, match="sign_flip_p: a per-user difference is not finite"):
        sign_flip_p([0.1, float("nan")])
    with pytest.raises(MilpError, match="confidence must be in"):
        paired_t([1, 2], confidence=1.0)
    with pytest.raises(MilpError, match="resamples must be >= 1"):
        sign_flip_p([1, 2], resamples=0)
