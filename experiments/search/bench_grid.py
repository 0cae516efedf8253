"""The benchmark grid of ``bench_search.py``: real milp runs of every configuration of
``SPACE`` on a few dev users, cached with their per-user metrics.

Contract: ``load_or_build_grid(cache, settings, rebuild)`` returns the cached grid if its
settings hash matches, else runs (or resumes) one Hydra multirun of every configuration in
``multirun/bench_search/grid-<hash>`` and writes the cache (``bench_grid.json``: the
space, the settings, the build's wall time, and per configuration its objective, job
seconds and every user's memory metrics).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from milp.run.store import metrics_file, read_run_file, user_results

ROOT = Path(__file__).resolve().parents[2]

#: The enumerated space: override key -> values (Hydra's grid order: last key fastest).
#: 4 x 3 x 2 x 2 x 2 x 2 = 192 configurations (176 distinct placements: a window is
#: clipped at the top layer, so e.g. start 6 with length 2 or 4 is the same block 6..7).
SPACE: dict[str, list[Any]] = {
    "memory.window_start": [0, 2, 4, 6],
    "memory.window_length": [1, 2, 4],
    "memory.rank": [2, 8],
    "memory.num_loras": [1, 2],
    "memory.target_modules": ["ffn", "attention"],
    "optim.lr": [0.003, 0.03],
}
#: Every grid job: 6 dev users with short histories, 4 epochs, batched injection (all 6
#: users per forward/backward pass), short answers, no extras.
SETTINGS = [
    "+experiment=lamp",
    "split=dev",
    "data.users.max_users=6",
    "data.users.max_history=12",
    "trainer.max_epochs=4",
    "injection=batched",
    "generation.max_new_tokens=16",
    "compare_without_memory=false",
    "logger=none",
    "callbacks=none",
    "trainer.enable_progress_bar=false",
]
Config = tuple[Any, ...]


def grid_configs() -> list[Config]:
    """All configurations in Hydra's basic-sweeper order (the last key varies fastest)."""
    return list(itertools.product(*SPACE.values()))


def settings_hash(settings: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([list(settings), SPACE]).encode()).hexdigest()[:8]


def run_grid(settings: Sequence[str], sweep_dir: Path) -> None:
    """The whole grid as one Hydra multirun (jobs share one process)."""
    sweeps = [f"{key}={','.join(str(v) for v in values)}" for key, values in SPACE.items()]
    command = [sys.executable, "-m", "milp.train", "-m", *settings, *sweeps]
    command.append(f"hydra.sweep.dir={sweep_dir}")
    print("bench: $", " ".join(command[1:]), flush=True)
    # One thread: the tiny model gains little from more, and on shared cores
    # oversubscribed OpenMP threads make every job several times slower.
    env = os.environ | {
        "WANDB_SILENT": "true",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1"),
    }
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)


def read_job(job: Path) -> tuple[Config, dict[str, Any]]:
    """One grid job's configuration and results (objective, per-user memory metrics)."""
    overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    given = dict(o.split("=", 1) for o in overrides)
    config = tuple(type(values[0])(given[key]) for key, values in SPACE.items())
    metrics = read_run_file(metrics_file(job))
    users = {result["user_id"]: result["memory"] for result in user_results(job)}
    return config, {
        "objective": metrics["objective"],
        "seconds": metrics["seconds"],
        "users": users,
    }


def read_grid(sweep_dir: Path) -> tuple[dict[Config, dict[str, Any]], float]:
    """Results of every finished grid job, and the wall time the jobs' files span."""
    table: dict[Config, dict[str, Any]] = {}
    stamps: list[float] = []
    for job in sweep_dir.iterdir() if sweep_dir.is_dir() else []:
        if job.name.isdigit() and metrics_file(job).is_file():
            config, result = read_job(job)
            table[config] = result
            stamps += [(job / ".hydra").stat().st_mtime, metrics_file(job).stat().st_mtime]
    return table, (max(stamps) - min(stamps) if stamps else 0.0)


def load_or_build_grid(cache: Path, settings: Sequence[str], rebuild: bool) -> dict[str, Any]:
    """The grid from the cache, or from real runs (resumed if a sweep dir exists)."""
    key = settings_hash(settings)
    if cache.is_file() and not rebuild:
        cached = json.loads(cache.read_text())
        if cached.get("hash") == key and len(cached["configs"]) == len(grid_configs()):
            print(f"bench: grid from {cache.relative_to(ROOT)} (cached)", flush=True)
            return cached
    sweep_dir = ROOT / "multirun" / "bench_search" / f"grid-{key}"
    table, _ = read_grid(sweep_dir)
    if rebuild or any(c not in table for c in grid_configs()):
        run_grid(settings, sweep_dir)
        table, _ = read_grid(sweep_dir)
    table, wall = read_grid(sweep_dir)
    missing = [c for c in grid_configs() if c not in table]
    if missing:
        raise SystemExit(f"bench: {len(missing)} grid jobs have no metrics, e.g. {missing[0]}")
    built = {
        "hash": key,
        "space": SPACE,
        "settings": list(settings),
        "sweep_dir": str(sweep_dir.relative_to(ROOT)),
        "wall_seconds": round(wall, 1),
        "configs": [dict(zip(SPACE, c, strict=True), **table[c]) for c in grid_configs()],
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(built, indent=None, separators=(",", ":")) + "\n")
    return built
