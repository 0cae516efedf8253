"""Attribution (`milp.attribute`): does a memory know its owner? Real runs of the tiny
model on LaMP-4 files whose users write distinct strings, the automatic step of
`milp.train`, the `python -m milp.attribute` command, and the tie rule."""

import json
import logging
import shutil

import numpy as np
import pytest
from conftest import ROOT, TINY_MODEL_OVERRIDES, run_milp
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from milp.attribute import run as attribute_command
from milp.data.history import load_history_users
from milp.errors import MilpError
from milp.evaluation.attribution import plan_attribution
from milp.evaluation.attribution_stats import (
    NO_MEMORY,
    TASK_MEMORY,
    format_attribution,
    owner_permutation_p,
    summarize_attribution,
)

# Each user's headlines are one word repeated: only the owner's memory has learnt it.
TEST_WORDS = {"u-zebra": "zebra", "u-violin": "violin", "u-quartz": "quartz"}
TRAIN_WORDS = {"t-lemon": "lemon", "t-cactus": "cactus"}


def write_split(directory, split: str, words: dict[str, str]) -> None:
    questions = [
        {
            "id": user,
            "input": "Generate a headline for the following article: a story about the town .",
            "profile": [
                {
                    "id": f"{user}-{j}",
                    "text": f"article {j} about the town",
                    "title": f"{w} {w} {w}",
                }
                for j in range(8)
            ],
        }
        for user, w in words.items()
    ]
    golds = [{"id": user, "output": f"{w} {w} {w} {w}"} for user, w in words.items()]
    (directory / f"{split}_questions.json").write_text(json.dumps(questions))
    (directory / f"{split}_outputs.json").write_text(json.dumps({"task": "LaMP_4", "golds": golds}))


def lamp4_files(tmp_path):
    """A LaMP-4 directory with the test and train users above."""
    data = tmp_path / "lamp4"
    data.mkdir()
    write_split(data, "test", TEST_WORDS)
    write_split(data, "train", TRAIN_WORDS)
    return data


def attribution_run(data, out, *overrides: str) -> list[str]:
    """`milp.train` overrides of a tiny run with attribution on `data`, into `out`."""
    return [
        "+experiment=lamp",
        *TINY_MODEL_OVERRIDES,
        "data=lamp4",
        f"data.path={data}",
        *overrides,
        "memory.rank=2",
        "generation.max_new_tokens=2",
        "callbacks=none",
        "logger=none",
        "trainer.enable_progress_bar=false",
        "attribution.enabled=true",
        f"hydra.run.dir={out}",
    ]


