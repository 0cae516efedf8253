"""`python -m milp.generate`: many users' queries answered in mixed-adapter batches from a
saved adapter store, as the run itself answered them; real processes, real peft."""

import json
import subprocess
import sys

from conftest import ROOT, TINY_MODEL_OVERRIDES, milp_env, run_milp

from milp.data.synthetic import load_synthetic_users


def run_generate(args, cache):
    result = subprocess.run(
        [sys.executable, "-m", "milp.generate", *args],
        cwd=ROOT,
        env=milp_env(cache),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_generate_answers_from_a_saved_store_like_the_run(milp_cache, tmp_path):
    store = tmp_path / "run"
    run_milp(
        [
            "+experiment=lamp",
            *TINY_MODEL_OVERRIDES,
            "data.users.max_users=3",
            "trainer.max_epochs=1",
            "generation.max_new_tokens=8",
            "callbacks=none",
            "logger=none",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={store}",
        ],
        milp_cache,
    )
    predictions = [
        json.loads(line) for line in (store / "predictions.jsonl").read_text().splitlines()
    ]
    # A user of the run (its memory) and a stranger (no memory: the base model's answer).
    first = predictions[0]
    user = load_synthetic_users(milp_cache / "data", "test")[0]
    assert (user.user_id, user.queries[0].id) == (first["user_id"], first["id"])
    prompt = user.queries[0].prompt
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        json.dumps({"user_id": first["user_id"], "id": "again", "prompt": prompt})
        + "\n"
        + json.dumps({"user_id": "stranger", "prompt": prompt})
        + "\n"
    )

    out = tmp_path / "serve"
    result = run_generate(
        [
            f"store={store}",
            "users_per_batch=2",  # 3 users: two groups of adapters
            "batch_size=4",
            "compare_one_at_a_time=true",
            f"hydra.run.dir={out}",
        ],
        milp_cache,
    )
    assert "identical answers: 9/9" in result.stdout
    assert "mixed/one-at-a-time queries-per-second:" in result.stdout
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [(a["id"], a["prediction"]) for a in answers] == [
        (p["id"], p["prediction"]) for p in predictions
    ]  # the memories answer as they did when the run trained them
    assert all(a["memory"] for a in answers)
    report = json.loads((out / "throughput.json").read_text())
    assert report["queries"] == 9 and report["users_with_memory"] == 3
    assert report["mixed"]["seconds"] > 0 and report["one_at_a_time"]["seconds"] > 0

    own = tmp_path / "own"
    # milp's own stacked memories as the engine: same answers, a memory-less row included.
    run_generate(
        [f"store={store}", f"queries={queries}", "engine=routed", f"hydra.run.dir={own}"],
        milp_cache,
    )
    mine, stranger = [json.loads(line) for line in (own / "answers.jsonl").read_text().splitlines()]
    assert mine["memory"] and not stranger["memory"]
    assert mine["prediction"] == first["prediction"]
    assert stranger["prediction"] == first["prediction_no_memory"]
