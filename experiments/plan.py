"""Preregistration for `make reproduce`: the frozen plan the test runs must follow.

After tuning on the dev users and before any test user is answered, `freeze` writes
``<out>/plan.json``: the commit, every method's exact test-run settings and seeds, the
test users' ids, the tuning record's hash. The test stage then refuses to start a run
the plan does not hold (`check_run`), and records when each test run first started
(``<out>/test_starts.json``) so the results can show that the plan predates them all.

A plan is never rewritten: a second `freeze` with different choices is refused (start a
new comparison in a new ``--out`` instead), and so is a first `freeze` where test runs
already exist.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from jobs import ROOT

from milp.run.files import atomic_write_text

PLAN = "plan.json"
STARTS = "test_starts.json"
#: What the test stage must match; the rest (commit, time) describes the plan.
FROZEN = ("source", "experiment", "runs", "test_user_ids", "test_data_sha256", "tuning_sha256")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def commit() -> dict[str, Any]:
    """The checkout's commit and whether tracked files differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD") or None,
        "dirty": bool(git("status", "--short", "-uno")),
    }


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def freeze(
    out: Path,
    *,
    source: str,
    experiment: str,
    runs: dict[str, dict[str, Any]],
    test_user_ids: list[str],
    test_data_sha256: str | None = None,
) -> dict[str, Any]:
    """Write ``<out>/plan.json`` (or check an existing one holds the same choices) and
    return it. `runs`: method -> {"seeds": [...], "overrides": [...]}, each test run's
    settings exactly as it will be started; `test_data_sha256`: the test users' records
    as loaded (their histories, queries and golds)."""
    path = out / PLAN
    plan = {
        "source": source,
        "experiment": experiment,
        "runs": runs,
        "test_user_ids": sorted(test_user_ids),
        "test_data_sha256": test_data_sha256,
        "tuning_sha256": file_sha256(out / "tuning.json"),
    }
    if path.is_file():
        frozen = json.loads(path.read_text())
        changed = [k for k in FROZEN if frozen.get(k) != plan[k]]
        if changed:
            raise SystemExit(
                f"reproduce: {path} is frozen and this invocation differs in {', '.join(changed)}; "
                "a plan is never rewritten: use a new --out for a new comparison"
            )
        return frozen
    started = sorted(p for p in (out / "runs").glob("*/seed*") if p.parent.name != "tune")
    if started:
        raise SystemExit(
            f"reproduce: {started[0]} exists but {path} does not: test runs made before a "
            "plan cannot be preregistered; use a new --out"
        )
    plan = {**plan, **commit(), "created_at": now()}
    atomic_write_text(path, json.dumps(plan, indent=1, sort_keys=True))
    return plan


def check_run(out: Path, method: str, seed: int, overrides: list[str]) -> None:
    """Refuse a test run that ``<out>/plan.json`` does not hold; record its first start."""
    path = out / PLAN
    if not path.is_file():
        raise SystemExit(f"reproduce: no {path}: the test stage runs only from a frozen plan")
    runs = json.loads(path.read_text())["runs"]
    planned = runs.get(method)
    if planned is None or seed not in planned["seeds"]:
        raise SystemExit(f"reproduce: {path} holds no test run of {method} with seed {seed}")
    if planned["overrides"] != overrides:
        raise SystemExit(
            f"reproduce: {method} seed {seed}: the settings differ from {path}: "
            f"planned {planned['overrides']}, now {overrides}"
        )
    frozen_at, now_at = json.loads(path.read_text())["commit"], commit()["commit"]
    if now_at != frozen_at:
        raise SystemExit(
            f"reproduce: {path} was frozen at commit {frozen_at}, this checkout is at "
            f"{now_at}: test runs use the plan's code (a git worktree at that commit)"
        )
    starts_path = out / STARTS
    starts = json.loads(starts_path.read_text()) if starts_path.is_file() else {}
    key = f"{method}/seed{seed}"
    if key not in starts:
        starts[key] = {"started_at": now(), **commit()}
        atomic_write_text(starts_path, json.dumps(starts, indent=1, sort_keys=True))


def summary(out: Path) -> str:
    """The plan's hash, commit and time against the first test run's start."""
    path = out / PLAN
    if not path.is_file():
        return "(no plan.json: these test runs were not preregistered)"
    plan = json.loads(path.read_text())
    starts_path = out / STARTS
    starts = json.loads(starts_path.read_text()) if starts_path.is_file() else {}
    first = min((s["started_at"] for s in starts.values()), default=None)
    commits = sorted({s["commit"] for s in starts.values() if s.get("commit")})
    dirty_runs = sorted(k for k, s in starts.items() if s.get("dirty"))
    if first is None:
        timing = "- no test run has started yet"
    elif plan["created_at"] < first:
        timing = f"- first test run started {first}: the plan predates every test run"
    else:
        timing = f"- first test run started {first}: the plan does NOT predate the test runs"
    dirty = " (with uncommitted changes)" if plan["dirty"] else ""
    return "\n".join(
        [
            f"- plan: `{path.name}` sha256 `{file_sha256(path)}`, written {plan['created_at']} "
            f"at commit `{plan['commit']}`{dirty}",
            f"- test users: {len(plan['test_user_ids'])}; runs: "
            + ", ".join(f"{m} (seeds {r['seeds']})" for m, r in plan["runs"].items()),
            timing,
            f"- test runs' commits: {', '.join(f'`{c}`' for c in commits) or '(none yet)'}"
            + (f"; with uncommitted changes: {', '.join(dirty_runs)}" if dirty_runs else ""),
        ]
    )
