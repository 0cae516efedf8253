"""The gold output's likelihood (`milp.inject.answer.gold_nll`) on a tiny random Llama:
target tokens only, equal to a log-softmax by hand, independent of left padding."""

import math

import pytest
import torch

from milp.data.datamodule import IGNORE_INDEX, pad_left
from milp.evaluation.metrics import ResponseMetrics
from milp.evaluation.report import average
from milp.inject.answer import gold_nll

PAD = 0


def query_batch(prompts: list[list[int]]) -> dict:
    """A left-padded batch laid out as `QueryCollator` lays it out."""
    return {
        "input_ids": pad_left(prompts, PAD),
        "attention_mask": pad_left([[1] * len(p) for p in prompts], 0),
    }


def nll_by_hand(model, prompt: list[int], target: list[int]) -> float:
    """Mean -log p(target token | everything before it), the softmax written out."""
    logits = model(input_ids=torch.tensor([prompt + target])).logits[0].double()
    total = 0.0
    for j, token in enumerate(target):
        row = logits[len(prompt) + j - 1]  # the position before target token j predicts it
        top = row.max()
        log_norm = top + torch.log(torch.exp(row - top).sum())
        total -= float(row[token] - log_norm)
    return total / len(target)


def test_nll_is_the_targets_mean_log_loss_by_hand(llama):
    prompt, target = [5, 17, 42, 9], [33, 8, 61]
    (nll,) = gold_nll(llama, query_batch([prompt]), [target], PAD)
    assert nll == pytest.approx(nll_by_hand(llama, prompt, target), abs=1e-5)

    # Target tokens only: the prompt's own tokens are not scored. A loss over the whole
    # sequence differs; the causal-LM loss with the prompt masked, as training computes
    # it, is the same number.
    ids = torch.tensor([prompt + target])
    whole = float(llama(input_ids=ids, labels=ids).loss)
    assert abs(whole - nll) > 1e-3
    labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + target])
    assert float(llama(input_ids=ids, labels=labels).loss) == pytest.approx(nll, abs=1e-5)
    # Changing a prompt token changes the NLL through the context, not by being scored.
    (other,) = gold_nll(llama, query_batch([[5, 17, 43, 9]]), [target], PAD)
    assert other == pytest.approx(nll_by_hand(llama, [5, 17, 43, 9], target), abs=1e-5)


def test_nll_does_not_depend_on_left_padding_or_the_other_rows(llama):
    prompts = [[5, 6], [11, 12, 13, 14, 15, 16, 17], [20, 21, 22], [30]]
    targets = [[40, 41], [50, 51, 52, 53], None, [60, 61, 62, 63, 64, 65]]
    batched = gold_nll(llama, query_batch(prompts), targets, PAD)
    assert batched[2] is None  # a query without a gold is not scored
    for prompt, target, value in zip(prompts, targets, batched, strict=True):
        if target is None:
            continue
        (alone,) = gold_nll(llama, query_batch([prompt]), [target], PAD)
        assert value == pytest.approx(alone, abs=1e-5)
        assert value == pytest.approx(nll_by_hand(llama, prompt, target), abs=1e-5)
    assert gold_nll(llama, query_batch(prompts[:1]), [None], PAD) == [None]


def test_nll_averages_over_examples_and_perplexity_is_its_exp():
    metric = ResponseMetrics()
    metric.update(["a"], ["a"], set(), [1.0])
    metric.update(["b"], ["a"], set(), [3.0])
    user = metric.compute()
    assert user["nll"] == pytest.approx(2.0) and user["ppl"] == pytest.approx(math.exp(2.0))
    other = ResponseMetrics()
    other.update(["a"], ["a"], set(), [0.5])
    overall = average([{"memory": user}, {"memory": other.compute()}], "memory")
    assert overall["nll"] == pytest.approx((1.0 + 3.0 + 0.5) / 3)
    assert overall["ppl"] == pytest.approx(math.exp(overall["nll"]))
    # Without an NLL for every example there is no NLL (never a mean over a subset).
    partial = ResponseMetrics()
    partial.update(["a"], ["a"], set(), [1.0])
    partial.update(["a"], ["a"], set())
    assert "nll" not in partial.compute()
    assert "nll" not in average([{"memory": user}, {"memory": partial.compute()}], "memory")
