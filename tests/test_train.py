"""End-to-end runs of `python -m milp.train` on a tiny real config (model, data, W&B)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_MODEL_OVERRIDES, milp_env, run_milp, start_milp

from milp.memory.adapters import load_memory
from milp.models.hf import load_base_model

FAST = [
    "+experiment=lamp",
    *TINY_MODEL_OVERRIDES,
    "data.users.max_users=3",
    "trainer.max_epochs=2",
    "memory.rank=2",
    "generation.max_new_tokens=12",
]


def test_end_to_end_run_writes_adapters_predictions_and_metrics(milp_cache, tmp_path):
    out = tmp_path / "run"
    result = run_milp([*FAST, "logger=csv", f"hydra.run.dir={out}"], milp_cache)
    assert "memory injection" in result.stdout and "no memory (same users)" in result.stdout
    # One progress bar (users, and the steps of the user in training), no per-user
    # Lightning banners or expected warnings; stdout holds the table.
    assert "users: 100%" in result.stderr and re.search(r"user-steps (\d+)/\1\]", result.stderr)
    for noise in ("GPU available", "Tip:", "eval mode", "Warning", "warnings.warn", "Epoch 0"):
        assert noise not in result.stderr + result.stdout, noise

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["users"] == 3 and metrics["memory"]["examples"] == 9
    assert metrics["objective"] == metrics["memory"]["rougeL"]
    predictions = [
        json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(predictions) == 9 and {"prediction", "prediction_no_memory", "gold"} <= set(
        predictions[0]
    )
    assert (out / "csv").is_dir()

    # A saved user memory reproduces that user's answers when loaded elsewhere.
    model_dir = next((milp_cache / "models").iterdir())
    base = load_base_model(str(model_dir))
    memory = load_memory(base.model, out / "adapters" / "test-u000")
    first = predictions[0]
    from milp.data.datamodule import PromptFormat
    from milp.data.synthetic import load_synthetic_users

    query = load_synthetic_users(milp_cache / "data", "test")[0].queries[0]
    ids = torch.tensor(
        [PromptFormat(max_target_tokens=48).prompt_ids(base.tokenizer, query.prompt)]
    )
    output = memory.generate(
        input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=base.tokenizer.pad_token_id
    )
    assert (
        base.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True).strip()
        == first["prediction"]
    )

    # Same config, new directory: the same numbers (seeded, deterministic).
    again = tmp_path / "again"
    run_milp([*FAST, "logger=none", f"hydra.run.dir={again}"], milp_cache)
    assert json.loads((again / "metrics.json").read_text())["memory"] == metrics["memory"]

    # memory=none is the zero-shot baseline through the same path: same numbers as the
    # no-memory column of the memory run.
    zero = tmp_path / "zero"
    run_milp([*FAST, "memory=none", "logger=none", f"hydra.run.dir={zero}"], milp_cache)
    zero_metrics = json.loads((zero / "metrics.json").read_text())
    assert zero_metrics["memory"]["rougeL"] == pytest.approx(metrics["no_memory"]["rougeL"])
    assert not (zero / "adapters").exists()


def test_wandb_offline_run(milp_cache, tmp_path):
    out = tmp_path / "run"
    run_milp([*FAST, "data.users.max_users=1", "logger=wandb", f"hydra.run.dir={out}"], milp_cache)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("memory.rank=0", "memory.rank must be an integer >= 1, got 0"),
        ("memory.layers=[0,9]", "memory.layers: layer index 9 is out of range"),
        ("memory.target_modules=[nope]", "memory.target_modules: 'nope'"),
        ("objective=accuracy", "objective: 'accuracy' is not one of"),
    ],
)
def test_bad_config_fails_before_training_with_one_line(milp_cache, tmp_path, override, message):
    result = run_milp(
        [*FAST, override, "logger=none", f"hydra.run.dir={tmp_path}"], milp_cache, check=False
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("milp: error:") and message in last
    assert not (tmp_path / "users").exists()


def test_bad_data_path_is_named(milp_cache, tmp_path):
    result = run_milp(
        [
            *FAST,
            "data=lamp4",
            f"data.path={tmp_path}/nowhere",
            "logger=none",
            f"hydra.run.dir={tmp_path}/run",
        ],
        milp_cache,
        check=False,
    )
    assert result.returncode == 2
    assert "nowhere/test_questions.json: file not found" in result.stderr


def test_real_lamp_files_run_through_the_same_path(milp_cache, tmp_path):
    data = tmp_path / "lamp4"
    data.mkdir()
    questions = [
        {
            "id": f"q{i}",
            "input": f"Generate a headline for the following article: story {i} .",
            "profile": [
                {"id": f"p{i}{j}", "text": f"article {j} about town", "title": f"town news {j}"}
                for j in range(3)
            ],
        }
        for i in range(2)
    ]
    (data / "dev_questions.json").write_text(json.dumps(questions))
    (data / "dev_outputs.json").write_text(
        json.dumps(
            {
                "task": "LaMP_4",
                # q0's gold is one of its own history titles (case and spaces aside).
                "golds": [{"id": "q0", "output": "Town  News 1"}, {"id": "q1", "output": "x"}],
            }
        )
    )
    out = tmp_path / "run"
    run_milp(
        [
            *FAST,
            "data=lamp4",
            f"data.path={data}",
            "split=dev",
            "data.allow_gold_in_history=true",
            "logger=none",
            f"hydra.run.dir={out}",
        ],
        milp_cache,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["users"] == 2 and metrics["data"] == "lamp4"
    assert metrics["gold_in_history"] == {
        "count": 1,
        "examples": ["user 'q0' query 'q0' gold 'Town  News 1'"],
    }
    assert (out / "adapters" / "q1" / "memory_0" / "adapter_config.json").is_file()


def test_interrupted_run_keeps_finished_users_and_resumes(milp_cache, tmp_path):
    out = tmp_path / "run"
    args = [*FAST, "logger=none", f"hydra.run.dir={out}"]  # three users
    holding = tmp_path / "holding"
    # The second user's training waits (tests/interrupt_gate.py) once the first user's
    # result exists, so Ctrl-C lands mid-run on every machine; callbacks are left out of
    # the run's fingerprint, so the resumed run below may drop the gate.
    gate = [
        "+callbacks.gate._target_=interrupt_gate.HoldOnceFileExists",
        f"+callbacks.gate.after={out}/users/test-u000.json",
        f"+callbacks.gate.holding={holding}",
    ]
    log = tmp_path / "interrupted.log"
    process = start_milp([*args, *gate], milp_cache, log=log)
    try:
        hang_guard = time.monotonic() + 900  # not a timing condition: only stops a hung run
        while not holding.exists() and process.poll() is None and time.monotonic() < hang_guard:
            time.sleep(0.05)
        assert holding.exists(), f"the run ended before the second user:\n{log.read_text()}"
        process.send_signal(signal.SIGINT)  # Ctrl-C while the second user is in progress
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0, log.read_text()
    assert sorted(p.name for p in (out / "users").glob("*.json")) == ["test-u000.json"]
    assert not (out / "adapters" / "test-u001").exists()
    assert json.loads((out / "metrics.json").read_text())["users"] == 1
    stamp = (out / "users" / "test-u000.json").stat().st_mtime_ns
    assert load_memory(
        load_base_model(str(next((milp_cache / "models").iterdir()))).model,
        out / "adapters" / "test-u000",
    )

    run_milp(args, milp_cache)  # same directory: finishes the rest only
    assert (out / "users" / "test-u000.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "metrics.json").read_text())["users"] == 3

    # A different configuration must not silently mix into these results.
    clash = run_milp([*args, "memory.rank=4"], milp_cache, check=False)
    assert clash.returncode == 2 and "different configuration" in clash.stderr


def test_run_files_follow_the_umask(milp_cache, tmp_path):
    """Results are shared as any new file is: the umask decides, not the temporary files
    (0600) and folders (0700) they are built in."""
    out = tmp_path / "run"
    args = [*FAST, "data.users.max_users=1", "trainer.max_epochs=1", "logger=none"]
    run_milp([*args, f"hydra.run.dir={out}"], milp_cache, preexec_fn=lambda: os.umask(0o002))
    paths = [p for p in out.rglob("*")]
    assert any(p.name == "adapter_model.safetensors" for p in paths)
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in paths}
    assert modes == {name: 0o775 if (out / name).is_dir() else 0o664 for name in modes}, modes


def test_pretrain_command_builds_or_finds_the_tiny_model(milp_cache, tmp_path):
    """`make pretrain` runs `python -m milp.models.tiny` as the README documents it."""
    result = subprocess.run(
        [sys.executable, "-m", "milp.models.tiny", *TINY_MODEL_OVERRIDES, "hydra.run.dir=."],
        cwd=tmp_path,  # as from any directory; Hydra writes its files here
        env=milp_env(milp_cache) | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    model_dir = Path(result.stdout.strip().splitlines()[-1])
    assert (model_dir / "pretrain.json").is_file() and model_dir.parent == milp_cache / "models"
