"""What the training benchmarks share: their rows' training, the process each row runs
in, and its peak memory.

A row trains the same users with the same seeds, steps and initial memory weights:

- `train_plain_peft`: what one writes without milp, peft + AdamW + the model's own
  loss in a plain PyTorch loop (the baseline);
- `train_with_injector`: milp's injector (`milp.inject.injector.Injector`, what
  `python -m milp.train` runs, without answering) with a given `users_per_batch` and
  fast path.

Both save each user's memory as peft adapters under `out/<user slug>`
(`load_plain_peft` loads one back with peft alone). Each row runs in a fresh process
(`run_row`, `measure`); `matmul_peak` is the machine's measured peak for MFU,
`peak_tflops` a card's; `SHAPES` are random-weight models for speed runs.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Dense bf16 tensor-core peaks (TFLOP/s) by device-name fragment, most specific first.
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}

# Random-weight shapes for speed runs (Qwen2.5-0.5B and Llama-3.2-1B).
SHAPES = {
    "qwen0.5b": dict(
        family="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "llama1b": dict(
        family="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
}


def train_plain_peft(cfg, base, users, dm, out: Path, device: str, autocast=None) -> None:
    """Per user: fresh peft memory modules after the user's seed (milp's initial weights),
    AdamW and clip_grad_norm_, the user's batches epoch by epoch as a Lightning fit
    draws them, the model's own `.loss` (under `autocast`, if given)."""
    import torch
    from hydra.utils import instantiate

    from milp.inject import seed_user
    from milp.memory.space import inject_memory, remove_memory

    memory = instantiate(cfg.memory)
    clip = cfg.trainer.get("gradient_clip_val")
    for user in users:
        seed_user(cfg.seed, user.seed_id)
        model = inject_memory(base.model, memory)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
        )
        loader = dm.select(user).train_dataloader()  # shuffled by a generator on the seed
        for _ in range(cfg.trainer.max_epochs):
            for batch in itertools.islice(loader, len(loader)):
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast or nullcontext():
                    loss = model(**batch).loss
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(trainable, clip)
                optimizer.step()
                optimizer.zero_grad()
        model.save_pretrained(out / user.slug)
        base.model = remove_memory(model)


def train_with_injector(
    cfg, base, users, dm, out: Path, users_per_batch: int, fast: object = None
) -> None:
    """milp's injector trains every user (`users_per_batch` per step; `fast`: the
    `injection.fast` settings, None for the config's, False for plain float32)."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from milp.memory.adapters import adapter_config, bank_module_states, save_memory
    from milp.memory.space import place_memory
    from milp.run.assemble import make_injector

    with open_dict(cfg):
        cfg.injection.users_per_batch = users_per_batch
        if fast is not None:
            cfg.injection.fast = fast
    memory = instantiate(cfg.memory)
    placement = place_memory(memory, base.model)
    lora = adapter_config(memory, placement, base.model)
    injector = make_injector(cfg, base, memory, placement, dm)
    for done in injector.train(users):
        states = bank_module_states(placement.targets, done.weights, memory)
        save_memory(out / done.user.slug, states, lora, {"user_id": done.user.user_id})


def load_plain_peft(model, directory: Path):
    """A user's saved memory loaded with plain peft only (no milp code): every adapter
    under `directory`, all active together, in eval mode."""
    from peft import PeftModel

    dirs = sorted(p.parent for p in directory.glob("*/adapter_config.json"))
    if not dirs:
        raise SystemExit(f"{directory}: no peft adapter saved there")
    peft_model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name=dirs[0].name)
    for d in dirs[1:]:
        peft_model.load_adapter(str(d), adapter_name=d.name)
    peft_model.base_model.set_adapter([d.name for d in dirs])
    return peft_model.eval()


def matmul_peak(device: str, threads: int | None) -> dict[str, float]:
    """Measured GFLOP/s of a 2048x576x1536 product, float32 and bf16 (the MFU peak)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a = torch.randn(2048, 576, dtype=dtype, device=device)
        b = torch.randn(576, 1536, dtype=dtype, device=device)
        best = float("inf")
        for _ in range(5):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(10):
                a @ b
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - started) / 10)
        out[name] = 2 * 2048 * 576 * 1536 / best / 1e9
    return out


