"""Personalization metrics: ROUGE-1/ROUGE-L (LaMP's definition), BLEU, persona F1, and the
gold output's likelihood (mean token NLL and perplexity).

ROUGE follows the `rouge_score` package that LaMP's evaluation uses, with stemming off:
text is lower-cased, every run of characters outside [a-z0-9] is a separator, and the
F-measure is averaged over examples. We re-implement it (a few lines) instead of
depending on `rouge_score` at run time; `tests/test_metrics.py` checks the two agree.

The likelihood metric scores the gold output itself, not the generated answer: `nll` is
the mean negative log-likelihood (nats per token) of the gold's tokens given the prompt
(computed in `milp.inject.answer.gold_nll`), averaged over examples like the other
scores; `ppl` is exp(nll) at every level of aggregation. Lower is better for both.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torchmetrics import Metric
from torchmetrics.functional.text import bleu_score

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Split text into lower-case alphanumeric tokens, as `rouge_score` does."""
    return [tok for tok in _NON_ALNUM.sub(" ", text.lower()).split() if tok]


def _f_measure(overlap: float, n_pred: int, n_ref: int) -> float:
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def rouge_1(prediction: str, reference: str) -> float:
    """ROUGE-1 F-measure between two strings (unigram overlap with counts)."""
    pred, ref = tokenize(prediction), tokenize(reference)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    return _f_measure(overlap, len(pred), len(ref))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # One row of the classic dynamic programme is enough for the length.
    previous = [0] * (len(b) + 1)
    for token_a in a:
        current = [0]
        for j, token_b in enumerate(b, start=1):
            if token_a == token_b:
                current.append(previous[j - 1] + 1)
            else:
                current.append(max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure between two strings (longest common subsequence)."""
    return rouge_l_parts(prediction, reference)[2]


def rouge_l_parts(prediction: str, reference: str) -> tuple[float, float, float]:
    """ROUGE-L (precision, recall, F-measure): what F trades, e.g. a short answer's
    precision against a long one's recall."""
    pred, ref = tokenize(prediction), tokenize(reference)
    lcs = _lcs_length(pred, ref)
    precision = lcs / len(pred) if pred else 0.0
    recall = lcs / len(ref) if ref else 0.0
    return precision, recall, _f_measure(lcs, len(pred), len(ref))


def persona_scores(response: str, history: Iterable[str]) -> tuple[float, float, float]:
    """Persona precision, recall and F1 of a response against a user's history.

    H is the set of tokens in all of the user's history texts and R the set of tokens in
    the response: P = |H∩R|/|R|, Rec = |H∩R|/|H|. All three are 0 when either set is
    empty. F1 grows with response length, which is why P and Rec are reported too.
    """
    history_tokens = set()
    for text in history:
        history_tokens.update(tokenize(text))
    return persona_scores_from_tokens(response, history_tokens)


def persona_scores_from_tokens(
    response: str, history_tokens: set[str]
) -> tuple[float, float, float]:
    """`persona_scores` with the user's history already reduced to a token set."""
    response_tokens = set(tokenize(response))
    overlap = len(response_tokens & history_tokens)
    if overlap == 0:
        return 0.0, 0.0, 0.0
    precision = overlap / len(response_tokens)
    recall = overlap / len(history_tokens)
    return precision, recall, 2 * precision * recall / (precision + recall)


METRIC_NAMES = ("rouge1", "rougeL", "bleu", "persona_p", "persona_r", "persona_f1")
# Scores of the gold output's likelihood; lower is better (a sweeper minimizes them).
LIKELIHOOD_NAMES = ("nll",)
# What a run may return to a sweeper as its objective.
OBJECTIVE_NAMES = METRIC_NAMES + LIKELIHOOD_NAMES


def perplexity(nll: float) -> float:
    """exp(mean token NLL); inf where that overflows a float."""
    return math.exp(nll) if nll < 700 else math.inf


class ResponseMetrics(Metric):
    """Accumulates per-example ROUGE, BLEU and persona scores, and the gold's NLL where
    given; `compute` averages them.

    One instance is kept per user (reset between users) and one for the whole run, so
    the same numbers give per-user and overall figures. BLEU is sentence-level BLEU-4
    with smoothing (torchmetrics), averaged over examples like the other scores.
    `nll` and `ppl` are in the result only if every example came with an NLL.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in METRIC_NAMES:
            self.add_state(
                name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("nll_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        predictions: Sequence[str],
        references: Sequence[str],
        history_tokens: set[str],
        nlls: Sequence[float] | None = None,
    ) -> None:
        """Add a batch of (prediction, reference) pairs from one user, with the gold
        reference's mean token NLL per pair if known."""
        if len(predictions) != len(references) or (
            nlls is not None and len(nlls) != len(references)
        ):
            raise ValueError("predictions, references and nlls must have the same length")
        for prediction, reference in zip(predictions, references, strict=True):
            scores = example_scores(prediction, reference, history_tokens)
            for name in METRIC_NAMES:
                setattr(self, name, getattr(self, name) + scores[name])
            self.count += 1
        if nlls is not None:
            self.nll += float(sum(nlls))
            self.nll_count += len(nlls)

    def compute(self) -> dict[str, float]:
        n = max(int(self.count), 1)
        result = {name: float(getattr(self, name)) / n for name in METRIC_NAMES}
        if int(self.count) and int(self.nll_count) == int(self.count):
            nll = float(self.nll) / n
            result |= {"nll": nll, "ppl": perplexity(nll)}
        return result | {"examples": int(self.count)}


def example_scores(prediction: str, reference: str, history_tokens: set[str]) -> dict[str, float]:
    """All metrics for one example."""
    p, r, f1 = persona_scores_from_tokens(prediction, history_tokens)
    pred_tokens, ref_tokens = tokenize(prediction), tokenize(reference)
    if pred_tokens and ref_tokens:
        bleu = float(bleu_score([" ".join(pred_tokens)], [[" ".join(ref_tokens)]], smooth=True))
    else:
        bleu = 0.0
    return {
        "rouge1": rouge_1(prediction, reference),
        "rougeL": rouge_l(prediction, reference),
        "bleu": bleu,
        "persona_p": p,
        "persona_r": r,
        "persona_f1": f1,
    }
