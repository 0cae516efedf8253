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

`paired_test` is the row a reviewer reads: the mean per-user difference with its Student-t
interval (`paired_t`), the sign-flip permutation p-value (`sign_flip_p`: under H0 the
differences are symmetric about 0, so every sign pattern is equally likely) and W/T/L.
`nll_decomposition` splits what a memory does to NLL into a domain part and an owner part;
`seed_spread` prints a metric over seeds without inventing a spread for one seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import stdtrit

from milp.errors import MilpError
from milp.evaluation.attribution_stats import PermutationP

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


#: Sign-flip p-values enumerate all 2^n sign patterns up to this many users (2^20 ~ 1e6).
EXACT_SIGN_FLIP_USERS = 20
_CHUNK_CELLS = 1 << 22  # sign patterns x users scored at once: memory stays ~32 MB
_RELATIVE_TIE = 1e-9  # statistics this close (relative to their scale) count as reached


@dataclass(frozen=True)
class PairedT:
    """Mean of n per-user differences with its two-sided Student-t interval (n - 1 df).

    With fewer than two users there is no spread to estimate: `sd`, `se`, `low` and `high`
    are None rather than a zero-width interval."""

    users: int
    mean: float
    sd: float | None
    se: float | None
    confidence: float
    low: float | None
    high: float | None

    def excludes_zero(self) -> bool:
        """Whether the interval exists and lies wholly on one side of 0."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    def format(self, digits: int = 4) -> str:
        """``+2.5000 [+0.4457, +4.5543]``, or ``+2.5000 (1 user: no interval)``."""
        if self.low is None or self.high is None:
            return f"{self.mean:+.{digits}f} ({self.users} user: no interval)"
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


@dataclass(frozen=True)
class PairedTest:
    """Method A against method B on the users both answered: Δ = A - B per user (raw, as
    `compare`), its t-interval, the sign-flip p-value, and W/T/L counted in the metric's
    direction (`lower_better`: a lower A wins)."""

    metric: str
    users: int
    mean_a: float
    mean_b: float
    difference: PairedT
    sign_flip: PermutationP
    wins: int
    ties: int
    losses: int
    tolerance: float
    lower_better: bool

    def better(self) -> str | None:
        """'a' or 'b' when the t-interval lies wholly on that method's better side, else None."""
        if not self.difference.excludes_zero():
            return None
        a_higher = self.difference.mean > 0
        return "a" if a_higher != self.lower_better else "b"

    def format(self, digits: int = 4) -> str:
        """One line: Δ with its interval, the sign-flip p and W/T/L."""
        kind = "exact" if self.sign_flip.exact else f"{self.sign_flip.permutations:,} draws"
        return (
            f"Δ {self.difference.format(digits)} ({self.difference.confidence:.0%} t), "
            f"sign-flip p {self.sign_flip.p:.4g} ({kind}), "
            f"W/T/L {self.wins}/{self.ties}/{self.losses} over {self.users} users"
        )


def _differences(differences: Sequence[float], what: str) -> np.ndarray:
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise MilpError(f"{what}: needs a non-empty list of per-user differences")
    if not np.isfinite(d).all():
        raise MilpError(f"{what}: a per-user difference is not finite (NaN or inf)")
    return d


def paired_t(differences: Sequence[float], *, confidence: float = 0.95) -> PairedT:
    """Mean, standard error and two-sided `confidence` Student-t interval (n - 1 degrees of
    freedom) of per-user differences; one user gives the mean with no interval."""
    d = _differences(differences, "paired_t")
    if not 0 < confidence < 1:
        raise MilpError("paired_t: confidence must be in (0, 1)")
    mean = float(d.mean())
    if d.size < 2:
        return PairedT(1, mean, None, None, confidence, None, None)
    sd = float(d.std(ddof=1))
    se = sd / np.sqrt(d.size)
    half = float(stdtrit(d.size - 1, 0.5 + confidence / 2)) * se
    return PairedT(
        int(d.size), mean, sd, float(se), confidence, float(mean - half), float(mean + half)
    )


