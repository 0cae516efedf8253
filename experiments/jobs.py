"""How `make reproduce`'s steps start `python -m milp.train`: one logged subprocess each."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], log: Path) -> float:
    """Run a command to completion (output to `log`), returning its wall time in seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print("$", " ".join(args), flush=True)
    with log.open("w") as out:
        result = subprocess.run(
            args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=os.environ
        )
    if result.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"reproduce: command failed ({result.returncode}), see {log}:\n{tail}")
    return time.perf_counter() - started


def train_command(experiment: str, *overrides: str, multirun: bool = False) -> list[str]:
    """``python -m milp.train [-m] +experiment=<experiment> <overrides>``."""
    return [
        sys.executable,
        "-m",
        "milp.train",
        *(["-m"] if multirun else []),
        f"+experiment={experiment}",
        *overrides,
    ]
