"""End-to-end tests of the ``milp_nevergrad`` Hydra sweeper (hydra_plugins/milp_sweeper).

Every sweep is a real Hydra multirun of ``tests/toy_app/toy.py`` in a subprocess; the toy's
objective peaks at x=0.3, memory.rank=8 (see its docstring for the misbehaviour switches).
"""

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser

from hydra_plugins.milp_sweeper._overrides import format_value
from hydra_plugins.milp_sweeper._trial_log import append_jsonl, read_trial_log

ROOT = Path(__file__).resolve().parents[1]
TOY = Path(__file__).parent / "toy_app" / "toy.py"
# Two cheap searched params: BO runs fast and still has to find the rank-8 bonus.
XR = ("x=interval(0,1)", "memory.rank=2,4,8,16")
RANDOM = "hydra.sweeper.optim.optimizer=RandomSearch"


def toy_command(sweep_dir: Path, overrides: Sequence[str], config_name: str | None) -> list[str]:
    """Command line of a toy multirun into ``sweep_dir``."""
    cmd = [sys.executable, str(TOY), "-m", f"hydra.sweep.dir={sweep_dir}", *overrides]
    return cmd + (["--config-name", config_name] if config_name else [])


def toy_env(**extra: str) -> dict[str, str]:
    """Environment for a toy run: never online W&B, short Hydra errors, and one BLAS
    thread (BO's tiny GP fits get slower with threads, and tests run two sweeps at once)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOY_", "HYDRA_FULL"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", **extra)
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def start_toy(
    sweep_dir: Path, *overrides: str, config_name: str | None = None, **env: str
) -> subprocess.Popen[str]:
    """Start a toy multirun without waiting (to run two sweeps side by side)."""
    return subprocess.Popen(
        toy_command(sweep_dir, overrides, config_name),
        cwd=sweep_dir.parent,
        env=toy_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen[str], expect_rc: int | None = 0) -> str:
    """Wait for a toy run; check its exit code (None: any non-zero); return its output."""
    output, _ = proc.communicate(timeout=180)
    if expect_rc is None:
        assert proc.returncode != 0, output
    else:
        assert proc.returncode == expect_rc, output
    return output


def run_toy(
    sweep_dir: Path,
    *overrides: str,
    config_name: str | None = None,
    expect_rc: int | None = 0,
    **env: str,
) -> str:
    """Run a toy multirun to the end; return its combined stdout/stderr."""
    return finish(start_toy(sweep_dir, *overrides, config_name=config_name, **env), expect_rc)


def read_trials(sweep_dir: Path) -> list[dict]:
    """The trial log, one dict per line."""
    lines = (sweep_dir / "trials.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def job_dirs(sweep_dir: Path) -> list[int]:
    """Job numbers that have an output directory."""
    return sorted(int(p.name) for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())


def load_yaml(path: Path) -> dict:
    """Parse a YAML file written by the sweeper."""
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------------------


def test_plugin_discovery_imports_cleanly():
    """A Hydra plugin scan finds the sweeper once, without warnings or heavy imports."""
    assert not (ROOT / "hydra_plugins" / "__init__.py").exists(), "must stay a namespace pkg"
    code = (
        "import sys\n"
        "from hydra.core.plugins import Plugins\n"
        "from hydra.core.config_store import ConfigStore\n"
        "from hydra.plugins.sweeper import Sweeper\n"
        "names = [c.__name__ for c in Plugins.instance().discover(Sweeper)]\n"
        "assert names.count('MilpNevergradSweeper') == 1, names\n"
        "assert 'milp_nevergrad.yaml' in ConfigStore.instance().list('hydra/sweeper')\n"
        "assert 'nevergrad' not in sys.modules and 'wandb' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "Hydra plugins scanner" not in result.stderr


def test_override_values_round_trip_through_hydra():
    """Values written into overrides parse back to the same value and type."""
    parser = OverridesParser.create()
    for value in [0.1, 1e-05, 1 / 3, 3, True, "top_half", "8", "true", "a b", "x,y", [1, 2]]:
        override = parser.parse_override(f"k={format_value(value)}")
        assert override.value() == value and type(override.value()) is type(value), value


def test_trial_log_survives_a_partial_last_line(tmp_path):
    """A kill during a write leaves half a line: it is skipped, and the next append still
    starts on a line of its own."""
    path = tmp_path / "trials.jsonl"
    append_jsonl(path, {"trial": 0, "status": "ok", "objective": 1.0})
    with open(path, "a") as handle:
        handle.write('{"trial": 1, "stat')
    append_jsonl(path, {"trial": 2, "status": "failed", "objective": None})
    assert sorted(read_trial_log(path)) == [0, 2]


def test_bo_finds_good_point_and_writes_results(tmp_path):
    """BO on the toy: budget trials logged, best.yaml and optimization_results.yaml."""
    sweep = tmp_path / "bo"
    run_toy(sweep, *XR, "hydra.sweeper.optim.budget=10")

    trials = read_trials(sweep)
    assert [t["trial"] for t in trials] == list(range(10))
    assert all(t["status"] == "ok" and isinstance(t["duration_s"], float) for t in trials)
    assert job_dirs(sweep) == list(range(10))

    best = load_yaml(sweep / "best.yaml")
    assert best["objective"] == max(t["objective"] for t in trials)
    assert best["overrides"]["memory.rank"] == 8  # the bonus choice
    assert best["params"] == trials[best["trial"]]["params"]  # searched dimensions only
    assert best["objective"] > 0.15  # the optimum is 0.2 (x=0.3, rank 8)

    results = load_yaml(sweep / "optimization_results.yaml")
    assert results["optimizer"] == "BO" and results["budget"] == 10
    assert (results["n_trials"], results["n_ok"], results["n_failed"]) == (10, 10, 0)
    assert results["best_evaluated_result"] == best["objective"]
    assert results["best_evaluated_params"] == trials[best["trial"]]["params"]


def test_yaml_params_random_search_is_reproducible(tmp_path):
    """The YAML config surface with RandomSearch; the same seed gives the same trials."""
    args = (RANDOM, "hydra.sweeper.optim.budget=6", "optim.lr=0.005")  # lr: fixed value
    procs = [start_toy(tmp_path / n, *args, config_name="search") for n in ("a", "b")]
    for proc in procs:
        finish(proc)

    trials = read_trials(tmp_path / "a")
    assert len(trials) == 6

    def essence(log: list[dict]) -> list[tuple]:
        return [(t["params"], t["overrides"], t["objective"]) for t in log]

    assert essence(trials) == essence(read_trials(tmp_path / "b")), "same seed, same trials"
    for trial in trials:
        params = trial["params"]
        assert "optim.lr" not in params and "optim.lr=0.005" in trial["overrides"]
        assert params["memory.rank"] in (2, 4, 8, 16)
        assert params["memory.num_loras"] in (1, 2, 3, 4)
        assert params["memory.layers"] in ("all", "top_half", "bottom_half")
        assert 0.0 <= params["x"] <= 1.0
        # the config group choice really selected the group option in the job
        job_cfg = load_yaml(tmp_path / "a" / str(trial["trial"]) / ".hydra" / "config.yaml")
        assert job_cfg["model"]["name"] == params["model"]
        assert job_cfg["optim"]["lr"] == 0.005


def test_a_repeated_configuration_reuses_the_logged_result(tmp_path):
    """Six trials over a two-point space: each point trains once; repeats take its result."""
    sweep = tmp_path / "repeat"
    run_toy(sweep, "x=0.3", "memory.rank=2,4", RANDOM, "hydra.sweeper.optim.budget=6")
    trials = read_trials(sweep)
    assert len(trials) == 6
    first = {}
    for trial in trials:
        key = trial["params"]["memory.rank"]
        if key not in first:
            first[key] = trial
            assert "reused_from" not in trial
        else:
            assert trial["reused_from"] == first[key]["trial"]
            assert trial["objective"] == first[key]["objective"]
            assert trial["duration_s"] == 0.0
    assert job_dirs(sweep) == sorted(t["trial"] for t in first.values())


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["hydra.sweeper.optim.optimizer=NoSuchOptimizer"], "hydra.sweeper.optim.optimizer"),
        (["+hydra.sweeper.params.model=[]"], "model"),
        (["+hydra.sweeper.params.x={lower:1.0,upper:0.5}"], "x"),
        (["optim.lr=tag(log,interval(0,0.01))"], "optim.lr"),
        (["+hydra.sweeper.params.x={lower:0,upper:1,sigma:2}"], "x"),
        (["hydra.sweeper.optim.budget=0"], "hydra.sweeper.optim.budget"),
        (["hydra.sweeper.optim.num_workers=0"], "hydra.sweeper.optim.num_workers"),
        (["memory.rnak=2,4"], "memory.rnak"),
        (["model=tiny,huge"], "model"),
        (["hydra.sweeper.wandb.enabled=true", "hydra.sweeper.wandb.mode=online"], "wandb.mode"),
        (['hydra.sweeper.final_overrides=["x=0.1,0.2"]'], "hydra.sweeper.final_overrides"),
        (['hydra.sweeper.final_overrides=["nokey=1"]'], "hydra.sweeper.final_overrides"),
        (
            ["hydra.sweeper.pruning.enabled=true", "hydra.sweeper.pruning.percentile=100"],
            "percentile",
        ),
        (
            ["hydra.sweeper.pruning.enabled=true", "hydra.sweeper.pruning.trial_key=nokey"],
            "trial_key",
        ),
    ],
    ids=[
        "optimizer",
        "empty-choices",
        "lower>upper",
        "log-lower<=0",
        "spec-key",
        "budget",
        "num_workers",
        "unknown-key",
        "group-option",
        "wandb-online",
        "final-sweep",
        "final-unknown-key",
        "pruning-percentile",
        "pruning-unknown-key",
    ],
)
def test_bad_config_fails_before_any_job(tmp_path, overrides, named):
    """Each invalid setting stops the sweep with a one-line message naming the key."""
    sweep = tmp_path / "bad"
    output = run_toy(sweep, "memory.rank=2,4", *overrides, expect_rc=1)
    message = next(line for line in output.splitlines() if named in line)
    assert "Traceback" not in output, output
    assert not sweep.exists(), "no sweep dir, hence no job dir, may be created"
    assert len(message) < 400


def test_failed_trials_are_logged_and_the_search_goes_on(tmp_path):
    """A raising trial and a NaN trial are logged as failed; the other trials still run."""
    sweep = tmp_path / "fail"
    run_toy(
        sweep, *XR, RANDOM, "hydra.sweeper.optim.budget=5", TOY_FAIL_TRIALS="1", TOY_NAN_TRIALS="3"
    )

    trials = read_trials(sweep)
    assert [t["status"] for t in trials] == ["ok", "failed", "ok", "failed", "ok"]
    assert "RuntimeError: toy failure requested for trial 1" in trials[1]["error"]
    assert "non-finite" in trials[3]["error"]
    assert trials[1]["objective"] is None and trials[3]["objective"] is None
    results = load_yaml(sweep / "optimization_results.yaml")
    assert (results["n_ok"], results["n_failed"]) == (3, 2)


def test_killed_sweep_resumes_exactly(tmp_path):
    """Kill at trial 3, re-run the same command: trials 3..5 run, and the trials are the
    same as an uninterrupted sweep's (BO replayed from the log, failed trial included)."""
    args = (*XR, "hydra.sweeper.optim.budget=6")
    killed, full = tmp_path / "killed", tmp_path / "full"
    reference = start_toy(full, *args, TOY_FAIL_TRIALS="1")
    finish(start_toy(killed, *args, TOY_FAIL_TRIALS="1", TOY_KILL_AT="3"), expect_rc=None)
    assert [t["trial"] for t in read_trials(killed)] == [0, 1, 2]

    calls = tmp_path / "calls.txt"
    output = run_toy(killed, *args, TOY_FAIL_TRIALS="1", TOY_CALL_LOG=str(calls))
    finish(reference)

    assert "3 of 6 trials already finished" in output
    assert calls.read_text().split() == ["3", "4", "5"]
    resumed = read_trials(killed)
    assert [t["trial"] for t in resumed] == list(range(6))
    assert [t["params"] for t in resumed] == [t["params"] for t in read_trials(full)]
    assert load_yaml(killed / "optimization_results.yaml")["n_trials"] == 6


