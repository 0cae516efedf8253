"""The memory-injection search space (sweeps/) on the real milp app.

Fast: the sweep configs compose through Hydra's ``+sweep=`` group (the ``sweeps/`` folder,
read through ``hydra_plugins/milp_sweeps`` from any working directory), every value they
can propose is a valid memory placement on the default model's architecture, a bad sweep
config stops the milp app before any trial, and a tiny BO sweep through the real CLI logs
its trials, writes best.yaml and evaluates the best once on the test users. Slow: a killed
sweep resumes with the remaining trials only.
"""

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TINY_MODEL_OVERRIDES, milp_env, run_milp, start_milp
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from hydra_plugins.milp_sweeper._search_space import build_search_space, nevergrad_parameter
from milp.memory.space import place_memory

SWEEPS = ROOT / "sweeps"
ABLATIONS = {
    "layers": ("memory.layers", ["all", "top_half", "bottom_half", "every_other"]),
    "rank": ("memory.rank", ["1", "2", "4", "8", "16"]),
    "num_loras": ("memory.num_loras", ["0", "1", "2", "3", "4"]),
    "target_modules": ("memory.target_modules", ["ffn", "attention", "ffn+attention"]),
}
# The paper-style search on a tiny test config: one dev user, 4 layers (window bounds
# narrowed to match), 2 epochs (a fixed value replaces the searched max_epochs).
TINY_BO = [
    "-m",
    "+experiment=lamp",
    "+sweep=milp_bo",
    *TINY_MODEL_OVERRIDES,
    "data.users.max_users=1",
    "trainer.max_epochs=2",
    "generation.max_new_tokens=12",
    "callbacks=none",
    "trainer.enable_progress_bar=false",
    "memory.window_start=range(0,4)",
    "memory.window_length=range(1,5)",
]

# The dimensions sweeps/milp_bo.yaml searches.
MILP_BO_DIMENSIONS = {
    "memory.num_loras",
    "memory.rank",
    "memory.window_start",
    "memory.window_length",
    "memory.target_modules",
    "optim.lr",
    "trainer.max_epochs",
}


def compose_train(*overrides: str):
    """The composed milp config (hydra node included), as ``python -m milp.train`` sees it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.fixture(scope="module")
def default_llama() -> LlamaForCausalLM:
    """A random model with the default tiny model's layer structure (conf/model/tiny.yaml)."""
    tiny = OmegaConf.load(ROOT / "conf" / "model" / "tiny.yaml")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


def load_script(name: str):
    """Import experiments/search/<name>.py (a script folder, not a package; its scripts
    import each other as run from there)."""
    folder = ROOT / "experiments" / "search"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def read_trials(sweep_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (sweep_dir / "trials.jsonl").read_text().splitlines()]


# ---- the configs -----------------------------------------------------------------------


