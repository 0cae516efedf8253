"""Fault injection: a run killed (SIGKILL) at a step of its writes, then resumed, ends with
exactly the results of a run never killed, and at every moment each user whose result
record exists has a memory whose files hash as the record says.

`milp/run/files.py` `fault_point` marks every step of the run directory's writes (each atomic
file write before its rename, a memory between its modules' saves, a memory directory
before and between the renames that publish it); `MILP_TEST_KILL_AT=N:prefix` makes the
process kill itself at the Nth point whose name starts with `prefix`, so a kill lands at
the same step on every machine: no timing, no sleeps.
"""

import hashlib
import json
import random
import re
from pathlib import Path

import pytest
from conftest import run_milp
from test_run_dir import SMALL, write_users

from milp.models.hf import HASH_CACHE
from milp.run.files import KILL_AT, POINT_LOG, TEMP_PREFIXES

USERS = ["u0", "u1", "u2"]
TIMINGS = {"seconds", "train_seconds"}  # the only fields two equal runs may differ in


def args_for(data: Path, out: Path) -> list[str]:
    return [*SMALL, f"data.path={data}", f"hydra.run.dir={out}"]


@pytest.fixture(scope="module")
def reference(milp_cache, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A run never killed: its data file, its run directory, and the names of the write
    steps it went through, in order (those in the run directory)."""
    tmp = tmp_path_factory.mktemp("faults")
    data = write_users(tmp / "users.jsonl", USERS)
    log = tmp / "points.log"
    run_milp(args_for(data, tmp / "reference"), milp_cache, env={POINT_LOG: str(log)})
    # Only the run directory's steps: the cache's (the tiny model, data, file hashes) are
    # written once per cache, so a later run may never reach them.
    points = [
        p
        for p in log.read_text().splitlines()
        if not p.startswith("publish ") and HASH_CACHE not in p
    ]
    return data, tmp / "reference", points


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_finished_users(out: Path) -> None:
    """Every user with a result record has its memory: exactly the files the record
    lists, each with the recorded SHA-256."""
    for record_path in (out / "users").glob("*.json"):
        record = json.loads(record_path.read_text())
        directory = out / "adapters" / record_path.stem
        files = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}
        assert files == set(record["memory_sha256"]), record_path
        for name, digest in record["memory_sha256"].items():
            assert sha256(directory / name) == digest, directory / name


def outcome(out: Path) -> dict:
    """What a run produced, timings left out: metrics, predictions, every user's record
    (memory hashes included)."""
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("seconds")
    for per_user in metrics["per_user"].values():
        per_user.pop("seconds")
    records = {
        p.name: {k: v for k, v in json.loads(p.read_text()).items() if k not in TIMINGS}
        for p in (out / "users").glob("*.json")
    }
    return {
        "metrics": metrics,
        "predictions": (out / "predictions.jsonl").read_text(),
        "records": records,
    }


def kill_and_resume(kills: list[str], reference, milp_cache, out: Path) -> None:
    """Run, killed at each of `kills` in turn (one run each), then resume to the end;
    check the run directory after every kill and at the end."""
    data, reference_dir, _ = reference
    for spec in kills:
        killed = run_milp(args_for(data, out), milp_cache, check=False, env={KILL_AT: spec})
        assert killed.returncode == -9, f"not killed at {spec}:\n{killed.stderr[-3000:]}"
        check_finished_users(out)
    run_milp(args_for(data, out), milp_cache)
    check_finished_users(out)
    leftovers = [
        p
        for d in (out, out / "users", out / "adapters")
        for p in d.iterdir()
        if p.name.startswith(TEMP_PREFIXES)
    ]
    assert not leftovers
    assert outcome(out) == outcome(reference_dir), kills


def spec_of(points: list[str], index: int) -> str:
    """The kill spec of the reference's `index`th write step: its name, and which
    occurrence of that name it is."""
    name = points[index]
    return f"{points[: index + 1].count(name)}:{name}"


def test_killed_at_a_record_then_inside_a_memory_swap_resumes_exactly(
    reference, milp_cache, tmp_path
):
    """The first kill leaves u1's memory saved without its record; the resume trains u1
    again and is killed between the renames that swap the new memory in (no copy in
    place); the next resume ends as a run never killed."""
    kill_and_resume(["1:write u1.json", "1:swap u1"], reference, milp_cache, tmp_path / "run")


@pytest.mark.slow
def test_killed_at_seeded_write_steps_resumes_exactly(reference, milp_cache, tmp_path):
    """One kill, each in a run directory of its own, at every kind of write step (the
    fingerprint, each memory module's save, a memory's publishing, a record, predictions,
    metrics), at an occurrence drawn with a fixed seed; and one run killed twice."""
    _, _, points = reference
    kinds: dict[str, list[int]] = {}
    for index, name in enumerate(points):
        kinds.setdefault(re.sub(r"\bu\d\b", "<user>", name), []).append(index)
    assert {"save_memory memory_0", "save_memory memory_1", "replace <user>"} <= set(kinds)
    draw = random.Random(24)
    scenarios = [[spec_of(points, draw.choice(kinds[kind]))] for kind in sorted(kinds)]
    # Killed twice: once in the first half of the run, then, resuming, inside the first
    # memory it saves (a kill spec counts from its own run's start).
    early = draw.randrange(len(points) // 2)
    scenarios.append([spec_of(points, early), "1:save_memory memory_1"])
    for number, kills in enumerate(scenarios):
        kill_and_resume(kills, reference, milp_cache, tmp_path / f"run{number}")
