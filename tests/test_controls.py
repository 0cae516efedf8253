"""The memory's controls (`history_of`, milp/data/controls.py): real runs of the tiny model.

`swapped` answers each user with another user's memory: the very memory that user gets
in a normal run. `pooled_train` trains each user's memory on the train split's pooled
items, after the task memory's own, for the same steps as the user's own history.
"""

import json
import shutil

import pytest
import torch
from conftest import run_milp
from safetensors.torch import load_file
from test_attribute import TEST_WORDS, attribution_run, lamp4_files

from milp.data.controls import derangement, pooled_histories, swapped_histories
from milp.data.users import HistoryPair, Query, User
from milp.errors import MilpError
from milp.memory.adapters import memory_digest


def control_run(data, out, *overrides: str) -> list[str]:
    """A tiny run's overrides (as test_attribute's) with attribution off."""
    args = attribution_run(data, out, *overrides)
    return [a for a in args if a != "attribution.enabled=true"] + ["attribution.enabled=false"]


def weights(run, user: str) -> dict:
    return load_file(run / "adapters" / user / "memory_0" / "adapter_model.safetensors")


def test_derangement_gives_nobody_their_own_history():
    users = [User(u, [HistoryPair(f"p-{u}", f"t-{u}")], [Query(f"q-{u}", "?")]) for u in "cab"]
    assert derangement(["c", "a", "b"]) == {"a": "b", "b": "c", "c": "a"}
    swapped = {u.user_id: u for u in swapped_histories(users)}
    assert swapped["a"].history == [HistoryPair("p-b", "t-b")]
    assert swapped["a"].history_owner == "b" and swapped["a"].seed_id == "b"
    assert swapped["a"].queries == [Query("q-a", "?")]  # still answering its own queries
    with pytest.raises(MilpError, match="at least 2 users"):
        derangement(["a"])
    # Within a namespace (a play): the swap changes the character, not the play; users
    # alone in theirs swap among themselves, and a last lone one joins the largest cycle.
    ids = ["p/A", "p/B", "p/C", "q/D", "q/E", "r/F", "s/G", "t/H"]
    assert derangement(ids) == {
        "p/A": "p/B",
        "p/B": "p/C",
        "p/C": "p/A",
        "q/D": "q/E",
        "q/E": "q/D",
        "r/F": "s/G",
        "s/G": "t/H",
        "t/H": "r/F",
    }
    assert derangement(["p/A", "p/B", "r/F"]) == {"p/A": "p/B", "p/B": "r/F", "r/F": "p/A"}


def test_pooled_histories_skip_the_task_memorys_items_and_match_each_size():
    pool = [HistoryPair(f"p{i}", f"t{i}") for i in range(10)]
    users = [User("a", pool[:3], []), User("b", pool[:5], [])]
    pooled = pooled_histories(users, pool, skip=4)
    assert [p.target for p in pooled[0].history] == ["t4", "t5", "t6"]
    assert [p.target for p in pooled[1].history] == ["t4", "t5", "t6", "t7", "t8"]
    assert pooled[0].seed_id == "a"
    with pytest.raises(MilpError, match="hold 6 items after the task memory's 4, a user needs 7"):
        pooled_histories([User("c", pool[:7], [])], pool, skip=4)


