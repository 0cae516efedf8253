import itertools
import json
import re

import pytest
import torch
from torch.utils.data import DataLoader

from milp.data.checks import find_gold_leaks
from milp.data.datamodule import IGNORE_INDEX, PromptFormat, UserDataModule
from milp.data.epochs import ShuffledEpochs
from milp.data.history import load_history_users
from milp.data.lamp import load_lamp_split, load_lamp_users
from milp.data.synthetic import ensure_synthetic_lamp, write_synthetic_lamp
from milp.data.users import HistoryPair, Query, User, user_slug
from milp.errors import MilpError


def write_lamp(tmp_path, questions, golds, task="LaMP_4", split="dev"):
    (tmp_path / f"{split}_questions.json").write_text(json.dumps(questions))
    (tmp_path / f"{split}_outputs.json").write_text(json.dumps({"task": task, "golds": golds}))
    return tmp_path


LAMP4_QUESTIONS = [
    {
        "id": "110",
        "input": "Generate a headline for the following article: Stocks fell today.",
        "profile": [
            {
                "id": "1100",
                "text": "A new bridge opened.",
                "title": "Bridge opens",
                "date": "2019-05-01",
            },
            {
                "id": "1101",
                "text": "Rain all week.",
                "title": "Wet week ahead",
                "date": "2018-01-02",
            },
        ],
    },
    {
        "id": "111",
        "input": "Generate a headline for the following article: The cup final ended 2-1.",
        "profile": [{"id": "1110", "text": "Team wins.", "title": "Victory!"}],
    },
]
LAMP4_GOLDS = [{"id": "110", "output": "Markets slide"}, {"id": "111", "output": "Cup won"}]


def test_lamp4_user_based_schema(tmp_path):
    write_lamp(tmp_path, LAMP4_QUESTIONS, LAMP4_GOLDS)
    users = load_lamp_split("LaMP-4", tmp_path, "dev")
    assert [u.user_id for u in users] == ["110", "111"]
    first = users[0]
    # Oldest first, whatever the file order.
    assert [p.target for p in first.history] == ["Wet week ahead", "Bridge opens"]
    assert (
        first.history[0].prompt == "Generate a headline for the following article: Rain all week."
    )
    assert first.queries[0].gold == "Markets slide"
    assert first.profile_texts == ["Wet week ahead", "Bridge opens"]
    assert len(load_lamp_split("lamp4", tmp_path, "dev", max_history=1)[0].history) == 1


def test_lamp5_and_lamp7_fields(tmp_path):
    q5 = [
        {
            "id": "5",
            "input": "Generate a title for the following abstract of a paper: X",
            "profile": [{"id": "a", "title": "On Graphs", "abstract": "We study graphs."}],
        }
    ]
    write_lamp(tmp_path, q5, [{"id": "5", "output": "T"}], task="LaMP_5", split="test")
    pair = load_lamp_split("LaMP_5", tmp_path, "test")[0].history[0]
    assert pair.target == "On Graphs" and pair.prompt.endswith("We study graphs.")
    q7 = [
        {
            "id": "7",
            "input": "Paraphrase the following tweet without any explanation before "
            "or after it: hi",
            "profile": [{"id": "t", "text": "good morning all"}],
        }
    ]
    write_lamp(tmp_path, q7, [{"id": "7", "output": "hello"}], task="LaMP_7", split="train")
    assert load_lamp_split("7", tmp_path, "train")[0].history[0].target == "good morning all"


