"""The run directory through `python -m milp.train`: one directory per user, whatever the
ids; one writer at a time; a resume reuses only what still matches its inputs, and a
different configuration or base model is refused (changed data and corrupt memories:
tests/test_bad_input.py; kills at every write step: tests/test_faults.py)."""

import ast
import json
import re
import shutil
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import TINY_MODEL_OVERRIDES, run_milp, start_milp
from test_data import COLLIDING_IDS

from milp.data.users import HistoryPair, Query, User, user_hash, user_slug
from milp.errors import MilpError
from milp.models.tiny import TinyModelSpec, ensure_tiny_model
from milp.run.store import metrics_file, read_run_file, user_results

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
    # The store's readers, which experiments/ uses, see the same files.
    assert read_run_file(metrics_file(out)) == metrics
    assert sorted(r["user_id"] for r in user_results(out)) == sorted(COLLIDING_IDS)


def test_a_missing_or_broken_run_file_is_a_one_line_error_naming_it(tmp_path):
    with pytest.raises(MilpError, match=re.escape(f"{tmp_path / 'metrics.json'}: missing")):
        read_run_file(metrics_file(tmp_path))
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / "alice.json").write_text("[1, 2]")
    with pytest.raises(MilpError, match=r"alice\.json: not a JSON object"):
        user_results(tmp_path)
    (tmp_path / "users" / "alice.json").write_text('{"user_id": "ali')  # cut short
    with pytest.raises(MilpError, match=r"alice\.json: not valid JSON"):
        user_results(tmp_path)


RUN_FILES = {"metrics.json", "predictions.jsonl", "attribution.json", "attribution.png"}
RUN_FILES |= {"fingerprint.txt"}
# Its folders' names are also JSON keys elsewhere: caught where a path is joined with one.
RUN_FOLDERS = {"users", "adapters", "task_memory"}


