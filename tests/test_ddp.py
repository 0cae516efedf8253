"""Scale-out with existing engines: users sharded over processes (torchrun, gloo) give
the same adapters as one process; search trials run in parallel via Hydra's joblib
launcher. Real processes throughout."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_MODEL_OVERRIDES, run_milp
from safetensors.torch import load_file

FAST = [
    "+experiment=lamp",
    *TINY_MODEL_OVERRIDES,
    "data.users.max_users=4",
    "trainer.max_epochs=1",
    "memory.rank=2",
    "generation.max_new_tokens=6",
    "callbacks=none",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
]
# One thread per process in both runs, so that every user's arithmetic is the same.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def adapters(run):
    return {
        f"{f.parent.parent.name}/{f.parent.name}/{k}": v
        for f in sorted((run / "adapters").rglob("adapter_model.safetensors"))
        for k, v in load_file(f).items()
    }


def milp_train(args, cache, launcher=()):
    """`python -m milp.train` (optionally under a launcher), one thread per process."""
    env = (
        os.environ
        | ENV
        | {
            "MILP_CACHE_DIR": str(cache),
            "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "offline",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    command = [sys.executable, *launcher, "-m", "milp.train", *args]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a hang takes the launcher's workers down with it
    )
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_users_sharded_over_two_processes_match_one_process(milp_cache, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    single_run = milp_train([*FAST, f"hydra.run.dir={one}"], milp_cache)
    assert single_run.returncode == 0, single_run.stderr[-4000:]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = milp_train([*FAST, f"hydra.run.dir={two}"], milp_cache, launcher=torchrun)
    assert result.returncode == 0, result.stderr[-4000:]
    log = result.stdout + result.stderr
    assert "shard: rank 0 of 2 takes 2 of 4 users" in log
    assert "shard: rank 1 of 2 takes 2 of 4 users" in log

    single, sharded = adapters(one), adapters(two)
    assert single.keys() == sharded.keys() and len(single) == 4 * 2 * 4 * 3 * 2
    for key, value in single.items():
        assert torch.equal(sharded[key], value), key
    # Rank 0 gathered every user's results into the run's outputs.
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["users"] == 4
    assert metrics["memory"] == json.loads((one / "metrics.json").read_text())["memory"]
    assert len((two / "predictions.jsonl").read_text().splitlines()) == 12


@pytest.mark.slow
def test_search_trials_in_parallel_with_the_joblib_launcher(milp_cache, tmp_path):
    result = run_milp(
        [
            "-m",
            *FAST,
            "data.users.max_users=1",
            "memory.rank=2,4",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={tmp_path}",
        ],
        milp_cache,
    )
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    metrics = sorted(tmp_path.glob("*/metrics.json"))
    assert len(metrics) == 2
    assert all(json.loads(m.read_text())["users"] == 1 for m in metrics)
