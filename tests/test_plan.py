"""Preregistration (experiments/plan.py): the frozen plan the test stage must follow."""

import json
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
from plan import check_run, freeze, summary  # noqa: E402

RUNS = {
    "zero_shot": {"seeds": [0], "overrides": ["+method=zero_shot"]},
    "milp": {"seeds": [0, 1, 2], "overrides": ["+method=milp", "memory.rank=4"]},
}


def frozen(tmp_path, **changes):
    (tmp_path / "tuning.json").write_text(json.dumps({"milp": {"settings": ["memory.rank=4"]}}))
    settings = {"source": "chitchat", "experiment": "chitchat", "runs": RUNS}
    settings |= {"test_user_ids": ["u2", "u1"]} | changes
    return freeze(tmp_path, **settings)


def test_the_plan_is_written_once_and_predates_the_test_runs(tmp_path):
    plan = frozen(tmp_path)
    assert plan["test_user_ids"] == ["u1", "u2"] and plan["runs"] == RUNS
    assert len(plan["commit"]) == 40 and "created_at" in plan
    assert "no test run has started yet" in summary(tmp_path)
    # Freezing again with the same choices keeps the first plan, time included.
    assert frozen(tmp_path) == plan
    check_run(tmp_path, "milp", 1, ["+method=milp", "memory.rank=4"])
    starts = json.loads((tmp_path / "test_starts.json").read_text())
    assert list(starts) == ["milp/seed1"]
    first = starts["milp/seed1"]["started_at"]
    check_run(tmp_path, "milp", 1, ["+method=milp", "memory.rank=4"])  # a resumed run
    assert (
        json.loads((tmp_path / "test_starts.json").read_text())["milp/seed1"]["started_at"] == first
    )
    text = summary(tmp_path)
    assert "the plan predates every test run" in text and "test users: 2" in text


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"test_user_ids": ["u1", "u3"]}, "test_user_ids"),
        ({"runs": {**RUNS, "milp": {"seeds": [0], "overrides": []}}}, "runs"),
    ],
)
def test_a_frozen_plan_is_never_rewritten(tmp_path, changes, named):
    frozen(tmp_path)
    before = (tmp_path / "plan.json").read_bytes()
    with pytest.raises(SystemExit, match=f"is frozen and this invocation differs in {named}"):
        frozen(tmp_path, **changes)
    assert (tmp_path / "plan.json").read_bytes() == before


def test_a_changed_tuning_record_is_a_different_plan(tmp_path):
    frozen(tmp_path)
    (tmp_path / "tuning.json").write_text("{}")
    with pytest.raises(SystemExit, match="differs in tuning_sha256"):
        freeze(
            tmp_path,
            source="chitchat",
            experiment="chitchat",
            runs=RUNS,
            test_user_ids=["u1", "u2"],
        )


def test_the_test_stage_refuses_what_the_plan_does_not_hold(tmp_path):
    with pytest.raises(SystemExit, match="runs only from a frozen plan"):
        check_run(tmp_path, "milp", 0, ["+method=milp", "memory.rank=4"])
    frozen(tmp_path)
    for method, seed, overrides, message in [
        ("oppu", 0, [], "holds no test run of oppu"),
        ("zero_shot", 1, ["+method=zero_shot"], "with seed 1"),
        ("milp", 0, ["+method=milp", "memory.rank=8"], "the settings differ"),
    ]:
        with pytest.raises(SystemExit, match=message):
            check_run(tmp_path, method, seed, overrides)
    assert not (tmp_path / "test_starts.json").exists()
    # A plan frozen at another commit: its test runs need that commit's code.
    plan = json.loads((tmp_path / "plan.json").read_text())
    (tmp_path / "plan.json").write_text(json.dumps(plan | {"commit": "0" * 40}))
    with pytest.raises(SystemExit, match=f"frozen at commit {'0' * 40}, this checkout is at"):
        check_run(tmp_path, "milp", 0, ["+method=milp", "memory.rank=4"])


def test_test_runs_made_before_a_plan_cannot_be_preregistered(tmp_path):
    (tmp_path / "runs" / "milp" / "seed0").mkdir(parents=True)
    (tmp_path / "runs" / "tune" / "milp").mkdir(parents=True)
    with pytest.raises(SystemExit, match="seed0 exists but .*plan.json does not"):
        frozen(tmp_path)
    assert not (tmp_path / "plan.json").exists()


def test_the_verdict_states_holds_does_not_hold_or_inconclusive():
    from verdict import claim_rows, decomposition

    def runs(scores: dict[str, tuple[float, float]], seeds: int = 1) -> list[dict]:
        per_user = [
            {"user_id": u, "rougeL": r, "nll": n, "example_scores": [{}] * 10, "history_size": 64}
            for u, (r, n) in scores.items()
        ]
        mean = {
            "rougeL": sum(r for r, _ in scores.values()) / len(scores),
            "nll": sum(n for _, n in scores.values()) / len(scores),
        }
        return [{"metrics": mean, "per_user": per_user}] * seeds

    users = [f"u{i}" for i in range(12)]  # enough for exact sign-flip p after Holm
    results = {
        # Memory: clearly better ROUGE-L and NLL than zero-shot for every user.
        "milp": runs({u: (0.30 + 0.01 * i, 3.0 + 0.01 * i) for i, u in enumerate(users)}, 3),
        "zero_shot": runs({u: (0.10 + 0.02 * i, 4.0 - 0.01 * i) for i, u in enumerate(users)}),
        # Swapped: no different on average (half better, half worse).
        "milp_swapped": runs(
            {u: (0.3, 3.0 + (0.2 if i % 2 else -0.2) + 0.01 * i) for i, u in enumerate(users)}, 3
        ),
        # OPPU: clearly better NLL than MiLP.
        "oppu": runs({u: (0.31 + 0.01 * i, 2.5 + 0.01 * i) for i, u in enumerate(users)}, 3),
    }
    rows = {r["claim"]: r for r in claim_rows(results, None)}
    assert rows["memory beats no memory (ROUGE-L)"]["status"] == "holds"
    assert rows["memory beats no memory (held-out NLL)"]["status"] == "holds"
    swapped = rows["personalization: own memory < another user's (swapped)"]
    assert swapped["status"] == "inconclusive"
    assert rows["searched MiLP beats OPPU-style (NLL)"]["status"] == "does not hold"
    task = rows["personalization: own memory < step-matched task fine-tune"]
    assert task["status"] == "inconclusive" and "not run: milp_task_ft" in task["figures"]
    assert "(3 seeds)" in swapped["figures"]
    assert "(1 seed)" in rows["memory beats no memory (ROUGE-L)"]["figures"]
    assert "ablations not run" in rows[next(c for c in rows if "several LoRAs" in c)]["figures"]
    assert "Holm-adjusted p" in swapped["figures"]
    table = decomposition(results)
    # Total = domain + owner per user: 0.89 nats on average here, all of it the domain's.
    assert "| total: no memory → own | +0.8900 |" in table


def test_holm_adjusts_step_down_and_keeps_the_order():
    from verdict import holm

    # Sorted 0.01, 0.03, 0.04 -> 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04).
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
