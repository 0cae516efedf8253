import random

import pytest
from rouge_score import rouge_scorer

from milp.evaluation.metrics import (
    ResponseMetrics,
    persona_scores,
    rouge_1,
    rouge_l,
    rouge_l_parts,
    tokenize,
)

WORDS = "the a cat dog sat on mat runs fast slow big red Blue GREEN it's x-ray 42 café !".split()


def random_text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))


def test_rouge_agrees_with_rouge_score_package():
    """Our ROUGE must equal the reference implementation LaMP's evaluation uses."""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    rng = random.Random(0)
    pairs = [(random_text(rng), random_text(rng)) for _ in range(300)]
    pairs += [("The Cat, sat!", "the cat sat"), ("", "x"), ("x", ""), ("runs", "running")]
    for prediction, reference in pairs:
        expected = scorer.score(reference, prediction)
        assert rouge_1(prediction, reference) == pytest.approx(expected["rouge1"].fmeasure)
        assert rouge_l(prediction, reference) == pytest.approx(expected["rougeL"].fmeasure)
        parts = rouge_l_parts(prediction, reference)
        assert parts == pytest.approx(tuple(expected["rougeL"]))  # (precision, recall, F)


def test_no_stemming():
    assert rouge_1("running", "runs") == 0.0


def test_persona_f1_by_hand():
    # H = {i, love, climbing, tea}, R = {i, love, coffee}: overlap 2.
    p, r, f1 = persona_scores("I love coffee", ["I love climbing.", "tea"])
    assert (p, r) == (pytest.approx(2 / 3), pytest.approx(2 / 4))
    assert f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert persona_scores("", ["anything"]) == (0.0, 0.0, 0.0)
    assert persona_scores("words", []) == (0.0, 0.0, 0.0)


def test_response_metrics_average_over_examples():
    metric = ResponseMetrics()
    history = set(tokenize("the cat sat on the mat"))
    metric.update(["the cat sat on the mat"], ["the cat sat on the mat"], history)
    metric.update(["dog"], ["the cat sat on the mat"], history)
    result = metric.compute()
    assert result["examples"] == 2
    assert result["rouge1"] == pytest.approx(0.5)
    assert result["rougeL"] == pytest.approx(0.5)
    assert result["bleu"] == pytest.approx(0.5)  # 1.0 and 0.0
    with pytest.raises(ValueError):
        metric.update(["a", "b"], ["a"], history)
