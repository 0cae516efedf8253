"""Comparing two methods on the same users: paired bootstrap intervals, per-user wins,
and LaMP's bootstrap aggregation of ROUGE.

Two methods that answered the same users are compared *by user*: the difference of their
per-user scores is resampled over users (a user's queries stay together, since they share
one memory and one history), giving a percentile interval for the mean difference.

LaMP's published ROUGE (through Hugging Face ``evaluate``'s ``rouge``) is not the plain
mean over examples but ``rouge_score.scoring.BootstrapAggregator``'s ``mid``: the median
of 1,000 means of examples resampled with replacement. `bootstrap_aggregate` computes the
same statistic with its own seeded generator and is bit-equal to the aggregator run after
``numpy.random.seed(seed)`` (``tests/test_stats.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from milp.errors import MilpError

#: Per-user metrics where a lower value is better (likelihood-type scores).
LOWER_IS_BETTER_SUFFIXES = ("nll", "ppl", "perplexity", "loss")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of `metric` is the better one (NLL, perplexity, loss)."""
    return metric.lower().endswith(LOWER_IS_BETTER_SUFFIXES)


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided percentile interval."""

    estimate: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class PairedComparison:
    """Method A minus method B on the users both answered."""

    metric: str
    users: int
    mean_a: float  # mean over the shared users
    mean_b: float
    difference: Interval  # mean over users of (A - B), with its bootstrap interval
    wins: int  # users where A is better by more than the tolerance
    ties: int
    losses: int
    tolerance: float
    resamples: int
    confidence: float
    seed: int


def paired_users(
    a: Mapping[str, float], b: Mapping[str, float], what: str = "the two runs"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The users both mappings score (sorted ids) and their two score vectors."""
    users = sorted(set(a) & set(b))
    if not users:
        raise MilpError(f"{what}: no user is scored in both, nothing to compare")
    return (
        users,
        np.array([a[u] for u in users], dtype=np.float64),
        np.array([b[u] for u in users], dtype=np.float64),
    )


def paired_bootstrap(
    differences: Sequence[float],
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Mean of per-user differences with a percentile bootstrap interval over users.

    Each resample draws as many users as there are, with replacement, from a
    ``numpy.random.default_rng(seed)`` stream, so the same inputs give the same interval.
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise MilpError("paired_bootstrap: needs a non-empty list of per-user differences")
    if resamples < 1 or not 0 < confidence < 1:
        raise MilpError("paired_bootstrap: resamples must be >= 1 and confidence in (0, 1)")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(d.mean()), float(low), float(high))


def wins_ties_losses(
    a: Sequence[float], b: Sequence[float], tolerance: float = 0.0, lower_better: bool = False
) -> tuple[int, int, int]:
    """Per user: A wins when better than B by more than `tolerance`; a tie is
    ``|A - B| <= tolerance``."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if lower_better:
        d = -d
    wins = int((d > tolerance).sum())
    losses = int((d < -tolerance).sum())
    return wins, d.size - wins - losses, losses


def compare(
    a: Mapping[str, float],
    b: Mapping[str, float],
    metric: str,
    *,
    tolerance: float = 0.0,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """A vs B on one per-user metric (user id -> score): bootstrap interval and W/T/L."""
    users, va, vb = paired_users(a, b, metric)
    w, t, l_ = wins_ties_losses(va, vb, tolerance, lower_is_better(metric))
    return PairedComparison(
        metric=metric,
        users=len(users),
        mean_a=float(va.mean()),
        mean_b=float(vb.mean()),
        difference=paired_bootstrap(va - vb, resamples=resamples, confidence=confidence, seed=seed),
        wins=w,
        ties=t,
        losses=l_,
        tolerance=tolerance,
        resamples=resamples,
        confidence=confidence,
        seed=seed,
    )


def bootstrap_aggregate(
    scores: Sequence[float], *, n_samples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """rouge_score's BootstrapAggregator on per-example scores: ``estimate`` is its
    ``mid`` (the median of `n_samples` resampled means), ``low``/``high`` its interval.

    Bit-equal to ``BootstrapAggregator(confidence, n_samples).aggregate()`` run after
    ``numpy.random.seed(seed)``: the legacy generator draws the same indices
    (``choice(arange(n), n)`` is ``randint(0, n, n)``), each mean is a sequential sum
    over the sample divided by n (the aggregator's column mean of its (example, measure)
    matrix), and the percentiles are taken at the aggregator's own q values.
    """
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise MilpError("bootstrap_aggregate: needs a non-empty list of per-example scores")
    if n_samples < 1 or not 0 <= confidence <= 1:
        raise MilpError("bootstrap_aggregate: n_samples must be >= 1 and confidence in [0, 1]")
    rng = np.random.RandomState(seed)
    indices = rng.randint(0, x.size, size=(n_samples, x.size))
    means = np.cumsum(x[indices], axis=1)[:, -1] / x.size
    delta = (1 - confidence) / 2
    low, mid, high = np.percentile(means, 100 * np.array([delta, 0.5, 1 - delta]))
    return Interval(float(mid), float(low), float(high))
