"""Benchmark: per-user memory training and answering on the real model, plain vs. fast path.

SmolLM2-135M-Instruct (`model=smollm2`) and real Chit-Chat users (`+experiment=chitchat`:
ChatML prompts, memory on the top half of the 30 layers, rank 8, AdamW lr 1e-3, gradient
clipping 1.0), or the embedded tiny model and data with `--model tiny` (a sanity check
on generated data, not evidence). Every row trains the same users on the same history,
with the same steps, seeds and initial memory weights:

  plain-peft       HF model + peft LoRA + AdamW in a plain PyTorch loop, float32, the
                   model's own `.loss` (what a user writes without milp)
  milp-fp32        milp's injector, one user per step (what `python -m milp.train`
                   runs, without answering), in float32 (`injection.fast=false`)
  fast             the same with its fast path on (`injection.fast`, the default: bf16
                   autocast where the hardware has it, frozen weights held in bf16, eager
                   attention on CPU, packed batches, frozen-prefix cache below the lowest
                   memory layer, target-only head; `--fast key=value,...` overrides it)
  milp-batched     milp's injector with every user in one step (`users_per_batch`),
                   fast path on

Each row runs in its own process (peak memory is its own); the clock covers users ->
saved adapters; `--repeat N`: N rounds in alternating order, each row's fastest kept.
Every row's adapters are then loaded with plain `PeftModel.from_pretrained` and
evaluated in float32: "final loss" is the mean target-token loss on the users' training
histories; the fast row passes when it is within `--loss-tolerance` of plain-peft's.
Answering: the queries are answered with plain-peft's adapters through milp's
`answer_queries`, greedy, in float32 and with `injection.fast.bf16_answers`.

MFU: required FLOPs (layers below the lowest memory layer once per example, layers
above forward + input-gradient backward every epoch, LoRA forward + backward, attention,
the head at target positions only; one count for every row) / seconds / the matmul peak
measured here in the precision the fast path multiplies in (bf16 where the hardware has
bf16 units, float32 elsewhere).

    python experiments/bench_real.py                     # SmolLM2, 2 users x 32 pairs, 2 epochs
    python experiments/bench_real.py --model tiny        # embedded tiny model
    python experiments/bench_real.py --device cuda       # on a GPU (see experiments/README.md)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from bench_rows import (
    best_of_rounds,
    load_plain_peft,
    matmul_peak,
    measure,
    run_row,
    train_plain_peft,
    train_with_injector,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ROWS = ("plain-peft", "milp-fp32", "fast", "milp-batched")
ANSWER_ROWS = ("answer-fp32", "answer-fast")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--users", type=int, default=2)
    # Defaults: one user's training in `+experiment=chitchat` (32 replies, batch 8, 2 epochs).
    p.add_argument("--history", type=int, default=32, help="each user's most recent pairs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--rows", default=",".join(TRAIN_ROWS + ANSWER_ROWS))
    p.add_argument(
        "--repeat", type=int, default=1, help="rounds of rows (alternating order); best run kept"
    )
    p.add_argument("--loss-tolerance", type=float, default=0.03)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument(
        "--fast",
        default="",
        help="overrides of injection.fast for the fast and batched rows, e.g. pack=false",
    )
    p.add_argument("--profile", type=Path, default=None, help="dir: a profile table per row")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- set-up


def compose_config(args):
    from hydra import compose, initialize_config_dir

    experiment = "chitchat" if args.model == "smollm2" else "lamp"
    overrides = [
        f"+experiment={experiment}",
        "callbacks=none",
        "logger=none",
        f"seed={args.seed}",
        f"trainer.max_epochs={args.epochs}",
        f"data.batch_size={args.batch_size}",
    ]
    if args.device.startswith("cuda"):
        overrides.append("trainer.accelerator=gpu")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def setup(args):
    """(cfg, base model, users, datamodule, prompt format), the same in every process."""
    import torch
    from hydra.utils import instantiate

    from milp.data.datamodule import PromptFormat, UserDataModule

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = compose_config(args)
    base = instantiate(cfg.model)
    base.model.to(args.device)
    fmt = PromptFormat(**{k: v for k, v in cfg.data.prompt_format.items() if k != "_target_"})
    users = instantiate(cfg.data.users)[: args.users]
    if len(users) < args.users:
        raise SystemExit(f"only {len(users)} users in the split")
    users = [replace(u, history=u.history[-args.history :]) for u in users]
    dm = UserDataModule(users, fmt, batch_size=args.batch_size, eval_batch_size=16)
    dm.attach_tokenizer(base.tokenizer)
    return cfg, base, users, dm, fmt


def fast_settings(args, cfg) -> dict:
    """The fast path of conf/injection with `--fast` overrides."""
    settings = dict(cfg.injection.fast)
    for item in filter(None, (x.strip() for x in args.fast.split(","))):
        key, _, value = item.partition("=")
        settings[key] = int(value) if value.isdigit() else value.lower() in ("1", "true")
    return settings


def train_row(row: str, args, cfg, base, users, dm, out: Path) -> None:
    """Train every user as `row` does (see the module doc); saves their memories."""
    if row == "plain-peft":
        train_plain_peft(cfg, base, users, dm, out, args.device)
    elif row == "milp-fp32":
        train_with_injector(cfg, base, users, dm, out, 1, fast=False)
    elif row == "fast":
        train_with_injector(cfg, base, users, dm, out, 1, fast_settings(args, cfg))
    else:
        train_with_injector(cfg, base, users, dm, out, len(users), fast_settings(args, cfg))


def run_answers(cfg, base, users, dm, out: Path, adapters: Path, fast: bool) -> int:
    """Answer every user's queries with its plain-peft memory through milp's
    `answer_queries` (float32, or bf16 as `injection.fast.bf16_answers` does); writes
    answers.json."""
    from milp.inject.answer import answer_queries

    answers = {}
    for user in users:
        model = load_plain_peft(base.model, adapters / user.slug)
        keep = lambda user_ids, use_memory: nullcontext()  # noqa: E731
        generation = dict(cfg.generation)
        found = answer_queries(model, base.tokenizer, dm, [user], keep, generation, False, fast)
        answers |= {p["id"]: p["prediction"] for p in found.predictions}
        base.model = model.unload()
    out.mkdir(parents=True, exist_ok=True)
    (out / "answers.json").write_text(json.dumps(answers, indent=1))
    return len(answers)


def run_final_loss(args, base, users, fmt, out: Path, rows: dict[str, Path]) -> None:
    """Each row's saved adapters, loaded with plain peft, evaluated in float32: the mean
    target-token loss over each user's training history (writes losses.json)."""
    import torch

    from milp.data.datamodule import TrainCollator

    collate = TrainCollator(base.tokenizer, fmt)
    losses = {}
    for row, directory in rows.items():
        per_user = []
        for user in users:
            model = load_plain_peft(base.model, directory / user.slug)
            total = count = 0.0
            with torch.no_grad():
                for start in range(0, len(user.history), 8):
                    batch = collate(user.history[start : start + 8])
                    batch = {k: v.to(args.device) for k, v in batch.items()}
                    n = int((batch["labels"][:, 1:] != -100).sum())
                    total += float(model(**batch).loss) * n
                    count += n
            per_user.append(total / count)
            base.model = model.unload()
        losses[row] = per_user
    out.mkdir(parents=True, exist_ok=True)
    (out / "losses.json").write_text(json.dumps(losses))


