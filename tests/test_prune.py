"""milp/run/prune.py: the trial side of pruning (rule, user order, running objective, file)."""

import json
from types import SimpleNamespace

import pytest

from milp.errors import MilpError
from milp.run.prune import PROGRESS_FILE, Pruner, PruneRule, quantile, seeded_order

COMPLETED = [[0.5, 0.6, 0.7, 0.8], [0.3, 0.4, 0.5, 0.6], [0.1, 0.2, 0.3, 0.4]]


def mean_value(results: list[dict]) -> float:
    return sum(r["v"] for r in results) / len(results)


def test_quantile_interpolates_between_order_statistics():
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0, 2.0], 0.75) == 1.75
    assert quantile([4.0], 0.3) == 4.0


def test_rule_is_median_stopping_at_the_same_user_count():
    rule = PruneRule(percentile=50, min_users=1, min_trials=3)
    assert rule.stops(1, 0.29, COMPLETED) and not rule.stops(1, 0.3, COMPLETED)
    assert rule.stops(2, 0.39, COMPLETED) and not rule.stops(2, 0.41, COMPLETED)
    assert not rule.stops(4, 0.0, COMPLETED), "the last user never stops a trial"
    assert not PruneRule(min_trials=4).stops(1, 0.0, COMPLETED), "too few completed trials"
    assert not PruneRule(min_users=2).stops(1, 0.0, COMPLETED), "too early"
    strict = PruneRule(percentile=75, min_trials=3)  # must reach the upper quartile
    assert strict.stops(1, 0.35, COMPLETED) and not strict.stops(1, 0.45, COMPLETED)
    loss = PruneRule(maximize=False, min_trials=3)  # a loss: stop when above the median
    assert loss.stops(1, 0.31, COMPLETED) and not loss.stops(1, 0.29, COMPLETED)
    assert rule.first_stop([0.4, 0.35, 0.9, 0.9], COMPLETED) == 2
    assert rule.first_stop([0.4, 0.5, 0.6, 0.7], COMPLETED) is None


def test_user_order_is_seeded_and_independent_of_the_input_order():
    ids = [f"u{i}" for i in range(8)]
    assert seeded_order(ids, 0) == seeded_order(list(reversed(ids)), 0)
    assert seeded_order(ids, 0) != seeded_order(ids, 1)
    assert sorted(seeded_order(ids, 0)) == sorted(ids)


def write_spec(path, **overrides) -> str:
    spec = {"percentile": 50, "min_users": 1, "min_trials": 3, "maximize": True, "seed": 0}
    spec["completed"] = COMPLETED
    path.write_text(json.dumps(spec | overrides))
    return str(path)


def test_pruner_stops_writes_its_progress_and_resumes_at_the_same_point(tmp_path):
    users = [SimpleNamespace(user_id=f"u{i}") for i in range(4)]
    order_ids = seeded_order([u.user_id for u in users], 0)
    values = dict(zip(order_ids, [0.4, 0.35, 0.9, 0.9], strict=True))
    spec = write_spec(tmp_path / "history.json")

    pruner = Pruner.from_config(spec, mean_value, tmp_path / "job")
    order = pruner.order(users)
    assert [u.user_id for u in order] == seeded_order([u.user_id for u in users], 0)
    done: dict[str, dict] = {}
    for user in order:
        done[user.user_id] = {"v": values[user.user_id]}
        if pruner.should_stop(done):
            break
    assert len(done) == 2 and pruner.pruned
    assert pruner.running == [0.4, pytest.approx(0.375)]
    assert pruner.evaluated == [u.user_id for u in order[:2]]
    assert pruner.summary() == {"pruned": True, "users_evaluated": 2}
    progress = json.loads((tmp_path / "job" / PROGRESS_FILE).read_text())
    assert progress["pruned"] and progress["users_evaluated"] == 2

    # A trial killed after its second user: the users on disk decide before any training,
    # and a user finished out of order (batched injection) counts only after its turn.
    resumed = Pruner.from_config(spec, mean_value, tmp_path / "again")
    resumed.order(users)
    assert resumed.should_stop(done) and resumed.running == pruner.running
    later = Pruner.from_config(spec, mean_value, tmp_path / "later")
    later.order(users)
    assert not later.should_stop({order[1].user_id: {"v": 0.1}}) and later.running == []


def test_pruning_off_and_bad_files(tmp_path):
    assert Pruner.from_config(None, mean_value, tmp_path) is None
    with pytest.raises(MilpError, match="prune_file: cannot read"):
        Pruner.from_config(str(tmp_path / "missing.json"), mean_value, tmp_path)
    (tmp_path / "partial.json").write_text(json.dumps({"percentile": 50}))
    with pytest.raises(MilpError, match="lacks min_users"):
        Pruner.from_config(str(tmp_path / "partial.json"), mean_value, tmp_path)
    spec = write_spec(tmp_path / "ok.json")
    with pytest.raises(MilpError, match="one process"):
        Pruner.from_config(spec, mean_value, tmp_path, processes=2)