def test_time_based_split_groups_questions_by_user(tmp_path):
    profile = [{"id": "p1", "text": "t", "title": "h", "date": 3}]
    questions = [
        {"id": "q1", "user_id": "u", "input": "a", "profile": profile},
        {
            "id": "q2",
            "user_id": "u",
            "input": "b",
            "profile": profile + [{"id": "p2", "text": "t2", "title": "h2", "date": 1}],
        },
    ]
    write_lamp(tmp_path, questions, [{"id": "q1", "output": "x"}, {"id": "q2", "output": "y"}])
    (user,) = load_lamp_split("LaMP_4", tmp_path, "dev")
    assert [q.id for q in user.queries] == ["q1", "q2"]
    assert [p.target for p in user.history] == ["h2", "h"]  # union, sorted by int date


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda q, g: q.__setitem__(0, {k: v for k, v in q[0].items() if k != "input"}),
            "record 0 (id='110'): missing 'input'",
        ),
        (lambda q, g: q[1].pop("profile"), "record 1 (id='111'): missing 'profile'"),
        (lambda q, g: q[1].__setitem__("profile", []), "record 1 (id='111'): empty 'profile'"),
        (lambda q, g: q[0]["profile"][1].pop("title"), "profile item 1 misses 'title'"),
        (lambda q, g: g.append({"id": "999", "output": "?"}), "match no question"),
        (lambda q, g: g.pop(), "no gold output for question id '111'"),
        (lambda q, g: q.append(dict(q[0])), "duplicate id '110'"),
    ],
)
def test_bad_records_name_file_and_record(tmp_path, mutate, message):
    questions, golds = json.loads(json.dumps(LAMP4_QUESTIONS)), json.loads(json.dumps(LAMP4_GOLDS))
    mutate(questions, golds)
    write_lamp(tmp_path, questions, golds)
    with pytest.raises(MilpError, match="_(questions|outputs).json") as err:
        load_lamp_split("LaMP_4", tmp_path, "dev")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(MilpError, match="dev_questions.json: file not found"):
        load_lamp_split("LaMP_4", tmp_path, "dev")
    (tmp_path / "dev_questions.json").write_text('[{"id": "1",')
    with pytest.raises(MilpError, match=r"dev_questions.json: not valid JSON \(line 1"):
        load_lamp_users("LaMP_4", tmp_path / "dev_questions.json")
    (tmp_path / "dev_questions.json").write_text("<!DOCTYPE html><html>Not found</html>")
    with pytest.raises(MilpError, match="HTML page"):
        load_lamp_users("LaMP_4", tmp_path / "dev_questions.json")
    write_lamp(tmp_path, LAMP4_QUESTIONS, LAMP4_GOLDS, task="LaMP_5")
    with pytest.raises(MilpError, match="golds of task 'LaMP_5'"):
        load_lamp_split("LaMP_4", tmp_path, "dev")
    with pytest.raises(MilpError, match="unknown LaMP task"):
        load_lamp_split("LaMP_9", tmp_path, "dev")


def test_lamp_documented_meanings(tmp_path):
    """Integer ids become strings, null limits keep everything, a BOM is accepted, and
    numeric dates sort as numbers (undated items first, in file order)."""
    profile = [
        {"id": 1, "text": "a", "title": "ten", "date": 10},
        {"id": 2, "text": "b", "title": "undated"},
        {"id": 3, "text": "c", "title": "nine and a half", "date": 9.5},
        {"id": 4, "text": "d", "title": "also undated"},
    ]
    questions = [{"id": 7, "user_id": 70, "input": "x", "profile": profile}]
    write_lamp(tmp_path, questions, [{"id": 7, "output": "y"}])
    path = tmp_path / "dev_questions.json"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    (user,) = load_lamp_split("LaMP_4", tmp_path, "dev", max_history=None, max_users=None)
    assert user.user_id == "70" and user.queries[0].id == "7"
    assert [p.target for p in user.history] == ["undated", "also undated", "nine and a half", "ten"]
    assert [p.target for p in load_lamp_split("LaMP_4", tmp_path, "dev", 1)[0].history] == ["ten"]


def test_test_split_without_golds(tmp_path):
    (tmp_path / "test_questions.json").write_text(json.dumps(LAMP4_QUESTIONS))
    users = load_lamp_split("LaMP_4", tmp_path, "test", require_golds=False)
    assert users[0].queries[0].gold is None


def test_history_jsonl(tmp_path):
    path = tmp_path / "users.jsonl"
    record = {
        "user_id": "alice",
        "history": [{"prompt": "hi", "response": "hey!"}],
        "queries": [{"id": "q", "prompt": "yo", "response": "sup"}, {"prompt": "x"}],
    }
    path.write_text(json.dumps(record) + "\n\n")
    (user,) = load_history_users(path)
    assert user.history[0].target == "hey!" and user.queries[1].gold is None
    path.write_text(json.dumps({"user_id": "bob", "history": [], "queries": []}) + "\n")
    with pytest.raises(MilpError, match=r"users.jsonl: line 1: 'history' must be a non-empty list"):
        load_history_users(path)
    path.write_text("{oops\n")
    with pytest.raises(MilpError, match="line 1: not valid JSON"):
        load_history_users(path)