def worker(args) -> None:
    """One row in this process; prints one RESULT line."""
    cfg, base, users, dm, fmt = setup(args)

    def body() -> dict | None:
        if args.worker in TRAIN_ROWS:
            train_row(args.worker, args, cfg, base, users, dm, args.out)
        elif args.worker in ANSWER_ROWS:
            plain = args.out.parent / "plain-peft"
            bf16 = args.worker == "answer-fast"
            return {"queries": run_answers(cfg, base, users, dm, args.out, plain, bf16)}
        elif args.worker == "final-loss":
            rows = {r: args.out.parent / r for r in TRAIN_ROWS if (args.out.parent / r).is_dir()}
            run_final_loss(args, base, users, fmt, args.out, rows)
        else:
            raise SystemExit(f"unknown row {args.worker}")
        return None

    if not args.profile:
        result = measure(args.device, body)
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            result = measure(args.device, body)
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        args.profile.mkdir(parents=True, exist_ok=True)
        (args.profile / f"{args.worker}.txt").write_text(table)
    print("RESULT " + json.dumps({"row": args.worker} | result), flush=True)


# ----------------------------------------------------------------------------- driver


def workload(args, cfg, base, users, fmt) -> dict:
    """Training tokens and required FLOPs of the job (the same for every row)."""
    from hydra.utils import instantiate

    from milp.memory.space import place_memory

    model, config = base.model, base.model.config
    layers, hidden = config.num_hidden_layers, config.hidden_size
    memory = instantiate(cfg.memory)
    lowest = min(place_memory(memory, model).layers)
    decoder = model.get_decoder()
    per_layer = sum(p.numel() for p in decoder.layers[0].parameters() if p.dim() == 2)
    head = model.get_output_embeddings().weight.numel()
    tokens = targets = attention = 0
    for user in users:
        for pair in user.history:
            ids, labels = fmt.encode_pair(base.tokenizer, pair)
            n = len(ids)
            tokens += n
            targets += sum(x != -100 for x in labels[1:])
            attention += 2 * 2 * hidden * n * n / 2  # QK^T and AV, causal
    e = args.epochs
    from milp.memory.space import inject_memory, remove_memory

    peft_model = inject_memory(model, memory)
    lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    base.model = remove_memory(peft_model)
    flops = (
        2 * per_layer * lowest * tokens  # frozen prefix, once
        + e * 4 * per_layer * (layers - lowest) * tokens  # forward + input gradient
        + e * 6 * lora * tokens
        + (lowest + e * 3 * (layers - lowest)) * attention
        + e * 4 * head * targets  # head forward + input gradient at targets
    )
    return {
        "users": len(users),
        "examples": sum(len(u.history) for u in users),
        "tokens_per_epoch": tokens,
        "tokens": tokens * e,
        "target_tokens": targets * e,
        "epochs": e,
        "lowest_memory_layer": lowest,
        "flops": flops,
        "queries": sum(len(u.queries) for u in users),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    argv = list(argv if argv is not None else sys.argv[1:])
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = set(rows) - set(TRAIN_ROWS + ANSWER_ROWS)
    if unknown:
        raise SystemExit(f"unknown rows: {', '.join(sorted(unknown))}")
    if any(r in ANSWER_ROWS for r in rows) and "plain-peft" not in rows:
        raise SystemExit("the answer rows answer with plain-peft's adapters: add that row")
    load_before = os.getloadavg()
    peak = matmul_peak(args.device, args.threads)
    cfg, base, users, _, fmt = setup(args)
    work = workload(args, cfg, base, users, fmt)
    del base
    print(
        f"workload: {work['users']} users x {work['examples'] // work['users']} history pairs, "
        f"{work['epochs']} epochs, batch {args.batch_size}: {work['tokens']:,} training tokens "
        f"({work['target_tokens']:,} targets), memory from layer {work['lowest_memory_layer']}; "
        f"model {args.model} on {args.device}",
        flush=True,
    )
    scratch = Path(tempfile.mkdtemp(prefix="bench-real-"))

    def run(row: str, round_: int) -> dict:
        return run_row(__file__, argv, row, scratch / row)

    trained = [r for r in rows if r in TRAIN_ROWS]
    results = best_of_rounds(trained, args.repeat, run)
    results |= {row: run(row, 0) for row in rows if row in ANSWER_ROWS}
    losses = {}
    if trained:
        run("final-loss", 0)
        losses = json.loads((scratch / "final-loss" / "losses.json").read_text())
    load_after = os.getloadavg()
    # The machine may be busier at either end: the better of the two probes is the peak.
    later = matmul_peak(args.device, args.threads)
    peak = {k: max(v, later[k]) for k, v in peak.items()}
    # MFU against the precision the fast path multiplies in here: bf16 only where the
    # hardware has bf16 units (elsewhere bf16 is emulated, far below float32).
    from milp.inject.fast import bf16_supported

    mfu_dtype = "bfloat16" if bf16_supported(args.device) else "float32"

    header = (
        f"{'row':<17}{'seconds':>9}{'tokens/s':>10}{'users/min':>11}{'peak MiB':>10}"
        f"{'final loss':>12}{'MFU':>8}"
    )
    print(
        f"matmul 2048x576x1536: float32 {peak['float32']:.0f} GFLOP/s, "
        f"bf16 {peak['bfloat16']:.0f} GFLOP/s (the better of a probe before and after the rows)"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for row in trained:
        r = results[row]
        r["tokens_per_second"] = work["tokens"] / r["seconds"]
        r["users_per_minute"] = work["users"] / r["seconds"] * 60
        r["final_loss"] = sum(losses[row]) / len(losses[row])
        r["mfu"] = work["flops"] / r["seconds"] / (peak[mfu_dtype] * 1e9)
        print(
            f"{row:<17}{r['seconds']:>9.1f}{r['tokens_per_second']:>10.1f}"
            f"{r['users_per_minute']:>11.2f}{r['peak_bytes'] / 2**20:>10.0f}"
            f"{r['final_loss']:>12.4f}{r['mfu']:>8.1%}"
        )
    print(
        f"\ntorch threads per process: {next(iter(results.values()))['threads']}; "
        f"best of {max(1, args.repeat)} run(s) per row; load average "
        f"(1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f}; MFU: required FLOPs "
        f"{work['flops']:.3e} / seconds / measured {mfu_dtype} peak {peak[mfu_dtype]:.0f} GFLOP/s"
    )
    if args.model == "tiny":
        print("(--model tiny: generated data, a sanity check, not evidence)")
    if "answer-fp32" in results and "answer-fast" in results:
        a32 = json.loads((scratch / "answer-fp32" / "answers.json").read_text())
        afast = json.loads((scratch / "answer-fast" / "answers.json").read_text())
        same = sum(a32[k] == afast.get(k) for k in a32)
        q32 = work["queries"] / results["answer-fp32"]["seconds"]
        qfast = work["queries"] / results["answer-fast"]["seconds"]
        print(
            f"answering {work['queries']} queries with plain-peft's memories: float32 "
            f"{q32:.2f} queries/s, fast {qfast:.2f} queries/s ({qfast / q32:.2f}x); "
            f"{same}/{len(a32)} answers identical"
        )
        for k in a32:
            if a32[k] != afast.get(k):
                print(f"  {k}: float32 {a32[k]!r}\n  {' ' * len(k)}  fast    {afast.get(k)!r}")
    if args.json:
        summary = {"workload": work, "matmul_gflops": peak, "results": results, "losses": losses}
        args.json.write_text(json.dumps(summary, indent=2))
    if "fast" in results and "plain-peft" in results:
        plain, fast = results["plain-peft"], results["fast"]
        gap = abs(fast["final_loss"] - plain["final_loss"]) / plain["final_loss"]
        verdict = "within" if gap <= args.loss_tolerance else "OUTSIDE"
        print(
            f"final loss fast vs plain-peft: {gap:.2%} relative, {verdict} the tolerance "
            f"{args.loss_tolerance:.0%}"
        )
        # No fast path can beat its required FLOPs at the machine's measured peak.
        bound = plain["seconds"] * peak[mfu_dtype] * 1e9 / work["flops"]
        print(
            f"fast/plain-peft bound at 100% MFU: {bound:.2f}x (the required FLOPs at the "
            f"measured {mfu_dtype} peak)"
        )
        ratio = fast["tokens_per_second"] / plain["tokens_per_second"]
        print(f"fast/plain-peft tokens-per-second: {ratio:.2f}x")


if __name__ == "__main__":
    main()
