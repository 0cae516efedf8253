"""`make reproduce-smoke`: the whole comparison pipeline on a tiny configuration."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import ROOT
from rouge_score import rouge_scorer, scoring

sys.path.insert(0, str(ROOT / "experiments"))
from reproduce import parse_args  # noqa: E402

# 8 layers, like the default, so the search space's layer windows are valid; pretrained
# enough that some answers share words with the golds (the comparisons are not all 0).
SMOKE_MODEL = [
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_heads=2",
    "model.vocab_size=512",
    "model.pretrain_pairs=1024",
    "model.epochs=2",
    "trainer.max_epochs=1",
    "generation.max_new_tokens=12",
]
TUNED = ["rag", "oppu", "milp", "milp_sparse"]


def records(out):
    return {
        run.parent.parent.name: json.loads(run.read_text())
        for run in out.glob("runs/*/seed0/reproduce.json")
    }


# Five tuning sweeps and seven test runs, each a real milp.train process: minutes on 2
# cores, so it runs with `make test-all`, not in the default suite.
@pytest.mark.slow
def test_reproduce_smoke_tunes_on_dev_then_compares_on_test(milp_cache, tmp_path):
    out = tmp_path / "results"
    env = os.environ | {
        "MILP_CACHE_DIR": str(milp_cache),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "experiments/reproduce.py",
            "--smoke",
            "--out",
            str(out),
            # two values of k: retrieval's space fits the budget of 2 and is tried whole
            "--space",
            "retrieval.k=choice(1,2)",
            "--",
            *SMOKE_MODEL,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (out / "synthetic.md").read_text()
    work = out / "synthetic"  # the source's runs, tuning record and plots
    for text in [
        "zero-shot",
        "retrieval-in-prompt",
        "OPPU",
        "MiLP (searched",
        "MiLP + retrieval",
        "memory, the experiment's config (not searched)",
        "sparse-history",
        "## Tuning (validation users, before any test run)",
        "LaMP agg.",
        "95% CI of Δ",
        "W / T / L",
        "≤5 items",
        "## Verdict (test users)",
        "swapped memory",
        "task fine-tune, step-matched",
        "the plan predates every test run",
    ]:
        assert text in report, text

    # Tuning: the same budget for every tuned method, on dev users only, before the tests.
    tuning = json.loads((work / "tuning.json").read_text())
    assert {m for m, t in tuning.items() if "not_tuned" not in t} == set(TUNED)
    assert len({json.dumps(tuning[m]["budget"], sort_keys=True) for m in TUNED}) == 1
    assert all(tuning[m]["trials"] == 2 and tuning[m]["split"] == "dev" for m in TUNED)
    assert tuning["rag"]["tuner"] == "grid (2 configurations)"
    assert tuning["milp"]["tuner"] == "BO (2 trials)"
    runs = records(work)
    assert len(runs) == 9
    # The controls run MiLP's chosen settings with one change: what the memory is made
    # from. The swapped one and MiLP + retrieval answer with MiLP's stored memories.
    milp_settings = runs["milp"]["settings"]
    shown = os.path.relpath(work, ROOT) if work.is_relative_to(ROOT) else work
    memories = f"memory.trained_in={shown}/runs/milp/seed${{seed}}"
    for control, extra in (
        ("milp_swapped", ["history_of=swapped", memories]),
        ("milp_task_ft", ["history_of=pooled_train"]),
    ):
        assert runs[control]["settings"] == [*milp_settings, *extra, "attribution.enabled=false"]
    rag_k = tuning["rag"]["settings"]
    assert runs["milp_rag"]["settings"] == [
        "+method=milp_rag",
        *milp_settings[1:],
        *rag_k,
        memories,
        "attribution.enabled=false",
    ]
    for method in ("milp_swapped", "milp_rag"):  # nothing trained again
        for user in (work / "runs" / method / "seed0" / "users").glob("*.json"):
            assert json.loads(user.read_text())["train_loss"] is None, method
    plan = json.loads((work / "plan.json").read_text())
    assert plan["runs"]["milp"]["overrides"] == runs["milp"]["settings"]
    test_ids = {u["user_id"] for u in runs["zero_shot"]["per_user"]}
    for method in TUNED:
        sweep = work / "runs" / "tune" / method
        assert not list(sweep.glob("final-trial*"))
        jobs = list(sweep.glob("[0-9]*/metrics.json"))
        assert len(jobs) == 2
        for metrics in jobs:
            assert json.loads(metrics.read_text())["split"] == "dev"
        tuned_ids = {p.stem for p in sweep.glob("[0-9]*/users/*.json")}
        assert tuned_ids and not tuned_ids & test_ids, method
        # The test runs use the chosen settings, and only they touch the test split.
        assert set(tuning[method]["settings"]) <= set(runs[method]["settings"])
        test_overrides = yaml.safe_load(
            (work / "runs" / method / "seed0" / ".hydra" / "overrides.yaml").read_text()
        )
        assert set(tuning[method]["settings"]) <= set(test_overrides)
    assert all(r["split"] == "test" for r in runs.values())
    # Every method answered the same test users (the tuning's user cap must not leak).
    assert len({tuple(sorted(u["user_id"] for u in r["per_user"])) for r in runs.values()}) == 1

    # The paired difference in the table is the mean over users of the runs' own scores.
    memory = {u["user_id"]: u["rougeL"] for u in runs["milp"]["per_user"]}
    zero = {u["user_id"]: u["rougeL"] for u in runs["zero_shot"]["per_user"]}
    delta = np.mean([memory[u] - zero[u] for u in memory])
    row = next(line for line in report.splitlines() if line.startswith("| zero-shot | ROUGE-L"))
    assert f"| {delta:+.4f}" in row
    # LaMP's aggregation equals rouge_score's own on the run's predictions.
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    aggregator = scoring.BootstrapAggregator()
    for user in sorted((work / "runs" / "milp" / "seed0" / "users").glob("*.json")):
        for p in json.loads(user.read_text())["predictions"]:
            aggregator.add_scores(scorer.score(p["gold"], p["prediction"]))
    np.random.seed(0)
    mid = aggregator.aggregate()["rougeL"].mid.fmeasure
    line = next(
        line
        for line in report.splitlines()
        if line.startswith("| MiLP (searched") and "(1 seed)" in line
    )
    assert f"| {mid:.4f} |" in line
    for plot in ["methods.png", "differences.png", "search_convergence.png"]:
        assert (work / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(synthetic/{plot})" in report


def test_methods_subset_is_checked_before_anything_runs(capsys):
    args = parse_args(["--methods", "zero_shot,rag,milp_default", "--reference", "milp_default"])
    assert args.methods == ["zero_shot", "rag", "milp_default"]
    for argv, message in [
        (["--methods", "zero_shot,rgx"], "--methods: unknown"),
        (["--methods", "zero_shot,rag"], "--reference milp: not among --methods"),
        (["--methods", "milp_default", "--reference", "milp_default", "--ablate"], "--ablate"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