def test_history_jsonl_documented_meanings(tmp_path):
    path = tmp_path / "users.jsonl"
    records = [
        {
            "user_id": 5,
            "history": [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(3)],
            "queries": [{"id": 1, "prompt": "a", "response": None}, {"prompt": "b"}],
        },
        {
            "user_id": "six",
            "history": [{"prompt": "p", "response": "r"}],
            "queries": [{"prompt": "c"}],
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    first, second = load_history_users(path, max_history=None)
    assert first.user_id == "5" and [q.id for q in first.queries] == ["1", "5/1"]
    assert [q.gold for q in first.queries] == [None, None]  # null response: not scored
    assert [p.target for p in first.history] == ["r0", "r1", "r2"]
    assert [p.target for p in load_history_users(path, max_history=2)[0].history] == ["r1", "r2"]
    assert [u.user_id for u in load_history_users(path, max_users=1)] == ["5"]


def test_gold_leaks_ignore_case_and_spaces_and_cover_sources():
    history = [HistoryPair("p", "Cats purr", "about cats"), HistoryPair("p", "Dogs", "dog text")]
    queries = [
        Query("a", "x", "  cats   PURR "),
        Query("b", "x", "About Cats"),
        Query("c", "x", "cats purr loudly"),
        Query("d", "x", None),
    ]
    leaks = find_gold_leaks([User("u", history, queries)])
    assert leaks.count == 2
    assert leaks.examples == [
        "user 'u' query 'a' gold '  cats   PURR '",
        "user 'u' query 'b' gold 'About Cats'",
    ]
    assert find_gold_leaks([User("u", history, queries[2:])]).count == 0
    with pytest.raises(MilpError, match=r"data: 2 query gold output\(s\) appear"):
        UserDataModule([User("u", history, queries)])


def test_prompt_format_and_chitchat_settings_are_checked(tmp_path):
    from milp.data.chitchat import load_chitchat_users

    with pytest.raises(MilpError, match="data.prompt_format.max_prompt_tokens must be"):
        PromptFormat(max_prompt_tokens=0)
    # Checked before the corpus is read, so no package is needed for these.
    for key, value in [("max_history", 0), ("queries_per_user", 0), ("test_users", -1)]:
        with pytest.raises(MilpError, match=f"data.users.{key} must be an integer"):
            load_chitchat_users(tmp_path, "test", **{key: value})
    assert not list(tmp_path.iterdir())


def test_generator_is_deterministic(tmp_path):
    a = write_synthetic_lamp(tmp_path / "a", seed=3)
    b = write_synthetic_lamp(tmp_path / "b", seed=3)
    c = write_synthetic_lamp(tmp_path / "c", seed=4)
    for name in ["train_questions.json", "test_outputs.json", "generic_corpus.jsonl"]:
        assert (a / name).read_bytes() == (b / name).read_bytes()
        assert (a / name).read_bytes() != (c / name).read_bytes()
    assert ensure_synthetic_lamp(tmp_path, seed=3).name.endswith("seed3")


def test_generated_users_differ_only_in_history(tmp_path):
    """Each synthetic writer's outlet recurs in their history and their golds."""
    directory = ensure_synthetic_lamp(tmp_path)
    users = load_lamp_split("LaMP_4", directory, "test")
    assert len(users) == 16 and all(len(u.queries) == 3 for u in users)
    assert min(len(u.history) for u in users) < 8 < max(len(u.history) for u in users)
    for user in users:
        outlet = user.history[0].target.split("| ")[-1]
        assert all(q.gold.endswith("| " + outlet) for q in user.queries)


class CharTokenizer:
    """A minimal real tokenizer (one id per character) for layout tests."""

    pad_token_id, eos_token_id = 0, 1

    def encode(self, text, add_special_tokens=False):
        return [ord(c) + 2 for c in text]


def test_prompt_format_masks_prompt_and_keeps_answer_cue():
    fmt = PromptFormat(template="{prompt}\nA:", max_prompt_tokens=10, max_target_tokens=4)
    from milp.data.users import HistoryPair

    ids, labels = fmt.encode_pair(CharTokenizer(), HistoryPair("abcdefghijklmnop", "xyz!"))
    assert len(ids) == 10 + 4
    assert ids[7:10] == CharTokenizer().encode("\nA:")  # cue survives truncation
    assert labels[:10] == [IGNORE_INDEX] * 10
    assert labels[10:] == CharTokenizer().encode(" xy") + [1]
    chat = PromptFormat(template="{prompt}\nassistant\n", target_prefix="")
    _, labels = chat.encode_pair(CharTokenizer(), HistoryPair("hi", "yo"))
    assert [t for t in labels if t != IGNORE_INDEX] == CharTokenizer().encode("yo") + [1]


def test_datamodule_serves_only_the_selected_user(tmp_path):
    write_lamp(tmp_path, LAMP4_QUESTIONS, LAMP4_GOLDS)
    users = load_lamp_split("LaMP_4", tmp_path, "dev")
    datamodule = UserDataModule(users, batch_size=8)
    datamodule.attach_tokenizer(CharTokenizer())
    datamodule.select(users[1])
    (batch,) = list(datamodule.train_dataloader())
    assert batch["input_ids"].shape[0] == 1  # user 111 has one history item
    (queries,) = list(datamodule.test_dataloader())
    assert queries["query_ids"] == ["111"] and queries["golds"] == ["Cup won"]
    with pytest.raises(MilpError, match="data.min_history is 2"):
        UserDataModule(users, min_history=2)


def test_sparse_history_is_repeated_up_to_min_examples_per_epoch(tmp_path):
    write_lamp(tmp_path, LAMP4_QUESTIONS, LAMP4_GOLDS)
    users = load_lamp_split("LaMP_4", tmp_path, "dev")
    rich, sparse = users  # 2 history items, 1 history item
    datamodule = UserDataModule(users, batch_size=2, min_examples_per_epoch=2)
    datamodule.attach_tokenizer(CharTokenizer())
    epoch = list(datamodule.select(sparse).train_dataloader())
    assert [b["input_ids"].shape[0] for b in epoch] == [2]  # its one item, twice
    assert torch.equal(epoch[0]["input_ids"][0], epoch[0]["input_ids"][1])
    epoch = list(datamodule.select(rich).train_dataloader())
    assert sum(b["input_ids"].shape[0] for b in epoch) == 2  # enough history: unchanged
    with pytest.raises(MilpError, match="data.min_examples_per_epoch"):
        UserDataModule(users, min_examples_per_epoch=-1)


def test_a_users_pairs_are_tokenized_once_across_epochs(tmp_path):
    write_lamp(tmp_path, LAMP4_QUESTIONS, LAMP4_GOLDS)
    rich = load_lamp_split("LaMP_4", tmp_path, "dev")[0]  # 2 history items
    calls = []

    class CountingTokenizer(CharTokenizer):
        def encode(self, text, add_special_tokens=False):
            calls.append(text)
            return super().encode(text, add_special_tokens)

    datamodule = UserDataModule([rich], batch_size=1)
    datamodule.attach_tokenizer(CountingTokenizer())
    calls[:] = []  # attaching lays out the queries' prompts once (prompt_fit)
    loader = datamodule.select(rich).train_dataloader()
    epochs = [[b["input_ids"][0].tolist() for b in loader] for _ in range(3)]
    during_training, calls[:] = len(calls), []
    expected = sorted(
        datamodule.format.encode_pair(CountingTokenizer(), p)[0] for p in rich.history
    )
    assert during_training == len(calls) > 0  # 3 epochs cost what one encoding costs
    assert all(sorted(epoch) == expected for epoch in epochs)


# Ids that shared a directory under an earlier naming (a readable name plus a CRC-32 that
# a safe id could spell out, or a CRC shared by two long ids), and a pair equal ignoring
# case, which one folder on case-insensitive file systems would hold.
COLLIDING_IDS = ["a/b", "a_b-07f4401c", "u" * 80 + "/3506", "u" * 80 + "/8250000", "Alice", "alice"]


def test_user_slug_is_safe_and_unique():
    assert user_slug("u-1") == "u-1" and user_slug("test-u000") == "test-u000"
    assert user_slug("a/b") != user_slug("a_b")
    assert "/" not in user_slug("../../etc")
    ids = [*COLLIDING_IDS, ".", "..", "", "x-" + "a" * 24, "a" * 81, "ä", "a" * 300]
    slugs = [user_slug(i) for i in ids]
    assert len({s.casefold() for s in slugs}) == len(ids), slugs
    assert all(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", s) and len(s) <= 105 for s in slugs), (
        slugs
    )


@pytest.mark.parametrize("n, size, epochs", [(10, 3, 3), (8, 4, 4), (1, 8, 2), (17, 5, 5)])
def test_shuffled_epochs_are_a_shuffled_dataloaders_epochs(n, size, epochs):
    """A user's batches over all its epochs, drawn in one pass (milp.inject.schedule),
    are the batches a shuffled DataLoader gives epoch by epoch, as a Lightning fit
    iterates it: the same generator draws, whether or not an epoch's last batch is
    partial."""
    generator = torch.Generator().manual_seed(5)
    loader = DataLoader(range(n), batch_size=size, shuffle=True, generator=generator)
    reference = [b.tolist() for _ in range(epochs) for b in itertools.islice(loader, len(loader))]
    generator = torch.Generator().manual_seed(5)
    sampler = ShuffledEpochs(n, size, epochs, generator)
    ours = DataLoader(range(n), batch_sampler=sampler, generator=generator)
    assert [b.tolist() for b in ours] == reference
    assert len(sampler) == len(reference)
