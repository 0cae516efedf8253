"""Benchmark: per-user memory injection, one user at a time vs. many users per batch.

Three ways to give N users their memory (inject fresh LoRA modules, train them on the
user's history, save them as peft adapters), on the same model, users, memory config,
optimizer, steps and seeds:

  peft       a plain loop: peft + the standard PyTorch/HF training loop per user
             (what one would write today without milp)
  one-user   milp's injector, one user per step (what `python -m milp.train` runs,
             without answering the queries), on its fast path (`injection.fast`)
  batched    milp's injector with users_per_batch users per step (continuous
             batching), on its fast path
  ceiling    not training: the batched path's first batch (users_per_batch users,
             packed, same precision and loss) through the frozen model plus ONE memory
             shared by every row, forward + backward, no optimizer; timed over a few
             steps and scaled to the workload. `batched/ceiling` is what keeping users
             apart (routing, per-user optimizer and clipping, data) leaves of it.
  frozen     not training either: the same batch through the frozen model alone (input
             gradients through every layer); `batched/frozen` is printed beside the
             most a batched path can reach by FLOP count.

`--overrides injection.fast=false` runs the milp paths (and ceiling, frozen) in plain
float32; `--dtype bfloat16` runs the base model in bf16 on every path. Each path runs in
its own process (`--repeat N`: N rounds in alternating order, fastest kept); the clock
covers users -> saved adapters. The three training paths see the same mini-batches and
should end with the same adapters: the script checks that too. Answering is not timed
here (see `python -m milp.generate`).

    python experiments/bench_injection.py                       # CPU, embedded tiny model
    python experiments/bench_injection.py --users 8 --epochs 2  # quick look
    python experiments/bench_injection.py --model qwen0.5b --device cuda --dtype bfloat16

Random-weight model shapes (--model qwen0.5b | llama1b) measure speed only; on CUDA the
script reports model FLOPs utilization against the card's peak (--peak-tflops to set it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_rows import (
    SHAPES,
    best_of_rounds,
    compare_adapters,
    measure,
    peak_tflops,
    random_weight_model,
    run_row,
    train_plain_peft,
    train_with_injector,
)

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("peft", "one-user", "batched", "ceiling", "frozen")
# ceiling and frozen are not ways to train: bounds of what batching can gain here.
TRAINING_PATHS = PATHS[:3]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=32)
    p.add_argument("--users-per-batch", type=int, default=16)
    p.add_argument("--model", default="tiny", help="tiny | qwen0.5b | llama1b | HF model dir")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--epochs", type=int, default=None, help="default: conf trainer.max_epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--paths", default=",".join(PATHS), help="which paths, comma-separated")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's peak, for MFU")
    p.add_argument("--repeat", type=int, default=1, help="rounds of paths; best kept")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--overrides", nargs="*", default=[], help="extra milp.train overrides")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- set-up


def compose_config(args):
    from hydra import compose, initialize_config_dir

    overrides = ["+experiment=lamp", "callbacks=none", "logger=none", f"seed={args.seed}"]
    if args.epochs is not None:
        overrides.append(f"trainer.max_epochs={args.epochs}")
    if args.device == "cuda":
        overrides += ["trainer.accelerator=gpu"]
    overrides.append(
        "trainer.precision=" + ("bf16-mixed" if args.dtype == "bfloat16" else "32-true")
    )
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides + list(args.overrides))


def load_model(args, cfg):
    """The base model and tokenizer: the embedded tiny model, a random shape, or a dir."""
    import torch
    from hydra.utils import instantiate

    from milp.models.hf import load_base_model

    if args.model == "tiny":
        base = instantiate(cfg.model)
    elif args.model in SHAPES:
        base = instantiate(cfg.model)  # its tokenizer: ids < 1024 fit any vocabulary
        base.model = random_weight_model(args.model, args.device)
    else:
        base = load_base_model(args.model, dtype=args.dtype)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    base.model.to(device=args.device, dtype=dtype)  # frozen base; memories stay float32
    return base


def load_users(args, cfg):
    """The first `--users` users of the embedded data (train, then dev, then test)."""
    from hydra.utils import instantiate

    users = []
    for split in ("train", "dev", "test"):
        cfg.data.users.split = split
        users += instantiate(cfg.data.users)
    if len(users) < args.users:
        raise SystemExit(f"only {len(users)} users available")
    return users[: args.users]


def make_datamodule(cfg, users, tokenizer):
    from hydra.utils import instantiate

    from milp.data.datamodule import UserDataModule

    fmt = instantiate(cfg.data.prompt_format)
    dm = UserDataModule(users, fmt, cfg.data.batch_size, cfg.data.eval_batch_size)
    dm.attach_tokenizer(tokenizer)
    return dm


# ----------------------------------------------------------------------------- paths


def run_ceiling(args, cfg, base, users, dm, out: Path, shared_memory: bool) -> tuple[int, float]:
    """One training step of the batched path's first batch, loss and precision, without
    per-user anything or an optimizer; timed. `shared_memory` (the `ceiling` row): one
    memory of the configured shape, every row routed to it; else (`frozen`) no memory,
    input gradients through every layer. Returns (users in the batch, seconds/token)."""
    import torch
    from hydra.utils import instantiate

    from milp.inject import seed_user
    from milp.inject.bank import MemoryBank, fresh_weights
    from milp.inject.fast import FastPath, fast_autocast, fast_training
    from milp.inject.loss import target_loss
    from milp.inject.module import ROUTING_KEYS
    from milp.inject.schedule import UserSchedule, UserSteps
    from milp.memory.space import place_memory

    fast = FastPath.from_config(cfg.injection.get("fast"))
    slots = min(args.users_per_batch, len(users))
    pad = base.tokenizer.pad_token_id
    first = UserSchedule(users[:slots], slots, UserSteps(1, 1), dm, pad, fast.pack)
    first.admit(lambda slot, user: seed_user(cfg.seed, user.seed_id))
    step = next(iter(first))  # the batched path's first step, as it lays it out
    tokens, row_slots = int(step["tokens"].sum()), step["row_slots"].to(args.device)
    batch = {k: v.to(args.device) for k, v in step.items() if k not in ROUTING_KEYS}
    if shared_memory:
        memory = instantiate(cfg.memory)
        targets = place_memory(memory, base.model).targets
        bank = MemoryBank(targets, 1, memory, device=args.device)
        bank.load_user(0, fresh_weights(targets, memory))
        bank.attach(base.model)
        routing = bank.routing([0] * row_slots.shape[0])
    else:
        # A trainable embedding makes autograd carry input gradients through every layer
        # (as memories on every layer do); its own gradient is a cheap scatter.
        base.model.get_input_embeddings().weight.requires_grad_(True)
        routing = contextlib.nullcontext()
    device_type = torch.device(args.device).type
    if args.dtype == "bfloat16":
        autocast = torch.autocast(device_type, dtype=torch.bfloat16)
    else:
        autocast = fast_autocast(args.device, fast.bf16)

    def step() -> None:
        with autocast:
            losses, _ = target_loss(base.model, batch).per_group(row_slots, slots)
        losses.sum().backward()
        base.model.zero_grad(set_to_none=True)
        if shared_memory:
            bank.zero_grad(set_to_none=True)

    with fast_training(base.model, fast, args.device, 0), routing:
        step()  # warm-up
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        repeats, started = 5, time.perf_counter()
        for _ in range(repeats):
            step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    per_token = (time.perf_counter() - started) / (repeats * tokens)
    return slots, per_token


def worker(args) -> None:
    """One path in this process; prints one RESULT line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose_config(args)
    base = load_model(args, cfg)
    users = load_users(args, cfg)
    dm = make_datamodule(cfg, users, base.tokenizer)
    per_token, slots = None, {"peft": 1, "one-user": 1}.get(args.worker, args.users_per_batch)

    def body() -> None:
        nonlocal per_token, slots
        if args.worker == "peft":
            dtype = torch.bfloat16 if args.dtype == "bfloat16" else None
            device_type = torch.device(args.device).type
            autocast = torch.autocast(device_type, dtype=dtype, enabled=dtype is not None)
            train_plain_peft(cfg, base, users, dm, args.out, args.device, autocast)
        elif args.worker in ("one-user", "batched"):
            train_with_injector(cfg, base, users, dm, args.out, slots)
        else:  # ceiling, frozen: the driver scales their speed to the workload
            shared = args.worker == "ceiling"
            slots, per_token = run_ceiling(args, cfg, base, users, dm, args.out, shared)

    result = measure(args.device, body)
    if per_token is not None:
        result["seconds"] = None
    result |= {"path": args.worker, "seconds_per_token": per_token}
    result["concurrent_users"] = min(slots, len(users))
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- driver


