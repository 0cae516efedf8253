import math

import pytest

from milp.data.retrieval import BM25, RetrievalFormat, add_retrieval
from milp.data.users import HistoryPair, Query, User
from milp.errors import MilpError


def test_bm25_by_hand():
    docs = ["red apple pie", "green apple", "blue sky"]
    index = BM25(docs)
    # "apple" appears in 2 of 3 docs: idf = ln(1 + (3 - 2 + 0.5) / (2 + 0.5)).
    idf = math.log(1 + 1.5 / 2.5)
    mean = 7 / 3
    expected = [idf * 2.2 / (1 + 1.2 * (0.25 + 0.75 * n / mean)) for n in (3, 2)]
    scores = index.scores("apple")
    assert scores[:2] == pytest.approx(expected) and scores[2] == 0.0
    # "sky" is rarer than "apple" (1 document vs 2), so the sky document ranks first; of
    # the apple documents the shorter one (BM25's length normalisation) comes next.
    idf_sky = math.log(1 + 2.5 / 1.5)
    both = index.scores("apple sky")
    assert both == pytest.approx(
        [expected[0], expected[1], idf_sky * 2.2 / (1 + 1.2 * (0.25 + 0.75 * 2 / mean))]
    )
    assert index.top("apple sky", 2) == [2, 1]
    assert index.top("green apple", 1) == [1]


def test_bm25_ties_go_to_the_more_recent_item():
    index = BM25(["old news", "news again", "unrelated"])
    assert index.scores("news")[0] == index.scores("news")[1]
    assert index.top("news", 3) == [1, 0, 2]
    assert index.top("nothing matches", 2) == [2, 1]  # all zero: newest first


def test_lamp4_layout_and_word_budget():
    fmt = RetrievalFormat(max_item_words=3, min_item_words=1)
    items = [
        HistoryPair("", "Big win", "the team won the cup"),
        HistoryPair("", "Rain", "it rains"),
    ]
    assert fmt.render(items, "Generate a headline: x") == (
        '"Big win" is the title for "the team won", and "Rain" is the title for "it rains". '
        "Generate a headline: x"
    )
    assert fmt.render(items[:1], "q", words=1) == '"Big win" is the title for "the". q'
    assert fmt.render([], "q") == "q"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_item_words": 4}, "data.retrieval_format.max_item_words=4 is below min_item_words=8"),
        ({"min_item_words": 0}, "data.retrieval_format.min_item_words must be an integer >= 1"),
        ({"query_template": "{items}"}, "query_template must contain '{prompt}'"),
    ],
)
def test_bad_retrieval_layouts_are_clear_errors(settings, message):
    with pytest.raises(MilpError, match=message):
        RetrievalFormat(**settings)


def test_add_retrieval_gives_queries_their_ranked_items():
    history = [HistoryPair("p1", "cats purr", "about cats"), HistoryPair("p2", "dogs bark", "dogs")]
    user = User(
        "u", history, [Query("q", "tell me about dogs", "woof")], ["cats purr", "dogs bark"]
    )
    (augmented,) = add_retrieval([user], 1)
    assert augmented.history == history
    assert augmented.queries[0].prompt == "tell me about dogs"  # the query's own input
    assert augmented.queries[0].items == (history[1],)
    (both,) = add_retrieval([user], 5)
    assert both.queries[0].items == (history[1], history[0])  # best first, k capped
    assert add_retrieval([user], 0) == [user]
    with pytest.raises(MilpError, match="retrieval.k must be >= 0"):
        add_retrieval([user], -1)
