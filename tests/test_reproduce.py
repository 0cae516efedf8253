"""`make reproduce-smoke`: the whole comparison pipeline on a tiny configuration."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

# 8 layers, like the default, so the search space's layer windows are valid.
SMOKE_MODEL = [
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_heads=2",
    "model.vocab_size=512",
    "model.pretrain_pairs=256",
    "model.epochs=1",
    "trainer.max_epochs=1",
    "generation.max_new_tokens=8",
]


# About ten real milp.train processes (search, four ablations, five methods): several
# minutes on 2 cores, so it runs with `make test-all`, not in the default suite.
@pytest.mark.slow
def test_reproduce_smoke_writes_tables_and_plots(milp_cache, tmp_path):
    out = tmp_path / "results"
    env = os.environ | {
        "MILP_CACHE_DIR": str(milp_cache),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "experiments/reproduce.py", "--smoke", "--out", str(out), *SMOKE_MODEL],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (out / "synthetic.md").read_text()
    for method in [
        "zero-shot",
        "retrieval-in-prompt",
        "OPPU",
        "MiLP (searched",
        "MiLP + retrieval",
        "default config (unsearched)",
        "sparse-history",
    ]:
        assert method in report
    assert "≤5 items" in report and "The paper's claims" in report
    # Every method answered the same test users (the search's own user cap must not leak).
    answered = {
        run.parent.parent.name: sorted(
            u["history_size"] for u in json.loads(run.read_text())["per_user"]
        )
        for run in out.glob("runs/*/seed0/reproduce.json")
    }
    assert len(answered) == 7, answered
    assert len({tuple(sizes) for sizes in answered.values()}) == 1, answered
    for plot in ["methods.png", "search_convergence.png"]:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