def workload(args):
    """Training tokens and model FLOPs of the whole job (the same for every path)."""
    import math

    import torch
    from hydra.utils import instantiate

    from milp.memory.space import place_memory

    cfg = compose_config(args)
    base = load_model(args, cfg) if args.model != "tiny" else instantiate(cfg.model)
    users = load_users(args, cfg)
    fmt = instantiate(cfg.data.prompt_format)
    epochs, bs = cfg.trainer.max_epochs, cfg.data.batch_size
    steps, lengths = 0, []
    for user in users:
        lengths += [len(fmt.encode_pair(base.tokenizer, p)[0]) for p in user.history]
        steps += epochs * math.ceil(len(user.history) / bs)
    tokens = epochs * sum(lengths)
    model, memory = base.model, instantiate(cfg.memory)
    lora = sum(
        memory.num_loras * memory.rank * (t.in_features + t.out_features)
        for t in place_memory(memory, model).targets
    )
    embed = model.get_input_embeddings().weight.numel()
    dense = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
    )  # includes lm_head (tied or not: it is a matmul per token)
    config = model.config
    mean_len = sum(lengths) / len(lengths)
    # Per token: frozen matmuls 2N forward + 2N input-gradient (no weight gradient), LoRA
    # 6N, attention scores and values ~ 2 * 2 * layers * hidden * (mean_len / 2), x3.
    attention = 3 * 2 * 2 * config.num_hidden_layers * config.hidden_size * mean_len / 2
    flops_per_token = 4 * dense + 6 * lora + attention
    return {
        "users": len(users),
        "tokens": tokens,
        "steps": steps,
        "mean_tokens_per_example": mean_len,
        "epochs": epochs,
        "dense_params": dense,
        "embedding_params": embed,
        "lora_params_per_user": lora,
        "flops": tokens * flops_per_token,
        # The frozen row leaves the memory's own 6N out: no batched path beats this share.
        "frozen_flop_bound": (flops_per_token - 6 * lora) / flops_per_token,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise SystemExit(f"unknown paths: {', '.join(sorted(unknown))}")
    load_before = os.getloadavg()
    work = workload(args)
    print(
        f"workload: {work['users']} users, {work['steps']} optimizer steps, "
        f"{work['tokens']:,} training tokens ({work['mean_tokens_per_example']:.0f}/example, "
        f"{work['epochs']} epochs), model {args.model} on {args.device}/{args.dtype}, "
        f"users_per_batch={args.users_per_batch}",
        flush=True,
    )
    scratch = Path(tempfile.mkdtemp(prefix="bench-injection-"))
    forwarded = list(argv if argv is not None else sys.argv[1:])

    def run(path: str, round_: int) -> dict:
        out = scratch / f"{path}-{round_}"
        result = run_row(__file__, forwarded, path, out) | {"out": str(out)}
        if result["seconds"] is None:  # ceiling, frozen: speed over the whole workload
            result["seconds"] = result["seconds_per_token"] * work["tokens"]
        return result

    results = best_of_rounds(paths, args.repeat, run)
    dirs = {path: Path(r["out"]) for path, r in results.items()}
    load_after = os.getloadavg()

    cfg = compose_config(args)
    trained = {name: d for name, d in dirs.items() if name in TRAINING_PATHS}
    diffs = compare_adapters(trained, load_users(args, cfg))
    device_name = next(iter(results.values()))["device_name"]
    peak = peak_tflops(device_name, args.dtype, args.peak_tflops)
    header = (
        f"{'path':<11}{'seconds':>9}{'users/min':>11}{'tokens/s':>11}{'peak MiB':>10}"
        f"{'extra MiB':>11}{'MiB/user':>10}" + (f"{'MFU':>8}" if peak else "")
    )
    print("\n" + header + "\n" + "-" * len(header))
    for path, r in results.items():
        if path not in TRAINING_PATHS:  # extrapolated from a few steps; no memory to measure
            r["peak_bytes"] = r["baseline_bytes"]
        extra = (r["peak_bytes"] - r["baseline_bytes"]) / 2**20
        r["users_per_minute"] = work["users"] / r["seconds"] * 60
        r["tokens_per_second"] = work["tokens"] / r["seconds"]
        r["extra_mib_per_user"] = extra / r["concurrent_users"]
        mfu = work["flops"] / r["seconds"] / (peak * 1e12) if peak else None
        r["mfu"] = mfu
        print(
            f"{path:<11}{r['seconds']:>9.1f}{r['users_per_minute']:>11.1f}"
            f"{r['tokens_per_second']:>11.0f}{r['peak_bytes'] / 2**20:>10.0f}{extra:>11.1f}"
            f"{r['extra_mib_per_user']:>10.2f}" + (f"{mfu:>8.1%}" if peak else "")
        )
    print(
        f"\ndevice: {device_name}, torch threads per process: "
        f"{next(iter(results.values()))['threads']}; best of {max(1, args.repeat)} run(s) per "
        "path; load average before "
        f"{load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)"
    )
    for name, per_user in diffs.items():
        ordered = sorted(per_user)
        median, close = ordered[len(ordered) // 2], sum(d < 1e-3 for d in per_user)
        print(
            f"|adapter difference| {name} vs batched, per user: median {median:.1e}, "
            f"max {ordered[-1]:.1e}; {close}/{len(per_user)} users within 1e-3"
        )
    if diffs:
        print("  (float rounding differs between the paths; AdamW at lr=1e-2 amplifies it)")
    if peak:
        print(f"MFU: model FLOPs {work['flops']:.3e} / seconds / peak {peak} TFLOP/s")
    if args.json:
        summary = {"workload": work, "results": results, "adapter_differences": diffs}
        args.json.write_text(json.dumps(summary, indent=2))

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in results and b in results:
            return results[a][key] / max(results[b][key], 1e-9)
        return None

    for other in ("one-user", "peft"):
        if (mem := ratio("batched", other, "extra_mib_per_user")) is not None:
            print(f"batched/sequential-{other} peak memory per user: {mem:.2f}x")
    if (bound := ratio("ceiling", "peft", "users_per_minute")) is not None:
        print(f"ceiling/sequential-peft users-per-minute: {bound:.2f}x (batching's bound here)")
    for other in ("one-user", "peft"):
        if (speed := ratio("batched", other, "users_per_minute")) is not None:
            print(f"batched/sequential-{other} users-per-minute: {speed:.2f}x")
    if (share := ratio("batched", "frozen", "tokens_per_second")) is not None:
        bound = work["frozen_flop_bound"]
        print(f"batched/frozen tokens-per-second: {share:.2f}x; bound by FLOPs {bound:.2f}x")
    if (share := ratio("batched", "ceiling", "tokens_per_second")) is not None:
        print(f"batched/ceiling tokens-per-second: {share:.2f}x")


if __name__ == "__main__":
    main()