def test_sweep_group_is_the_sweeps_folder_from_any_working_directory(tmp_path):
    """`+sweep=<name>` selects sweeps/<name>.yaml (hydra_plugins/milp_sweeps), run from a
    directory that is not the checkout, and the tree holds no symlink for it."""
    tracked = subprocess.run(
        ["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if tracked.returncode == 0:
        links = [line.split()[-1] for line in tracked.stdout.splitlines() if line[:6] == "120000"]
        assert not links, f"symlinks in the tree: {links}"
    assert not (ROOT / "conf" / "sweep").exists()
    result = subprocess.run(
        [sys.executable, "-m", "milp.train", "+sweep=nope", "--cfg", "job"],
        cwd=tmp_path,
        env=milp_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    listed = result.stdout + result.stderr
    available = listed.split("Available options in 'sweep':", 1)[1].split("Config search")[0]
    assert sorted(available.split()) == sorted(p.stem for p in SWEEPS.glob("*.yaml"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "milp.train",
            "+experiment=lamp",
            "+sweep=milp_bo",
            "--cfg",
            "hydra",
            "-p",
            "hydra.sweeper.optim",
        ],
        cwd=tmp_path,
        env=milp_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["optimizer"] == "BO"


def test_milp_bo_space_is_the_paper_space_on_dev_users(default_llama):
    cfg = compose_train("+experiment=lamp", "+sweep=milp_bo")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("MilpNevergradSweeper")
    assert cfg.split == "dev" and "split=test" in sweeper.final_overrides
    assert cfg.hydra.sweep.dir == "multirun/milp_bo"  # fixed: re-running resumes
    # W&B: the summary run and (through logger.group) every trial's run share one group.
    assert sweeper.wandb.group == "milp_bo" and sweeper.wandb.enabled
    assert sweeper.wandb.trial_group_key == "logger.group" and "group" in cfg.logger
    assert sweeper.wandb.mode == "offline" and cfg.logger.mode == "offline"
    assert (sweeper.optim.optimizer, sweeper.optim.seed) == ("BO", 0)
    assert 20 <= sweeper.optim.budget <= 30
    assert sweeper.pruning.enabled and sweeper.pruning.trial_key in cfg  # pruned by default

    params = OmegaConf.to_container(sweeper.params)
    space = build_search_space(params, [], OverridesParser.create())
    assert set(space.params) == MILP_BO_DIMENSIONS
    assert not space.fixed
    for spec in space.params.values():
        nevergrad_parameter(spec)  # every dimension is a valid nevergrad parameter

    # The window covers exactly the default model's layers, and every corner of the space
    # (with each target-module choice) is a valid placement on that architecture.
    layers = len(default_llama.model.layers)
    start, length = space.params["memory.window_start"], space.params["memory.window_length"]
    # (no isinstance: Hydra's plugin scan re-executes the sweeper module, new classes)
    assert (start.lower, start.upper, start.integer) == (0, layers - 1, True)
    assert (length.lower, length.upper, length.integer) == (1, layers, True)
    targets = space.params["memory.target_modules"]
    assert targets.options == ("ffn", "attention", "ffn+attention")
    for target in targets.options:
        for window in [(0, 1), (0, layers), (layers - 1, layers), (layers - 1, 1)]:
            memory = instantiate(
                cfg.memory,
                target_modules=target,
                window_start=window[0],
                window_length=window[1],
            )
            placement = place_memory(memory, default_llama)
            assert placement.layers == list(range(window[0], min(sum(window), layers)))


@pytest.mark.parametrize("dimension", list(ABLATIONS))
def test_ablation_sweeps_vary_one_dimension(default_llama, dimension):
    key, values = ABLATIONS[dimension]
    cfg = compose_train("+experiment=lamp", f"+sweep=ablate_{dimension}")
    assert cfg.hydra.sweeper._target_.endswith("BasicSweeper")
    assert dict(cfg.hydra.sweeper.params) == {key: ",".join(values)}
    assert cfg.split == "dev" and cfg.hydra.sweep.dir == f"multirun/ablate_{dimension}"
    assert cfg.memory.window_start is None  # the window is off unless the best set it
    for value in values:
        job = compose_train("+experiment=lamp", f"+sweep=ablate_{dimension}", f"{key}={value}")
        memory = instantiate(job.memory)
        if memory.enabled:
            assert place_memory(memory, default_llama).layers


def test_ablate_script_fixes_the_best_and_varies_one_dimension(tmp_path, capsys):
    ablate = load_script("ablate.py")
    settings, best = ablate.best_overrides(tmp_path / "missing.yaml")
    assert (settings, best) == ({}, None) and "ablating around the defaults" in (
        capsys.readouterr().out
    )
    best_file = tmp_path / "best.yaml"
    best_file.write_text(
        yaml.safe_dump(
            {
                "objective": 0.9,
                "trial": 3,
                "overrides": {
                    "+experiment": "lamp",
                    "+sweep": "milp_bo",
                    "memory.rank": 4,
                    "memory.window_start": 2,
                    "memory.window_length": 3,
                    "memory.target_modules": "ffn+attention",
                    "optim.lr": 0.003,
                    "data.users.max_users": 8,
                },
            }
        )
    )
    settings, best = ablate.best_overrides(best_file)
    assert best["trial"] == 3
    layers = ablate.ablation_overrides("layers", settings, ["data.users.max_users=2"])
    assert layers == [
        "memory.rank=4",
        "memory.target_modules=ffn+attention",
        "optim.lr=0.003",
        "data.users.max_users=2",  # the command line wins over the best's value
    ]
    rank = ablate.ablation_overrides("rank", settings, [])
    assert "memory.window_start=2" in rank and not any(o.startswith("memory.rank") for o in rank)
    # W&B runs of an ablation are grouped, unless the logger has no group (csv, none).
    assert ablate.group_overrides("rank", rank) == ["logger.group=ablate_rank"]
    assert ablate.group_overrides("rank", [*rank, "logger=none"]) == []
    assert ablate.group_overrides("rank", [*rank, "logger=csv"]) == []


def synthetic_grid(bench) -> dict:
    """A grid in bench_grid.json's layout whose per-user metrics follow a smooth function
    of the configuration plus a fixed per-user offset (a synthetic sanity check)."""
    grid_module = load_script("bench_grid.py")
    offsets = {"u0": 0.04, "u1": -0.02, "u2": 0.01, "u3": -0.03}
    configs = []
    for config in grid_module.grid_configs():
        entry = dict(zip(grid_module.SPACE, config, strict=True))
        score = 0.5 + 0.1 * (entry["memory.window_start"] == 2) + 0.05 * entry["memory.rank"] / 8
        score += 0.05 * (entry["memory.target_modules"] == "ffn") + 2 * entry["optim.lr"]
        users = {u: {n: score + d for n in ("rouge1", "rougeL")} for u, d in offsets.items()}
        for metrics in users.values():
            metrics.update(bleu=0.0, persona_p=0.0, persona_r=0.0, persona_f1=0.0, examples=3)
        configs.append(entry | {"objective": score, "seconds": 1.0, "users": users})
    return {"configs": configs}


def test_bench_replays_the_sweeper_with_and_without_pruning():
    bench = load_script("bench_search.py")
    assert len(load_script("bench_grid.py").grid_configs()) == 192
    grid = synthetic_grid(bench)
    optimum = max(c["objective"] for c in grid["configs"])
    order = bench.seeded_order(["u0", "u1", "u2", "u3"], 0)
    curve = bench.running_curve(grid["configs"][0]["users"], order)
    assert curve[-1] == pytest.approx(grid["configs"][0]["objective"])  # offsets average out

    first = bench.replay(grid, "RandomSearch", 3, 60, None)
    assert first == bench.replay(grid, "RandomSearch", 3, 60, None)  # seeded
    assert [t["cost"] for t in first["trials"]] == [
        4 * (i + 1) for i in range(len(first["trials"]))
    ]
    pruned = bench.replay(grid, "RandomSearch", 3, 60, bench.PruneRule(min_trials=2))
    assert any(t["pruned"] for t in pruned["trials"])
    assert all(t["best"] is None or t["best"] <= optimum for t in pruned["trials"])
    stopped = [t for t in pruned["trials"] if t["pruned"]]
    assert len(pruned["trials"]) > len(first["trials"]) or not stopped  # cheaper trials
    reached = bench.cost_to_reach(first, 0.9 * optimum)
    assert reached is None or reached % 4 == 0
    assert bench.best_at(first, 0) is None


# ---- the milp app through the real CLI -------------------------------------------------


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("memory.rnak=2,4", "unknown key 'memory.rnak'"),
        pytest.param(
            "hydra.sweeper.optim.optimizer=BOO",
            "unknown nevergrad optimizer 'BOO'",
            marks=pytest.mark.slow,
        ),
        pytest.param("+hydra.sweeper.params.seed=[]", "seed", marks=pytest.mark.slow),
        pytest.param("memory.rank=interval(16,1)", "memory.rank", marks=pytest.mark.slow),
    ],
    ids=["unknown-key", "optimizer", "empty-choices", "lower>upper"],
)
def test_bad_sweep_config_stops_the_milp_app_before_any_trial(
    milp_cache, tmp_path, override, named
):
    sweep = tmp_path / "bad"
    result = run_milp(
        [*TINY_BO, f"hydra.sweep.dir={sweep}", override], milp_cache, check=False, timeout=300
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    message = next(line for line in output.splitlines() if named in line)
    assert len(message) < 400 and "Traceback" not in output
    assert not sweep.exists(), "no trial may start"


def test_tiny_bo_sweep_logs_trials_and_evaluates_the_best_on_test_users(milp_cache, tmp_path):
    sweep = tmp_path / "bo"
    result = run_milp(
        [*TINY_BO, "hydra.sweeper.optim.budget=2", f"hydra.sweep.dir={sweep}"],
        milp_cache,
        timeout=600,
    )
    trials = read_trials(sweep)
    assert [t["trial"] for t in trials] == [0, 1]
    assert all(t["status"] == "ok" and 0 <= t["objective"] <= 1 for t in trials), trials
    searched = MILP_BO_DIMENSIONS - {"trainer.max_epochs"}
    for trial in trials:
        assert set(trial["params"]) == searched  # max_epochs: fixed on the command line
        assert 0 <= trial["params"]["memory.window_start"] <= 3
        metrics = json.loads((sweep / str(trial["trial"]) / "metrics.json").read_text())
        assert metrics["split"] == "dev" and metrics["objective"] == trial["objective"]
        job_cfg = yaml.safe_load((sweep / str(trial["trial"]) / ".hydra/config.yaml").read_text())
        assert job_cfg["logger"]["group"] == "milp_bo"  # W&B runs grouped by sweep...
        assert not any(o.startswith("logger.group") for o in trial["overrides"])  # ...quietly
        assert len(list((sweep / str(trial["trial"]) / "wandb").glob("offline-run-*"))) == 1

    best = yaml.safe_load((sweep / "best.yaml").read_text())
    assert best["objective"] == max(t["objective"] for t in trials)
    assert "logger.group" not in best["overrides"]  # best.yaml holds settings only
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_trial"] == best["trial"] and results["n_ok"] == 2
    # The best configuration, once, on the test users.
    final_dir = Path(results["test_job_dir"])
    assert final_dir == sweep / f"final-trial{best['trial']}"
    test_metrics = json.loads((final_dir / "metrics.json").read_text())
    assert test_metrics["split"] == "test" and test_metrics["no_memory"] is not None
    assert results["test_result"] == test_metrics["objective"]
    assert results["test_status"] == "ok"
    output = result.stdout + result.stderr
    assert f"of best trial {best['trial']}: objective" in output
    # The sweep's W&B summary run (offline), next to the per-trial runs.
    assert len(list((sweep / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow
def test_killed_milp_sweep_resumes_with_the_remaining_trials_only(milp_cache, tmp_path):
    sweep = tmp_path / "resume"
    # logger=none: the sweep's W&B grouping must step aside for a logger without `group`.
    args = [*TINY_BO, "logger=none", "hydra.sweeper.optim.budget=3", f"hydra.sweep.dir={sweep}"]
    run_milp(
        [*TINY_BO, "hydra.sweeper.optim.budget=1", f"hydra.sweep.dir={tmp_path}/warm"],
        milp_cache,
        timeout=600,
    )  # builds the tiny model first
    process = start_milp(args, milp_cache)
    log_file = sweep / "trials.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log_file.exists() and log_file.read_text().strip()):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)  # killed hard while trial 1 runs
    process.wait(timeout=60)
    first = read_trials(sweep)
    assert [t["trial"] for t in first] == [0]
    stamp = (sweep / "0" / "metrics.json").stat().st_mtime_ns

    result = run_milp(args, milp_cache, timeout=600)
    output = result.stdout + result.stderr
    assert "1 of 3 trials already finished" in output
    assert "#0 :" not in output  # trial 0 is replayed from the log, not launched
    trials = read_trials(sweep)
    assert [t["trial"] for t in trials] == [0, 1, 2] and trials[0] == first[0]
    assert (sweep / "0" / "metrics.json").stat().st_mtime_ns == stamp
    final = json.loads((sweep / "final_evaluation.json").read_text())
    assert final["status"] == "ok"

    # Once more: nothing left to run, and the test evaluation is not redone.
    again = run_milp(args, milp_cache, timeout=600)
    output = again.stdout + again.stderr
    assert "All 3 trials are already in" in output and "already done" in output
    assert "Launching" not in output
    assert json.loads((sweep / "final_evaluation.json").read_text()) == final
    assert not list(sweep.glob("*/wandb"))


@pytest.mark.slow
def test_killed_pruned_milp_sweep_resumes_to_the_uninterrupted_log(milp_cache, tmp_path):
    """milp.train's pruning hook: trials stop after a user, metrics.json says so, and a
    sweep killed inside a trial resumes to the uninterrupted sweep's log and best.yaml."""
    args = [
        *TINY_BO,
        "data.users.max_users=3",
        "logger=none",
        "hydra.sweeper.optim.budget=6",
        "hydra.sweeper.pruning.min_trials=2",
        "hydra.sweeper.final_overrides=[]",
        "hydra.sweeper.wandb.enabled=false",
    ]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_milp([*args, f"hydra.sweep.dir={full}"], milp_cache, timeout=900)
    process = start_milp([*args, f"hydra.sweep.dir={killed}"], milp_cache)
    progress = killed / "3" / "pruning.json"
    deadline = time.time() + 600
    while time.time() < deadline:  # wait for trial 3's first finished user (a file event)
        if progress.is_file() and json.loads(progress.read_text())["users_evaluated"] >= 1:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert len(read_trials(killed)) < 6
    run_milp([*args, f"hydra.sweep.dir={killed}"], milp_cache, timeout=900)

    keys = ("trial", "status", "objective", "params", "pruned", "users_evaluated", "running")
    essence = [[t[k] for k in keys] for t in read_trials(full)]
    assert [[t[k] for k in keys] for t in read_trials(killed)] == essence
    assert yaml.safe_load((killed / "best.yaml").read_text()) == yaml.safe_load(
        (full / "best.yaml").read_text()
    )
    for trial in read_trials(full):
        metrics = json.loads((full / str(trial["trial"]) / "metrics.json").read_text())
        assert metrics["objective"] == trial["objective"]
        assert metrics["users"] == trial["users_evaluated"]
        assert metrics["pruned"] == trial["pruned"]
        assert metrics["users_evaluated"] == trial["users_evaluated"]