def test_resume_after_config_change_tells_logged_trials(tmp_path):
    """If the replay cannot match the log (here: another seed), logged trials are told to
    the optimizer and the remaining ones get new job numbers."""
    sweep = tmp_path / "changed"
    args = (*XR, RANDOM, "hydra.sweeper.optim.budget=5")
    run_toy(sweep, *args, expect_rc=None, TOY_KILL_AT="2")
    calls = tmp_path / "calls.txt"
    output = run_toy(sweep, *args, "hydra.sweeper.optim.seed=1", TOY_CALL_LOG=str(calls))

    assert "resuming by telling the logged trials" in output
    assert calls.read_text().split() == ["2", "3", "4"]
    assert [t["trial"] for t in read_trials(sweep)] == [0, 1, 2, 3, 4]


def test_num_workers_2_launches_batches_of_2(tmp_path):
    """num_workers points are asked and launched together."""
    sweep = tmp_path / "batches"
    output = run_toy(
        sweep, *XR, RANDOM, "hydra.sweeper.optim.budget=5", "hydra.sweeper.optim.num_workers=2"
    )
    assert output.count("Launching batch of 2 trial(s)") == 2
    assert output.count("Launching batch of 1 trial(s)") == 1
    assert [t["trial"] for t in read_trials(sweep)] == list(range(5))


