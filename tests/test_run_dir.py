"""The run directory through `python -m milp.train`: one directory per user, whatever the
ids; one writer at a time; a resume reuses only what still matches its inputs."""

import json
from pathlib import Path

from conftest import TINY_MODEL_OVERRIDES, run_milp
from test_data import COLLIDING_IDS

from milp.data.users import user_slug

SMALL = [
    *TINY_MODEL_OVERRIDES,
    "data=history",
    "trainer.max_epochs=1",
    "memory.rank=2",
    "generation.max_new_tokens=4",
    "compare_without_memory=false",
    "logger=none",
    "callbacks=none",
    "trainer.enable_progress_bar=false",
]


def write_users(path: Path, ids: list[str]) -> Path:
    """One JSONL user per id, each with its own history and one scored query."""
    lines = [
        {
            "user_id": user_id,
            "history": [{"prompt": f"What did you do on day {i}?", "response": f"Went out {i}."}],
            "queries": [{"id": f"q{i}", "prompt": f"And on day {i + 1}?", "response": "Home."}],
        }
        for i, user_id in enumerate(ids)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_ids_that_collided_get_a_directory_each_and_resume_keeps_them_all(milp_cache, tmp_path):
    data = write_users(tmp_path / "users.jsonl", COLLIDING_IDS)
    out = tmp_path / "run"
    args = [*SMALL, f"data.path={data}", f"hydra.run.dir={out}"]
    run_milp(args, milp_cache)
    run_milp(args, milp_cache)  # a resume: every user is done, nothing may be lost

    slugs = {user_slug(i) for i in COLLIDING_IDS}
    assert {p.name for p in (out / "adapters").iterdir()} == slugs
    assert {p.stem for p in (out / "users").glob("*.json")} == slugs
    assert len({s.casefold() for s in slugs}) == len(COLLIDING_IDS)
    for user_id in COLLIDING_IDS:
        memory = json.loads((out / "adapters" / user_slug(user_id) / "memory.json").read_text())
        assert memory["user_id"] == user_id
    predictions = [
        json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()
    ]
    assert sorted(p["id"] for p in predictions) == sorted(f"q{i}" for i in range(6))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["users"] == 6 and len(metrics["per_user"]) == 6