def sign_flip_p(
    differences: Sequence[float],
    *,
    resamples: int = 10_000,
    seed: int = 0,
    exact_users: int = EXACT_SIGN_FLIP_USERS,
) -> PermutationP:
    """Two-sided sign-flip permutation p-value of the mean per-user difference.

    H0: each user's difference is symmetric about 0, so flipping its sign is as likely as
    not. p is the share of sign patterns whose |mean| reaches the observed |mean| (within a
    relative 1e-9, so float ties count): all 2^n patterns when n <= `exact_users`, else
    `resamples` patterns drawn from ``numpy.random.default_rng(seed)``, p = (b+1)/(m+1).
    """
    d = _differences(differences, "sign_flip_p")
    if resamples < 1:
        raise MilpError("sign_flip_p: resamples must be >= 1")
    n = d.size
    observed = abs(float(d.sum()))
    bar = observed - _RELATIVE_TIE * float(np.abs(d).sum())
    bits = np.arange(n, dtype=np.int64)
    reached = 0
    chunk = max(1, _CHUNK_CELLS // n)
    if n <= exact_users:
        total = 1 << n
        for start in range(0, total, chunk):
            codes = np.arange(start, min(start + chunk, total), dtype=np.int64)
            signs = 1.0 - 2.0 * ((codes[:, None] >> bits) & 1)
            reached += int((np.abs(signs @ d) >= bar).sum())
        return PermutationP(float(d.mean()), reached / total, total, True, None)
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, chunk):
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(min(chunk, resamples - start), n))
        reached += int((np.abs(signs @ d) >= bar).sum())
    return PermutationP(float(d.mean()), (reached + 1) / (resamples + 1), resamples, False, seed)


def paired_test(
    a: Mapping[str, float],
    b: Mapping[str, float],
    metric: str,
    *,
    tolerance: float = 0.0,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedTest:
    """A vs B on one per-user metric (user id -> score), on the users both score: Δ = A - B
    with its t-interval, the sign-flip p-value (`resamples` and `seed` used only above
    `EXACT_SIGN_FLIP_USERS` users) and W/T/L in the metric's direction (`lower_is_better`)."""
    users, va, vb = paired_users(a, b, metric)
    lower = lower_is_better(metric)
    w, t, l_ = wins_ties_losses(va, vb, tolerance, lower)
    return PairedTest(
        metric=metric,
        users=len(users),
        mean_a=float(va.mean()),
        mean_b=float(vb.mean()),
        difference=paired_t(va - vb, confidence=confidence),
        sign_flip=sign_flip_p(va - vb, resamples=resamples, seed=seed),
        wins=w,
        ties=t,
        losses=l_,
        tolerance=tolerance,
        lower_better=lower,
    )


def nll_decomposition(
    none: Mapping[str, float],
    swapped: Mapping[str, float],
    own: Mapping[str, float],
    *,
    tolerance: float = 0.0,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, PairedTest]:
    """What a memory does to a user's NLL (user id -> NLL under no memory, under another
    user's memory, under the user's own), split into parts, each a `paired_test` over the
    users all three score: ``domain`` = none - swapped (any memory of the task helps),
    ``owner`` = swapped - own (the owner's memory helps beyond that), ``total`` = none - own
    = domain + owner. Each part is an NLL reduction in nats: positive means the memory
    helps, and a win is a user whose part exceeds `tolerance`."""
    users = sorted(set(none) & set(swapped) & set(own))
    if not users:
        raise MilpError("nll_decomposition: no user is scored under none, swapped and own")
    parts = {"domain": (none, swapped), "owner": (swapped, own), "total": (none, own)}
    return {
        name: paired_test(
            {u: a[u] for u in users},
            {u: b[u] for u in users},
            # Named as a reduction (higher is better), so W/T/L count users it helps.
            f"nll reduction ({name})",
            tolerance=tolerance,
            confidence=confidence,
            resamples=resamples,
            seed=seed,
        )
        for name, (a, b) in parts.items()
    }


def seed_spread(values: Sequence[float], digits: int = 4) -> str:
    """A metric over seeds: ``0.8612 ± 0.0037 (3 seeds)`` (sample std), or ``0.7317
    (1 seed)``: one seed has no spread to show."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise MilpError("seed_spread: needs a non-empty list of per-seed values")
    if x.size == 1:
        return f"{x[0]:.{digits}f} (1 seed)"
    return f"{x.mean():.{digits}f} ± {x.std(ddof=1):.{digits}f} ({x.size} seeds)"
