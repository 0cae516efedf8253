"""The fair-tuning step of `make reproduce` (experiments/tuning.py) on the real milp app:
real sweeps of `python -m milp.train` on the tiny config, validation users only."""

import json
import shutil
import sys

import pytest
import yaml
from conftest import ROOT, TINY_MODEL_OVERRIDES, milp_env

sys.path.insert(0, str(ROOT / "experiments"))
import tuning  # noqa: E402 (a script folder, not a package)

from milp.data.synthetic import load_synthetic_users  # noqa: E402

TINY = [
    *TINY_MODEL_OVERRIDES,
    "trainer.max_epochs=1",
    "generation.max_new_tokens=8",
    "trainer.enable_progress_bar=false",
]
# The 4-layer tiny model: the searched layer window's bounds narrowed to match.
WINDOW = ["memory.window_start=range(0,4)", "memory.window_length=range(1,5)"]


@pytest.fixture
def offline(milp_cache, monkeypatch):
    for key, value in milp_env(milp_cache).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_tuning_runs_the_budget_on_dev_users_only_and_records_the_choice(
    milp_cache, tmp_path, offline
):
    budget = tuning.Budget(trials=2, dev_users=1)
    records = tuning.tune_all(
        ["zero_shot", "milp_sparse"],
        experiment="lamp",
        budget=budget,
        out=tmp_path,
        data=TINY,
        space_overrides=[*WINDOW, "retrieval.k=range(1,3)"],  # k: not in this space
    )
    assert records["zero_shot"] == {"method": "zero_shot", "not_tuned": "no settings to tune"}
    record = records["milp_sparse"]
    assert json.loads((tmp_path / "tuning.json").read_text())["milp_sparse"] == json.loads(
        json.dumps(record)
    )
    sweep = tmp_path / "runs" / "tune" / "milp_sparse"
    trials = tuning.read_trials(sweep)
    assert record["trials"] == len(trials) == budget.trials and record["split"] == "dev"
    assert record["budget"]["trials"] == 2 and record["budget"]["optimizer"] == "BO"
    # The space as run: MiLP's search, the remedy's setting, the narrowed window; the
    # epochs fixed by the run's own override; no retrieval dimension added.
    assert record["space"]["memory.window_start"] == "range(0,4)"
    assert record["space"]["trainer.max_epochs"] == "fixed: 1"
    assert "data.min_examples_per_epoch" in record["space"] and "retrieval.k" not in record["space"]
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    assert record["params"] == best["params"] and record["dev_objective"] == best["objective"]
    assert {s.split("=")[0] for s in record["settings"]} == set(best["params"])
    assert "data.min_examples_per_epoch" in best["params"]

    # Never the test split: every job's config and metrics say dev, no test evaluation,
    # and no test user was answered.
    test_ids = {u.user_id for u in load_synthetic_users(milp_cache / "data", "test")}
    dev_ids = {u.user_id for u in load_synthetic_users(milp_cache / "data", "dev")}
    assert not list(sweep.glob("final-trial*"))
    answered = set()
    for trial in trials:
        job = sweep / str(trial["trial"])
        assert yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["split"] == "dev"
        assert json.loads((job / "metrics.json").read_text())["split"] == "dev"
        answered |= {json.loads(p.read_text())["user_id"] for p in (job / "users").glob("*")}
    assert answered and answered <= dev_ids and not answered & test_ids
    assert set(record["dev_user_ids"]) == answered

    # The guard that the pipeline runs fails on a sweep with a job on another split.
    tampered = tmp_path / "tampered"
    shutil.copytree(sweep, tampered)
    log = tampered / "trials.jsonl"
    log.write_text(log.read_text().replace(str(sweep), str(tampered)))
    metrics = tampered / "1" / "metrics.json"
    metrics.write_text(metrics.read_text().replace('"split": "dev"', '"split": "test"'))
    with pytest.raises(SystemExit, match="ran on split test"):
        tuning.check_dev_only(tampered)


def test_tuning_spaces_share_milps_ranges_on_dev_without_a_test_evaluation():
    """Each tuned method's sweep file: its own dimensions, over MiLP's ranges where they
    overlap, on dev users, and no final test job (the pipeline's test runs come after
    every method is tuned)."""
    milp, _ = tuning.composed_space("lamp", "milp", [])
    expected = {
        "rag": {"retrieval.k"},
        "oppu": {"optim.lr", "trainer.max_epochs"},
        "milp": set(milp),
        "milp_sparse": set(milp) | {"data.min_examples_per_epoch"},
    }
    assert set(tuning.TUNING_SWEEPS) == set(expected)
    for method, dimensions in expected.items():
        space, objective = tuning.composed_space("lamp", method, [])
        assert set(space) == dimensions and objective == "rougeL", method
        # retrieval's ladder starts at none (k=0, zero-shot)
        if "retrieval.k" in space:
            assert space["retrieval.k"] == [0, 1, 2, 4, 8]
        for key in set(space) & set(milp):
            assert space[key] == milp[key], (method, key)
        sweep = yaml.safe_load(
            (ROOT / "sweeps" / f"{tuning.TUNING_SWEEPS[method]}.yaml").read_text()
        )
        if method != "milp":  # milp_bo.yaml keeps its own test evaluation for `make sweep`
            assert sweep["hydra"]["sweeper"]["final_overrides"] == []
    assert "hydra.sweeper.final_overrides=[]" in tuning.Budget(3).overrides()
    assert "split=dev" in tuning.Budget(3).overrides()
    assert "attribution.enabled=false" in tuning.Budget(3).overrides()


def test_small_discrete_spaces_are_enumerated_and_continuous_ones_are_not():
    """A space of choices and integer ranges is a grid (tried whole when it fits the
    budget); the sweeper's own reading of the command line applies."""
    rag, _ = tuning.composed_space("lamp", "rag", [])
    assert tuning.grid_points(rag, []) == [{"retrieval.k": k} for k in (0, 1, 2, 4, 8)]
    assert tuning.grid_points(rag, ["retrieval.k=choice(1,2)"]) == [
        {"retrieval.k": 1},
        {"retrieval.k": 2},
    ]
    oppu, _ = tuning.composed_space("lamp", "oppu", [])
    assert tuning.grid_points(oppu, []) is None  # the learning rate is continuous
    grid = tuning.grid_points(oppu, ["optim.lr=0.01", "trainer.max_epochs=range(2,4)"])
    assert grid == [{"trainer.max_epochs": 2}, {"trainer.max_epochs": 3}]
    milp, _ = tuning.composed_space("lamp", "milp", [])
    assert tuning.grid_points(milp, []) is None