def compare_adapters(dirs: dict[str, Path], users) -> dict[str, list[float]]:
    """Per user, the largest absolute difference between a path's adapters and the
    batched path's."""
    from safetensors.torch import load_file

    def load(path: Path) -> dict:
        out = {}
        for f in sorted(path.rglob("adapter_model.safetensors")):
            for k, v in load_file(f).items():
                out[f"{f.parent.name}/{k}"] = v
        return out

    diffs = {}
    if "batched" not in dirs:
        return diffs
    for name, directory in dirs.items():
        if name == "batched":
            continue
        per_user = []
        for user in users:
            ref, other = load(dirs["batched"] / user.slug), load(directory / user.slug)
            if set(ref) != set(other):
                raise SystemExit(f"{name}: adapters of {user.user_id} have other tensors")
            per_user.append(max(float((ref[k] - other[k]).abs().max()) for k in ref))
        diffs[name] = per_user
    return diffs


def peak_tflops(device_name: str, dtype: str, given: float | None = None) -> float | None:
    """The card's dense peak (TFLOP/s) for MFU: `given`, else bf16's by device name."""
    if given:
        return given
    for fragment, value in PEAK_BF16_TFLOPS.items():
        if fragment in device_name:
            return value if dtype == "bfloat16" else None
    return None


def random_weight_model(name: str, device: str):
    """A model of one of `SHAPES` with random weights, frozen: for speed runs only."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(SHAPES[name])
    family = shape.pop("family")
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(0)
    with torch.device(device):
        model = model_cls(config_cls(**shape, max_position_embeddings=2048))
    return model.requires_grad_(False).eval()


class PeakMemory:
    """Peak memory of the timed section: CUDA allocator peak, or sampled process RSS."""

    def __init__(self, device: str) -> None:
        import psutil
        import torch

        self.cuda = device.startswith("cuda")
        self.process = psutil.Process()
        self.torch = torch
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.baseline = self.torch.cuda.memory_allocated()
        else:
            self.baseline = self.process.memory_info().rss
            self.peak = self.baseline
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.peak = self.torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.process.memory_info().rss)


def measure(device: str, body: Callable[[], dict | None]) -> dict:
    """Run `body` timed, with its peak memory: the result every row reports (plus what
    `body` returns)."""
    import resource

    import torch

    with PeakMemory(device) as memory:
        started = time.perf_counter()
        extra = body() or {}
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "peak_bytes": memory.peak,
        "baseline_bytes": memory.baseline,
        "threads": torch.get_num_threads(),
        "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
    } | extra


def run_row(script: str, argv: Sequence[str], row: str, out: Path) -> dict:
    """Run one row in a fresh process (`script --worker row --out out`): the result its
    worker prints as a `RESULT {json}` line."""
    command = [sys.executable, script, *argv, "--worker", row, "--out", str(out)]
    env = os.environ | {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{row} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def best_of_rounds(
    rows: Sequence[str], repeat: int, run: Callable[[str, int], dict]
) -> dict[str, dict]:
    """Each row's fastest of `repeat` rounds, in alternating order (a shared machine's
    load drifts: one busy spell should not decide a ratio). `run(row, round)` -> result
    with "seconds"; every run's seconds are kept under "runs"."""
    results: dict[str, dict] = {}
    for round_ in range(max(1, repeat)):
        for row in rows if round_ % 2 == 0 else list(reversed(rows)):
            result = run(row, round_) | {"load_after": os.getloadavg()[0]}
            print(f"  {row}: {result['seconds']:.1f} s (load {result['load_after']:.2f})")
            runs = results.get(row, {}).get("runs", []) + [result["seconds"]]
            if row not in results or result["seconds"] < results[row]["seconds"]:
                results[row] = result
            results[row]["runs"] = runs
    return {row: results[row] for row in rows}
