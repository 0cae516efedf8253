"""`python -m milp.generate store=RUN`: answer many users' queries with their stored memories.

Serving: the memories of up to `users_per_batch` users are loaded from a run's adapter
store into one peft model, each user as one adapter (a user's `num_loras` modules of
rank r share the scale alpha/r, so they are stacked exactly into one rank `num_loras*r`
adapter with alpha `num_loras*alpha`), and their queries are answered together in
mixed-adapter batches: peft's `adapter_names=[...]` gives every row its own user's
adapter, in inference mode. Users without a stored memory are answered by the base
model (`__base__`). `engine=routed` runs the same mixed batches through milp's own
stacked memories (`milp.inject.bank.MemoryBank`) instead of peft's per-adapter loop.
Before any answer, every memory to load is checked: its files against the SHA-256 its
`memory.json` and the run's result record list; a corrupt or truncated one is refused
with one line naming the file.

Queries come from the run's own data (its `.hydra/config.yaml`: model, data, split,
prompt format, decoding), or from `queries=file.jsonl` (`{"user_id", "prompt", "id"?}`
per line). With `compare_one_at_a_time=true` the same queries are also answered user by
user (`load_memory`, generate, unload), and both throughputs are printed.

    python -m milp.generate store=outputs/2026-01-01/12-00-00
    python -m milp.generate store=RUN queries=new_queries.jsonl users_per_batch=64
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from milp.data.checks import setting_number
from milp.data.users import Query, user_slug
from milp.errors import MilpError, run_command
from milp.inject.serve import MixedServer, Request
from milp.memory.adapters import verify_memory
from milp.run.assemble import load_base
from milp.run.build import build
from milp.run.files import atomic_write_text
from milp.run.settings import check_generation
from milp.run.store import adapters_root, recorded_memory, run_config

# This command's own settings, kept when the rest comes from the run's configuration.
SERVE_KEYS = ("store", "queries", "users_per_batch", "batch_size", "device", "paths")
SERVE_KEYS += ("compare_one_at_a_time", "engine")


def read_requests(path: str | Path) -> list[Request]:
    """The queries of a `queries=` JSONL file: `{"user_id", "prompt", "id"?}` per line."""
    requests = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            requests.append(
                Request(
                    str(record["user_id"]),
                    Query(str(record.get("id", f"q{number}")), str(record["prompt"])),
                )
            )
        except (ValueError, KeyError) as err:
            raise MilpError(f"{path}:{number}: needs user_id and prompt ({err})") from None
    return requests


def serve(cfg: DictConfig) -> dict[str, Any]:
    """Answer the requests; write answers.jsonl; return the throughput figures."""
    root = adapters_root(cfg.store, "store")
    source = run_config(Path(cfg.store)) if cfg.use_run_config else None
    settings = cfg
    if source is not None:  # answer as the run did: its model, users, prompts, decoding
        settings = source
        with open_dict(settings):
            for key in SERVE_KEYS:
                settings[key] = cfg[key]
            if not cfg.generation_from_run or "generation" not in source:
                settings.generation = cfg.generation
    check_generation(settings.generation)
    for key in ("users_per_batch", "batch_size"):
        setting_number(key, settings[key], 1, integer=True)
    base = load_base(settings.model, device=settings.device)
    prompt_format = build(settings.data.prompt_format)
    if settings.queries:
        requests = read_requests(settings.queries)
    else:
        datamodule = build(settings.data)
        prompt_format = datamodule.format  # with the run's layout of retrieved items
        requests = [Request(u.user_id, q) for u in datamodule.users for q in u.queries]
    if not requests:
        raise MilpError("no queries to answer")
    server = MixedServer(
        base.model,
        base.tokenizer,
        root,
        prompt_format,
        OmegaConf.to_container(settings.generation, resolve=True),
    )
    users = len({r.user_id for r in requests})
    stored = sum(server.has_memory(u) for u in {r.user_id for r in requests})
    for user_id in dict.fromkeys(r.user_id for r in requests):  # before any answer
        if server.has_memory(user_id):  # a corrupt memory is refused, never served
            verify_memory(root / user_slug(user_id), recorded_memory(root, user_id))
    started = time.perf_counter()
    engines = {"peft": server.answer_mixed, "routed": server.answer_routed}
    if settings.engine not in engines:
        raise MilpError(f"engine={settings.engine!r}: use peft or routed")
    answers, mixed = engines[settings.engine](
        requests, int(settings.users_per_batch), int(settings.batch_size)
    )
    mixed["seconds"] = time.perf_counter() - started
    out = Path(HydraConfig.get().runtime.output_dir) / "answers.jsonl"
    lines = [
        json.dumps(
            {
                "id": r.query.id,
                "user_id": r.user_id,
                "prediction": a,
                "gold": r.query.gold,
                "memory": server.has_memory(r.user_id),
            }
        )
        for r, a in zip(requests, answers, strict=True)
    ]
    atomic_write_text(out, "\n".join(lines) + "\n")
    report = {
        "queries": len(requests),
        "users": users,
        "users_with_memory": stored,
        "users_per_batch": int(settings.users_per_batch),
        "engine": str(settings.engine),
        "mixed": mixed,
        "answers": str(out),
    }
    print(f"{len(requests)} queries of {users} users ({stored} with a stored memory) -> {out}")
    print(
        f"mixed batches ({settings.engine}, {settings.users_per_batch} users per batch): "
        f"{mixed['seconds']:.2f} s, {len(requests) / mixed['seconds']:.1f} queries/s "
        f"(loading {mixed['load_seconds']:.2f} s, generating {mixed['generate_seconds']:.2f} s)"
    )
    if settings.compare_one_at_a_time:
        started = time.perf_counter()
        single, one = server.answer_one_at_a_time(requests)
        one["seconds"] = time.perf_counter() - started
        same = sum(a == b for a, b in zip(answers, single, strict=True))
        report |= {"one_at_a_time": one, "identical_answers": same}
        print(
            f"one user at a time: {one['seconds']:.2f} s, "
            f"{len(requests) / one['seconds']:.1f} queries/s (loading {one['load_seconds']:.2f} s,"
            f" generating {one['generate_seconds']:.2f} s)"
        )
        print(f"identical answers: {same}/{len(requests)}")
        print(f"mixed/one-at-a-time queries-per-second: {one['seconds'] / mixed['seconds']:.2f}x")
    atomic_write_text(out.with_name("throughput.json"), json.dumps(report, indent=2))
    return report


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_command(lambda: serve(cfg))


if __name__ == "__main__":
    main()