@pytest.mark.parametrize("injection", ["sequential", "batched"])
def test_swapped_users_are_answered_with_another_users_own_memory(milp_cache, tmp_path, injection):
    data = lamp4_files(tmp_path)
    common = [f"injection={injection}", "trainer.max_epochs=2"]
    own, swapped = tmp_path / "own", tmp_path / "swapped"
    run_milp(control_run(data, own, *common), milp_cache)
    run_milp(control_run(data, swapped, *common, "history_of=swapped"), milp_cache)
    partner = derangement(list(TEST_WORDS))
    for user, other in partner.items():
        mine, theirs = weights(swapped, user), weights(own, other)
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert (mine[key] - theirs[key]).abs().max() < 1e-6, (user, other, key)
    # Each user still answers (and is scored on) their own queries.
    golds = {
        json.loads(line)["user_id"]: json.loads(line)["gold"]
        for line in (swapped / "predictions.jsonl").read_text().splitlines()
    }
    assert golds == {u: f"{w} {w} {w} {w}" for u, w in TEST_WORDS.items()}

    # The same control without training: the own run's stored memories, as they are.
    stored = tmp_path / "stored"
    trained_in = [f"memory.trained_in={own}", "history_of=swapped"]
    run_milp(control_run(data, stored, *common, *trained_in), milp_cache)
    for user, other in partner.items():
        mine, theirs = weights(stored, user), weights(own, other)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[key], theirs[key]) for key in mine), (user, other)
        record = json.loads((stored / "users" / f"{user}.json").read_text())
        assert record["inputs"]["start_memory"] == memory_digest(own / "adapters" / other)
        assert record["train_loss"] is None and record["train_seconds"] == 0
    # With each user's own history it answers exactly as the run that trained them.
    again = tmp_path / "again"
    run_milp(control_run(data, again, *common, f"memory.trained_in={own}"), milp_cache)
    assert (again / "predictions.jsonl").read_text() == (own / "predictions.jsonl").read_text()


def test_stored_memories_must_all_be_there_before_anything_is_written(milp_cache, tmp_path):
    data = lamp4_files(tmp_path)
    own, partial = tmp_path / "own", tmp_path / "partial"
    run_milp(control_run(data, own, "injection=batched", "trainer.max_epochs=1"), milp_cache)
    shutil.copytree(own, partial)
    missing = sorted(TEST_WORDS)[0]
    (partial / "users" / f"{missing}.json").unlink()  # an unfinished run
    out = tmp_path / "out"
    args = control_run(data, out, "injection=batched", f"memory.trained_in={partial}")
    result = run_milp(args, milp_cache, check=False)
    assert result.returncode == 2
    assert f"holds no finished memory of user '{missing}'" in result.stderr
    assert not (out / "users").exists()
    # A memory whose file changed after its run recorded it is refused as well.
    other = sorted(TEST_WORDS)[1]
    weights_file = partial / "adapters" / other / "memory_0" / "adapter_model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-8])
    shutil.copy(own / "users" / f"{missing}.json", partial / "users")
    result = run_milp(args, milp_cache, check=False)
    assert result.returncode == 2 and "memory.trained_in:" in result.stderr
    assert not (out / "users").exists()


def test_pooled_train_is_the_task_memory_continued_on_task_data(milp_cache, tmp_path):
    data = lamp4_files(tmp_path)
    out = tmp_path / "pooled"
    overrides = [
        "memory.init=task",
        "trainer.max_epochs=1",
        "history_of=pooled_train",
    ]
    run_milp(control_run(data, out, *overrides), milp_cache)
    task = load_file(out / "task_memory" / "memory_0" / "adapter_model.safetensors")
    memories = [weights(out, user) for user in TEST_WORDS]
    for memory in memories:  # trained on from the task memory
        assert any((memory[k] != v).any() for k, v in task.items())
    for user in TEST_WORDS:  # the same number of items (and steps) as the user's own
        record = json.loads((out / "users" / f"{user}.json").read_text())
        assert record["history_size"] == 8


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["history_of=mine"], "history_of must be one of own, swapped, pooled_train"),
        (["history_of=swapped", "memory=none"], "a control of the memory needs a memory"),
        (["history_of=swapped", "attribution.enabled=true"], "needs every user's own memory"),
        (["memory.trained_in=/no/run", "attribution.enabled=true"], "attribution.enabled=false"),
        (["memory.trained_in=/no/run"], "memory.trained_in=/no/run: no such directory"),
    ],
)
def test_bad_control_settings_stop_before_training(milp_cache, tmp_path, overrides, message):
    data = lamp4_files(tmp_path)
    args = [*control_run(data, tmp_path / "bad"), *overrides]  # the later setting wins
    result = run_milp(args, milp_cache, check=False)
    assert result.returncode == 2 and message in result.stderr
