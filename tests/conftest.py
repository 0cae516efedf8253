"""Shared test fixtures: tiny real models and an isolated milp cache."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[1]

# A tiny pretrained base for end-to-end runs: small enough to build in seconds.
TINY_MODEL_OVERRIDES = [
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.num_layers=4",
    "model.num_heads=2",
    "model.vocab_size=512",
    "model.pretrain_pairs=256",
    "model.epochs=1",
]


@pytest.fixture
def llama() -> LlamaForCausalLM:
    """A randomly initialized 4-layer Llama: real modules, no download, built in ms."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def milp_cache(tmp_path_factory) -> Path:
    """One cache dir for the whole session, so the tiny model is built once."""
    return tmp_path_factory.mktemp("milp-cache")


def milp_env(cache: Path) -> dict[str, str]:
    """The environment of a real milp process in the tests: offline, the test cache."""
    return os.environ | {
        "MILP_CACHE_DIR": str(cache),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }


def start_milp(args: list[str], cache: Path, log: Path | None = None) -> subprocess.Popen:
    """Start `python -m milp.train` in the background (for tests that interrupt it).

    `tests/` is on its PYTHONPATH, so its config may name test-side callbacks
    (tests/interrupt_gate.py); `log` receives its stdout and stderr.
    """
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p)
    output = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "milp.train", *args],
            cwd=ROOT,
            env=milp_env(cache) | {"PYTHONPATH": path},
            stdout=output,
            stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
            # A suite started in the background (`make test &`, some CI runners) hands its
            # children SIGINT ignored, and Python keeps an ignored SIGINT: restore Ctrl-C.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    finally:
        if log:
            output.close()  # the child holds its own copy of the descriptor


def run_milp(
    args: list[str], cache: Path, check: bool = True, env: dict | None = None, **kwargs
) -> subprocess.CompletedProcess:
    """Run `python -m milp.train` for real, offline, with the test cache (`env`: more
    environment variables)."""
    result = subprocess.run(
        [sys.executable, "-m", "milp.train", *args],
        cwd=ROOT,
        env=milp_env(cache) | (env or {}),
        capture_output=True,
        text=True,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"milp.train failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result