def test_attribution_picks_the_owner_and_is_at_chance_for_identical_memories(
    milp_cache, tmp_path, monkeypatch, capsys, caplog
):
    data = lamp4_files(tmp_path)
    out = tmp_path / "run"
    result = run_milp(attribution_run(data, out, "trainer.max_epochs=4"), milp_cache)
    # The table has the likelihood column; the attribution summary follows it.
    assert "    NLL  users" in result.stdout
    assert "owner top-1: 1.000 per user, 1.000 per query (chance 0.333)" in result.stdout
    assert "own memory beats no memory: 3/3" in result.stdout
    assert "own memory beats task memory: 3/3" in result.stdout

    matrix = json.loads((out / "attribution.json").read_text())["matrix"]
    assert matrix["memories"] == [*TEST_WORDS, TASK_MEMORY, NO_MEMORY]
    assert (out / "attribution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["attribution"]["per_user"] == {"top1": 1.0, "mean_owner_rank": 1.0}
    assert metrics["memory"]["nll"] < metrics["no_memory"]["nll"]
    # The routed bank scores each user's own memory as the run's peft memory did.
    predictions = {
        p["id"]: p for p in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())
    }
    rows = matrix["memories"]
    for j, query in enumerate(matrix["queries"]):
        own = matrix["query_nll"][rows.index(query["user_id"])][j]
        assert own == pytest.approx(predictions[query["id"]]["nll"], abs=1e-4)
        none = matrix["query_nll"][rows.index(NO_MEMORY)][j]
        assert none == pytest.approx(predictions[query["id"]]["nll_no_memory"], abs=1e-4)
    task = json.loads((out / "task_memory" / "memory.json").read_text())
    # Trained at the users' own rate (the +experiment=lamp optim.lr), as task_lr is null.
    assert task["task"] == {"train_users": list(TRAIN_WORDS), "items": 8, "lr": 0.01}

    # Identical users: every user holds the same memory, so every memory ties on every
    # query and the owner gets its share of the tie: exactly chance.
    same = tmp_path / "same"
    shutil.copytree(out, same)
    first, *others = (same / "adapters" / u for u in TEST_WORDS)
    for directory in others:
        shutil.rmtree(directory)
        shutil.copytree(first, directory)
    # The run's records name each user's own memory, which these copies are not (they
    # would be refused as corrupt): without records, each memory's own index is checked.
    shutil.rmtree(same / "users")
    run_config = (same / ".hydra" / "config.yaml").read_text()
    # The command's own config, composed as `python -m milp.attribute` composes it, run in
    # this process (a second milp process would spend seconds on imports alone).
    monkeypatch.setenv("MILP_CACHE_DIR", str(milp_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("attribute", [f"store={same}", "task_memory=true"])
    summary = attribute_command(cfg)
    assert summary["per_user"]["top1"] == pytest.approx(1 / 3, abs=1e-12)
    assert summary["per_query"]["top1"] == pytest.approx(1 / 3, abs=1e-12)
    assert summary["per_user"]["mean_owner_rank"] == summary["chance_mean_rank"] == 2.0
    assert summary["per_query"]["mean_owner_rank"] == 2.0
    printed = capsys.readouterr().out
    assert "owner top-1: 0.333 per user, 0.333 per query (chance 0.333)" in printed
    stored = json.loads((same / "attribution.json").read_text())
    assert stored["per_user"] == summary["per_user"]
    # The stored task memory (same train users and items) is reused, not trained again.
    assert (same / "task_memory" / "memory_0" / "adapter_model.safetensors").read_bytes() == (
        out / "task_memory" / "memory_0" / "adapter_model.safetensors"
    ).read_bytes()
    assert "Trainer.fit" not in printed
    assert (same / ".hydra" / "config.yaml").read_text() == run_config

    # A corrupt stored task memory is trained again, never reused: the same memory again.
    weights = same / "task_memory" / "memory_0" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with caplog.at_level(logging.WARNING, logger="milp"):
        assert attribute_command(cfg)["per_user"] == summary["per_user"]
    assert f"task memory: {weights}: fails its SHA-256 check against memory.json" in caplog.text
    original = out / "task_memory" / "memory_0" / "adapter_model.safetensors"
    assert weights.read_bytes() == original.read_bytes()


def test_ties_share_the_credit():
    users = ["a", "b", "c", "d"]
    queries = [(u, f"{u}{i}") for u in users for i in range(2)]

    def scores(nll):  # nll(memory, user) -> the same NLL for each of the user's queries
        return {m: [nll(m, u) for u, _ in queries] for m in users}

    owner_best = summarize_attribution(users, queries, scores(lambda m, u: 1.0 - (m == u)))
    assert owner_best["per_user"] == {"top1": 1.0, "mean_owner_rank": 1.0}
    assert owner_best["per_query"] == {"top1": 1.0, "mean_owner_rank": 1.0}
    assert owner_best["own_beats_no_memory"] is None  # no such row given

    identical = summarize_attribution(users, queries, scores(lambda m, u: 2.5))
    assert identical["per_user"] == {"top1": 0.25, "mean_owner_rank": 2.5}
    assert identical["chance"] == 0.25 and identical["chance_mean_rank"] == 2.5

    # a and b hold the same memory, best for both of them: each owner gets half.
    pair = summarize_attribution(
        users, queries, scores(lambda m, u: 0.0 if {m, u} <= {"a", "b"} or m == u else 1.0)
    )
    assert pair["per_user"]["top1"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)
    assert pair["per_user"]["mean_owner_rank"] == pytest.approx((1.5 + 1.5 + 1 + 1) / 4)

    # The task memory and no memory are reported, never picked.
    with_rows = scores(lambda m, u: 1.0 - (m == u))
    with_rows |= {TASK_MEMORY: [-5.0] * len(queries), NO_MEMORY: [3.0] * len(queries)}
    result = summarize_attribution(users, queries, with_rows)
    assert result["per_user"]["top1"] == 1.0
    assert result["own_beats_task_memory"] == {"users": 0, "of": 4, "fraction": 0.0}
    assert result["own_beats_no_memory"] == {"users": 4, "of": 4, "fraction": 1.0}


def test_owner_permutation_p_by_hand():
    # Perfect diagonal, 3 users: of the 3! owner assignments only the true one reaches
    # top-1 1.0.
    diagonal = 1.0 - np.eye(3)
    exact = owner_permutation_p(diagonal)
    assert (exact.observed, exact.p, exact.permutations, exact.exact) == (1.0, 1 / 6, 6, True)
    # Forced onto random assignments: near 1/6, seeded, and (b+1)/(m+1).
    drawn = owner_permutation_p(diagonal, permutations=20_000, seed=1, exact_users=0)
    assert not drawn.exact and drawn.p == pytest.approx(1 / 6, abs=0.01)
    assert drawn == owner_permutation_p(diagonal, permutations=20_000, seed=1, exact_users=0)
    # 12 users: 1 of 12! assignments reaches 1.0, none of 999 draws does -> p = 1/1000.
    assert owner_permutation_p(1.0 - np.eye(12), permutations=999).p == 1 / 1000
    # Identical memories: every user's credit is 1/N under any labels -> p = 1.
    assert owner_permutation_p(np.full((4, 4), 2.5)).p == 1.0
    # Users 0 and 1 tie (within 1e-6) on memories 0 and 1, 2 and 3 own theirs: top-1
    # (0.5 + 0.5 + 1 + 1) / 4 = 0.75, reached only when 2 and 3 keep their memories and
    # 0, 1 get memories 0, 1 in either order: 2 of 24 assignments.
    tied = np.array([[0, 1e-7, 1, 1], [0, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]], float)
    result = owner_permutation_p(tied)
    assert (result.observed, result.p) == (0.75, 2 / 24)
    with pytest.raises(MilpError, match=r"square users x memories NLL matrix.*\(2, 3\)"):
        owner_permutation_p(np.zeros((2, 3)))
    # Memories that know the play, not the character: two plays of two characters, a
    # memory equally good on its play's characters. Shuffling owners across plays, only
    # the 2 x 2 of 24 assignments that keep every memory in its play reach top-1 0.5;
    # shuffled within plays (groups), every assignment does: no evidence of the person.
    play = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], float)
    assert owner_permutation_p(play).p == 4 / 24
    within = owner_permutation_p(play, permutations=99, groups=["p", "p", "q", "q"])
    assert (within.observed, within.p, within.exact) == (0.5, 1.0, False)