def run_layout_spelled(node: ast.AST) -> str | None:
    """The run-directory name a source node spells, if any: a file's name as a string (or
    a string's last path part), a folder as `... / "users"` or a string `"users/..."`."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        parts = node.value.split("/")
        in_folder = len(parts) > 1 and parts[0] in RUN_FOLDERS and any(c in parts[-1] for c in ".*")
        if parts[-1] in RUN_FILES or in_folder:  # ("users/min" is a unit, not a path)
            return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        right = node.right
        if isinstance(right, ast.Constant) and right.value in RUN_FOLDERS:
            return f'/ "{right.value}"'
    return None


def test_only_the_store_names_a_run_directorys_files():
    """milp/run/store.py owns the run directory's layout: no other module of milp/ or
    experiments/ spells one of its file or folder names."""
    root = Path(__file__).resolve().parents[1]
    offenders = []
    for path in sorted([*root.glob("milp/**/*.py"), *root.glob("experiments/**/*.py")]):
        if path == root / "milp" / "run" / "store.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            spelled = run_layout_spelled(node)
            if spelled is not None:
                offenders.append(f"{path.relative_to(root)}:{node.lineno}: {spelled}")
    assert not offenders, "\n".join(offenders)


def test_the_layout_check_sees_each_way_of_spelling_a_run_name():
    spelled = [
        'run / "metrics.json"',
        'directory.glob("users/*.json")',
        'run_dir / "users" / name',
        'Path(run) / "adapters"',
        'open("out/predictions.jsonl")',
        'Path("adapters/alice/memory.json")',
    ]
    for source in spelled:
        assert any(run_layout_spelled(n) for n in ast.walk(ast.parse(source))), source
    for source in ('stored["adapters"]', '{"users": 3}', 'get("task_memory")', 'f"users/min"'):
        assert not any(run_layout_spelled(n) for n in ast.walk(ast.parse(source))), source


def test_one_writer_per_run_dir_and_a_killed_writer_blocks_nothing(milp_cache, tmp_path):
    data = write_users(tmp_path / "users.jsonl", ["u0", "u1", "u2"])
    out = tmp_path / "run"
    args = [*SMALL, f"data.path={data}", f"hydra.run.dir={out}"]
    holding = tmp_path / "holding"
    # The first run waits inside the second user's training (tests/interrupt_gate.py)
    # once the first user's result exists: it holds the run directory at a known point.
    gate = [
        "+callbacks.gate._target_=interrupt_gate.HoldOnceFileExists",
        f"+callbacks.gate.after={out}/users/u0.json",
        f"+callbacks.gate.holding={holding}",
    ]
    first = start_milp([*args, *gate], milp_cache, log=tmp_path / "first.log")
    try:
        wait_for(holding, first, tmp_path / "first.log")
        second = run_milp(args, milp_cache, check=False)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert lines[-1] == (
            f"milp: error: {out}: another milp run (pid {first.pid}) is writing to this run "
            "directory; wait for it to end or use another hydra.run.dir"
        )
    finally:
        first.kill()  # SIGKILL: no handler runs, the lock file stays behind
        first.wait()
    assert (out / "run.lock").read_text().strip() == str(first.pid)
    stamp = (out / "users" / "u0.json").stat().st_mtime_ns
    run_milp(args, milp_cache)  # the dead holder's lock blocks nothing
    assert (out / "users" / "u0.json").stat().st_mtime_ns == stamp  # the finished user kept
    assert json.loads((out / "metrics.json").read_text())["users"] == 3


def wait_for(path: Path, process, log: Path) -> None:
    """Until `path` exists; fails at once if `process` ends first."""
    hang_guard = time.monotonic() + 900  # not a timing condition: only stops a hung run
    while not path.exists() and process.poll() is None and time.monotonic() < hang_guard:
        time.sleep(0.05)
    assert path.exists(), f"the run ended before reaching the point:\n{log.read_text()}"


def test_the_same_path_holding_another_base_model_is_refused(milp_cache, tmp_path):
    """The fingerprint identifies the base model by its files' content, not its name: the
    model directory edited in place refuses the run directory, as another config does."""
    spec = {k.split(".")[1]: int(v) for k, v in (o.split("=") for o in TINY_MODEL_OVERRIDES)}
    model = tmp_path / "model"
    shutil.copytree(ensure_tiny_model(milp_cache, TinyModelSpec(**spec)), model)
    data = write_users(tmp_path / "users.jsonl", ["u0", "u1"])
    out = tmp_path / "run"
    args = [
        *SMALL[len(TINY_MODEL_OVERRIDES) :],
        "model=hf",
        f"model.name_or_path={model}",
        f"data.path={data}",
        f"hydra.run.dir={out}",
    ]
    run_milp(args, milp_cache)
    parts = dict(line.split(" ") for line in (out / "fingerprint.txt").read_text().splitlines())
    assert list(parts) == ["config", "model", "data"]

    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-5}))
    refused = run_milp(args, milp_cache, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.splitlines()[-1] == (
        f"milp: error: {out}: holds results of a different base model; use a new output "
        "directory (hydra.run.dir=...) or delete this one"
    )


def test_a_users_hash_covers_everything_it_is_trained_and_scored_on():
    user = User("u", [HistoryPair("p", "t")], [Query("q", "x", "gold")], ["text"])
    digest = user_hash(user)
    assert user_hash(User("u", [HistoryPair("p", "t")], [Query("q", "x", "gold")], ["text"])) == (
        digest
    )
    changed = [
        replace(user, history=[HistoryPair("p", "t2")]),
        replace(user, queries=[Query("q", "x", "gold2")]),
        replace(user, queries=[Query("q", "x", "gold", (HistoryPair("a", "b"),))]),
        replace(user, profile_texts=[]),
        replace(user, history_owner="v"),  # a control run's history: never an own run's
    ]
    assert len({user_hash(u) for u in changed} | {digest}) == len(changed) + 1