def test_joblib_launcher(tmp_path):
    """Batches run through hydra-joblib-launcher (parallel worker processes)."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "joblib"
    run_toy(
        sweep,
        *XR,
        RANDOM,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.optim.budget=4",
        "hydra.sweeper.optim.num_workers=2",
    )
    trials = read_trials(sweep)
    assert [t["trial"] for t in trials] == [0, 1, 2, 3]
    assert all(t["status"] == "ok" and t["duration_s"] is not None for t in trials)
    assert job_dirs(sweep) == [0, 1, 2, 3]


def test_wandb_offline_summary_run(tmp_path):
    """With wandb.enabled, an offline summary run is written under $WANDB_DIR."""
    pytest.importorskip("wandb")
    sweep, wandb_dir = tmp_path / "wb_sweep", tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    args = ("x=interval(0,1)", RANDOM, "hydra.sweeper.wandb.enabled=true")
    run_toy(sweep, *args, "hydra.sweeper.optim.budget=3", WANDB_DIR=str(wandb_dir))
    runs = list((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("run-*.wandb")), "offline run data written"

    # A re-run with nothing to do writes no second summary; a larger budget does.
    output = run_toy(sweep, *args, "hydra.sweeper.optim.budget=3", WANDB_DIR=str(wandb_dir))
    assert "not writing another" in output
    assert len(list((wandb_dir / "wandb").glob("offline-run-*"))) == 1
    run_toy(sweep, *args, "hydra.sweeper.optim.budget=4", WANDB_DIR=str(wandb_dir))
    assert len(list((wandb_dir / "wandb").glob("offline-run-*"))) == 2


def test_final_overrides_evaluate_the_best_once(tmp_path):
    """After the search, the best trial runs once more with final_overrides (here x=0.3,
    standing in for split=test); a re-run reuses that result instead of launching it."""
    sweep = tmp_path / "final"
    args = (*XR, RANDOM, "hydra.sweeper.optim.budget=4", 'hydra.sweeper.final_overrides=["x=0.3"]')
    output = run_toy(sweep, *args)

    best = load_yaml(sweep / "best.yaml")
    final_dir = sweep / f"final-trial{best['trial']}"
    job_overrides = load_yaml(final_dir / ".hydra" / "overrides.yaml")
    assert "x=0.3" in job_overrides and f"memory.rank={best['overrides']['memory.rank']}" in (
        job_overrides
    )
    assert not any(o.startswith("x=") and o != "x=0.3" for o in job_overrides)
    results = load_yaml(sweep / "optimization_results.yaml")
    assert results["n_trials"] == 4 and results["test_status"] == "ok"
    assert results["test_job_dir"] == str(final_dir) and results["final_overrides"] == ["x=0.3"]
    # The toy objective is -(x-0.3)^2 + terms that x=0.3 leaves unchanged.
    expected = best["objective"] + (best["overrides"]["x"] - 0.3) ** 2
    assert results["test_result"] == pytest.approx(expected)
    assert f"of best trial {best['trial']}: objective" in output
    assert job_dirs(sweep) == [0, 1, 2, 3]  # the final job does not take a trial's number

    calls = tmp_path / "calls.txt"
    again = run_toy(sweep, *args, TOY_CALL_LOG=str(calls))
    assert "already done" in again and not calls.exists()
    assert load_yaml(sweep / "optimization_results.yaml")["test_result"] == results["test_result"]


PRUNED = (
    *XR,
    "users=6",
    "hydra.sweeper.optim.budget=8",
    "hydra.sweeper.pruning.enabled=true",
    "hydra.sweeper.pruning.min_trials=2",
)


def trial_essence(sweep_dir: Path) -> list[tuple]:
    """What a resumed sweep must reproduce, trial by trial (not times or directories)."""
    keys = ("trial", "status", "objective", "params", "overrides", "pruned", "users_evaluated")
    return [(*(t[k] for k in keys), t["running"]) for t in read_trials(sweep_dir)]


def test_pruned_sweep_stops_bad_trials_and_resumes_exactly(tmp_path):
    """With pruning, trials that trail the completed ones after a user stop early: they are
    logged with the users they used and their running objective, never become the best;
    a sweep killed in the middle of a trial resumes to the uninterrupted sweep's log,
    best.yaml and optimization_results.yaml."""
    killed, full = tmp_path / "killed", tmp_path / "full"
    reference = start_toy(full, *PRUNED)
    finish(start_toy(killed, *PRUNED, TOY_KILL_AT_USER="5:2"), expect_rc=None)
    assert [t["trial"] for t in read_trials(killed)] == [0, 1, 2, 3, 4]
    progress = json.loads((killed / "5" / "pruning.json").read_text())
    assert progress["users_evaluated"] >= 1 and not progress["pruned"]  # killed mid-trial

    run_toy(killed, *PRUNED)
    finish(reference)
    assert trial_essence(killed) == trial_essence(full)
    assert load_yaml(killed / "best.yaml") == load_yaml(full / "best.yaml")
    results = load_yaml(killed / "optimization_results.yaml")
    assert results == load_yaml(full / "optimization_results.yaml")

    trials = read_trials(full)
    pruned = [t for t in trials if t["pruned"]]
    assert pruned, "some trial must have been stopped early"
    for trial in trials:
        assert trial["users_evaluated"] == len(trial["running"])
        assert trial["objective"] == pytest.approx(trial["running"][-1])
    assert all(t["users_evaluated"] < 6 for t in pruned)
    assert all(t["users_evaluated"] == 6 for t in trials if not t["pruned"])
    assert not trials[load_yaml(full / "best.yaml")["trial"]]["pruned"]
    assert results["n_pruned"] == len(pruned)
    assert results["user_evaluations"] == sum(t["users_evaluated"] for t in trials)
    # The first min_trials trials cannot be stopped: nothing to compare them with.
    assert not any(t["pruned"] for t in trials[:2])
    history = json.loads((full / "pruning" / "before-trial7.json").read_text())
    assert len(history["completed"]) == sum(not t["pruned"] for t in trials[:7])