def test_the_summary_carries_the_owner_permutation_p():
    users = ["a", "b", "c", "d"]
    queries = [(u, f"{u}{i}") for u in users for i in range(2)]
    scores = {m: [1.0 - (m == u) for u, _ in queries] for m in users}
    scores[NO_MEMORY] = [3.0] * len(queries)  # reported, never permuted among the owners
    summary = summarize_attribution(users, queries, scores)
    test = summary["per_user_top1_permutation"]
    assert test == {"observed": 1.0, "p": 1 / 24, "permutations": 24, "exact": True, "seed": None}
    assert test["observed"] == summary["per_user"]["top1"]
    assert json.loads(json.dumps(summary))["per_user_top1_permutation"] == test
    printed = format_attribution(summary)
    assert "per-user top-1 above chance: permutation p 0.04167 (exact owner assignments)" in (
        printed
    )
    # A summary stored without the test still prints.
    del summary["per_user_top1_permutation"]
    assert "permutation" not in format_attribution(summary)


def test_bad_attribution_settings_are_one_line_errors(tmp_path):
    with pytest.raises(MilpError, match=r"store=.*not a milp.train run directory"):
        attribute_command(OmegaConf.create({"store": str(tmp_path / "nope"), "paths": {}}))

    users = tmp_path / "users.jsonl"
    users.write_text(
        "\n".join(
            json.dumps(
                {
                    "user_id": name,
                    "history": [{"prompt": "hi", "response": f"hello from {name}"}],
                    "queries": [{"id": f"{name}-q", "prompt": "hey", "response": "yo"}],
                }
            )
            for name in ("alice", "bob")
        )
    )
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", ["data=history", f"data.path={users}"])
    test_users = load_history_users(users)
    # A JSONL users file has no splits: its "train split" is the scored users themselves.
    with pytest.raises(MilpError, match="attribution.task_memory: the train split shares 2"):
        plan_attribution(cfg, test_users, task_memory=True, task_items=None, batch_size=None)
    with pytest.raises(MilpError, match="attribution.task_items must be a positive integer"):
        plan_attribution(cfg, test_users, task_memory=False, task_items=0, batch_size=None)
    with pytest.raises(MilpError, match="attribution.task_lr must be a number >= 0"):
        plan_attribution(
            cfg, test_users, task_memory=False, task_items=None, batch_size=None, task_lr=-1e-3
        )
    assert plan_attribution(cfg, test_users, task_memory=False, task_items=None, batch_size=4)


@pytest.mark.parametrize("injection", ["sequential", "batched"])
def test_task_init_starts_every_user_from_the_task_memory(milp_cache, tmp_path, injection):
    """memory.init=task: one task memory is trained first on the train split's users, at
    its own rate (attribution.task_lr), and every user's memory starts as a copy of it
    (with optim.lr 0 they stay that copy, while fresh memories differ per user);
    attribution scores that same task memory as its control."""
    from safetensors.torch import load_file

    data = lamp4_files(tmp_path)
    out = tmp_path / "run"
    overrides = [
        f"injection={injection}",
        "memory.init=task",
        "optim.lr=0.0",
        "attribution.task_lr=0.01",
    ]
    run_milp(attribution_run(data, out, *overrides, "trainer.max_epochs=1"), milp_cache)
    task = load_file(out / "task_memory" / "memory_0" / "adapter_model.safetensors")
    # Trained at task_lr, not at the users' lr 0: its B matrices left their zero start.
    assert any(v.abs().sum() > 0 for k, v in task.items() if "lora_B" in k)
    for user in TEST_WORDS:
        own = load_file(out / "adapters" / user / "memory_0" / "adapter_model.safetensors")
        assert own.keys() == task.keys()
        for key, value in task.items():
            assert (own[key] == value).all(), (user, key)
    info = json.loads((out / "task_memory" / "memory.json").read_text())
    assert info["task"] == {"train_users": list(TRAIN_WORDS), "items": 8, "lr": 0.01}
    summary = json.loads((out / "attribution.json").read_text())
    # Every memory is the task memory: all tie, so attribution is at chance exactly.
    assert summary["per_user"]["top1"] == pytest.approx(1 / 3, abs=1e-12)
