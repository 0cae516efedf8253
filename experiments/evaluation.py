"""The test stage of `make reproduce`: every method on the same test users, per seed, with
the settings tuning chose, exactly as the frozen plan (experiments/plan.py) holds them.

A method's test run is `python -m milp.train +experiment=... +method=<config>` plus its
tuned settings. The two controls of MiLP's memory run MiLP's chosen settings with one
change, what the memory is made from (`history_of`, milp/data/controls.py): another test
user's history (`milp_swapped`) or the train split's pooled items for the same steps
(`milp_task_ft`). `milp_swapped` and MiLP + retrieval (`milp_rag`) answer with the very
memories MiLP's run of the same seed trained (`memory.trained_in`): each user with
another test user's memory, or with their own and retrieval's chosen k in the prompt, so
each differs from MiLP's run in that one thing and nothing trains twice. Methods without
training (zero-shot, retrieval) are deterministic and run with the first seed only; every
other method runs every seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from jobs import ROOT, run, train_command
from plan import check_run

from milp.evaluation.metrics import rouge_1, rouge_l
from milp.run.files import atomic_write_text
from milp.run.store import metrics_file, read_run_file, user_results


@dataclass(frozen=True)
class RunSpec:
    """How a method's test run differs from `+method=<its name>` with its own tuning."""

    config: str  # the +method config
    tuned_by: tuple[str, ...]  # the tunings whose chosen settings it takes
    extra: tuple[str, ...] = ()  # its own overrides
    memories_of: str | None = None  # the method whose stored memories answer (same seed)


RUNS = {
    "milp_default": RunSpec("milp", ()),
    "milp_swapped": RunSpec("milp", ("milp",), ("history_of=swapped",), memories_of="milp"),
    "milp_task_ft": RunSpec("milp", ("milp",), ("history_of=pooled_train",)),
    "milp_rag": RunSpec("milp_rag", ("milp", "rag"), memories_of="milp"),
}
#: Methods whose answers do not depend on the seed (no training, greedy decoding).
UNTRAINED = ("zero_shot", "rag")
#: Test runs that score every user's memory on every user's queries (milp.evaluation.attribution).
ATTRIBUTED = ("milp", "milp_default")


def spec_of(method: str) -> RunSpec:
    return RUNS.get(method, RunSpec(method, (method,)))


def method_config(method: str) -> str:
    return spec_of(method).config


def seeds_for(method: str, seeds: list[int]) -> list[int]:
    return seeds[:1] if method in UNTRAINED else list(seeds)


def run_dir(out: Path, method: str, seed: int | str) -> Path:
    return out / "runs" / method / f"seed{seed}"


def test_order(methods: list[str]) -> list[str]:
    """The methods in the order their test runs go: a run answering with another method's
    memories after that method's."""
    sources = [m for m in methods if spec_of(m).memories_of is None]
    for method in methods:
        source = spec_of(method).memories_of
        if source is not None and source not in methods:
            raise SystemExit(f"reproduce: {method} answers with {source}'s memories: add {source}")
    return sources + [m for m in methods if m not in sources]


def run_overrides(method: str, tuning: dict[str, dict], common: list[str], out: Path) -> list[str]:
    """A test run's overrides except its seed and run dir: the method's config, the common
    overrides, its tuned settings (or those of the methods it combines or controls), its
    own extras; `${seed}` in them is the run's seed."""
    spec = spec_of(method)
    chosen = [s for name in spec.tuned_by for s in tuning.get(name, {}).get("settings", [])]
    attribution = [] if method in ATTRIBUTED else ["attribution.enabled=false"]
    memories = []
    if spec.memories_of is not None:
        source = run_dir(out, spec.memories_of, "${seed}")
        shown = os.path.relpath(source, ROOT) if source.is_relative_to(ROOT) else str(source)
        memories = [f"memory.trained_in={shown}"]
    return [
        f"+method={spec.config}",
        "split=test",
        "compare_without_memory=false",
        "logger=none",
        "callbacks=none",
        *common,
        *chosen,
        *spec.extra,
        *memories,
        *attribution,
    ]


def user_record(user: dict) -> dict:
    """A test user's id, history size, metrics and per-example ROUGE (for LaMP's
    bootstrap aggregation), from the run's users/<user>.json."""
    examples = [
        {"rouge1": rouge_1(p["prediction"], gold), "rougeL": rouge_l(p["prediction"], gold)}
        for p in user["predictions"]
        if (gold := p.get("gold")) is not None
    ]
    return {
        "user_id": user["user_id"],
        "history_size": user["history_size"],
        **(user["memory"] or {}),
        "example_scores": examples,
    }


def evaluate_methods(
    out: Path,
    experiment: str,
    seeds: list[int],
    tuning: dict[str, dict],
    common: list[str],
    methods: list[str],
) -> dict[str, list[dict]]:
    """Run every method for its seeds on the test users, as the plan in `out` holds them;
    finished runs (their reproduce.json) are read back, not run again."""
    results: dict[str, list[dict]] = {}
    for method in test_order(methods):
        overrides = run_overrides(method, tuning, common, out)
        for seed in seeds_for(method, seeds):
            directory = run_dir(out, method, seed)
            record = directory / "reproduce.json"
            if record.is_file():
                stored = json.loads(record.read_text())["settings"]
                if stored != overrides:
                    raise SystemExit(
                        f"reproduce: {record} ran with {stored}, the plan holds {overrides}"
                    )
            else:
                check_run(out, method, seed, overrides)
                seconds = run(
                    train_command(
                        experiment, *overrides, f"seed={seed}", f"hydra.run.dir={directory}"
                    ),
                    out / "logs" / f"{method}-seed{seed}.log",
                )
                metrics = read_run_file(metrics_file(directory))
                users = user_results(directory)
                atomic_write_text(
                    record,
                    json.dumps(
                        {
                            "seed": seed,
                            "split": metrics["split"],
                            "settings": overrides,
                            "wall_seconds": seconds,
                            "metrics": metrics["memory"],
                            "trainable_parameters": max(
                                (u["trainable_parameters"] for u in users), default=0
                            ),
                            "per_user": [user_record(u) for u in users],
                        }
                    ),
                )
            results.setdefault(method, []).append(json.loads(record.read_text()))
    return {m: results[m] for m in methods if m in results}


def test_users(experiment: str, common: list[str]) -> tuple[list[str], str]:
    """The ids of the users the test runs will answer (the test split as configured) and
    the sha256 of their records as loaded (histories, queries, golds, profile texts)."""
    from dataclasses import asdict

    from hydra import compose, initialize_config_dir

    from milp.run.build import build

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"+experiment={experiment}", *common, "split=test"])
    users = build(cfg.data.users)
    blob = json.dumps([asdict(u) for u in users], sort_keys=True, ensure_ascii=False)
    return [u.user_id for u in users], hashlib.sha256(blob.encode()).hexdigest()
