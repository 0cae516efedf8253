"""The one trainer (milp/inject/{bank,schedule,module,injector}.py) against peft, the
reference (its placement, initialisation, file format and training with torch's AdamW),
and incremental memory (memory.resume_from): real tiny models, real peft, real
milp.train processes."""

import hashlib
import itertools
import json
import signal
import time
from contextlib import nullcontext

import pytest
import torch
from conftest import ROOT, TINY_MODEL_OVERRIDES, run_milp, start_milp
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

from milp.inject import TrainedUser, seed_user
from milp.inject.answer import answer_queries
from milp.inject.bank import MemoryBank, fresh_weights
from milp.inject.slot_optim import SlotAdamW, clip_grad_norm_per_slot
from milp.memory.adapters import (
    adapter_config,
    bank_module_states,
    load_memory,
    peft_module_states,
    read_bank_weights,
    save_memory,
    split_modules,
    stack_modules,
)
from milp.memory.space import MemoryConfig, Target, inject_memory, place_memory, remove_memory
from milp.run.store import adapters_dir, user_memory

MEMORY = MemoryConfig(num_loras=2, rank=4, alpha=8, layers=[1, 3], target_modules=["ffn", "q_proj"])


def bank_weights(peft_model, targets, memory):
    """A peft model's memories in bank layout."""
    states = {
        n: get_peft_model_state_dict(peft_model, adapter_name=n) for n in memory.adapter_names
    }
    out = []
    for t in targets:
        key = f"base_model.model.{t.path}"
        a = torch.cat([states[n][f"{key}.lora_A.weight"] for n in memory.adapter_names])
        b = torch.cat([states[n][f"{key}.lora_B.weight"] for n in memory.adapter_names], 1)
        out.append((a, b))
    return out


@pytest.mark.parametrize(
    "memory",
    [
        MEMORY,
        MemoryConfig(num_loras=1, rank=2, layers="top_half", target_modules=["attention"]),
        MemoryConfig(rank=2, window_start=2, window_length=9, target_modules="ffn+attention"),
        MemoryConfig(rank=2, layers="all", target_modules=["q_proj", "v_proj"]),
    ],
)
def test_placement_finds_the_modules_peft_puts_memory_on(llama, memory):
    """The placement's targets, computed without injecting, are peft's, in peft's order."""
    peft_model = inject_memory(llama, memory)
    try:
        injected = [
            Target(path, m.in_features, m.out_features)
            for path, m in peft_model.base_model.model.named_modules()
            if isinstance(m, LoraLayer)
        ]
    finally:
        remove_memory(peft_model)
    assert injected and place_memory(memory, llama).targets == injected


def test_stacked_modules_are_their_sum_and_split_back_exactly(llama):
    """One rank-K*r LoRA (alpha K*alpha) from K modules of rank r gives peft's output with
    all K active, and splits back into the K modules bit for bit."""
    torch.manual_seed(3)
    peft_model = inject_memory(llama, MEMORY)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        reference = peft_model(input_ids=ids).logits
    states = peft_module_states(peft_model)
    remove_memory(peft_model)
    modules = [states[n] for n in MEMORY.adapter_names]
    stacked = stack_modules(modules)
    for part, module in zip(split_modules(stacked, len(modules)), modules, strict=True):
        assert part.keys() == module.keys()
        assert all(torch.equal(part[k], module[k]) for k in module)
    one = MemoryConfig(
        num_loras=1,
        rank=MEMORY.num_loras * MEMORY.rank,
        alpha=MEMORY.num_loras * MEMORY.alpha,
        layers=MEMORY.layers,
        target_modules=MEMORY.target_modules,
    )
    peft_model = inject_memory(llama, one)
    set_peft_model_state_dict(peft_model, stacked, adapter_name=one.adapter_names[0])
    with torch.no_grad():
        merged = peft_model(input_ids=ids).logits
    remove_memory(peft_model)
    assert torch.allclose(merged, reference, atol=1e-5)


def test_fresh_weights_are_peft_init_bit_for_bit(llama):
    targets = place_memory(MEMORY, llama).targets
    assert len(targets) == 2 * 4  # 2 layers x (gate, up, down, q)
    torch.manual_seed(7)
    ours = fresh_weights(targets, MEMORY)
    torch.manual_seed(7)
    peft_model = inject_memory(llama, MEMORY)
    reference = bank_weights(peft_model, targets, MEMORY)
    remove_memory(peft_model)
    for (a, b), (ra, rb) in zip(ours, reference, strict=True):
        assert torch.equal(a, ra) and torch.equal(b, rb)


def test_routed_rows_use_only_their_own_users_memory(llama):
    targets = place_memory(MEMORY, llama).targets
    references, weights = [], []
    ids = torch.randint(0, 100, (3, 9))
    for seed in (1, 2):
        torch.manual_seed(seed)
        peft_model = inject_memory(llama, MEMORY)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.3)
        with torch.no_grad():
            references.append(peft_model(input_ids=ids).logits)
        weights.append(bank_weights(peft_model, targets, MEMORY))
        llama = remove_memory(peft_model)
    with torch.no_grad():
        plain = llama(input_ids=ids).logits
    bank = MemoryBank(targets, 3, MEMORY)
    bank.load_user(0, weights[1])
    bank.load_user(2, weights[0])
    with bank.attached(llama), bank.routing([2, 0, -1]), torch.no_grad():
        routed = llama(input_ids=ids).logits
    torch.testing.assert_close(routed[0], references[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed[1], references[1][1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed[2], plain[2], rtol=0, atol=0)
    assert (references[0][0] - plain[0]).abs().max() > 1e-2  # the memories do matter
    assert all(not type(m).__name__ == "RoutedLinear" for m in llama.modules())  # detached

    # Gradients reach only the slots the rows were routed to.
    llama.train()
    with bank.attached(llama), bank.routing([2, 2, 2]):
        llama(input_ids=ids).logits.sum().backward()
    assert bank.lora_A[0].grad[2].abs().sum() > 0
    assert bank.lora_A[0].grad[[0, 1]].abs().sum() == 0
    assert bank.lora_B[0].grad[[0, 1]].abs().sum() == 0


def test_exported_memory_is_plain_peft(llama, tmp_path):
    targets = place_memory(MEMORY, llama).targets
    torch.manual_seed(3)
    peft_model = inject_memory(llama, MEMORY)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path / "peft")  # peft's own writer: the reference
    weights = bank_weights(peft_model, targets, MEMORY)
    from_peft = peft_module_states(peft_model)
    llama = remove_memory(peft_model)
    config = adapter_config(MEMORY, place_memory(MEMORY, llama), llama)
    save_memory(tmp_path / "ours", bank_module_states(targets, weights, MEMORY), config, {})
    save_memory(tmp_path / "ours_peft", from_peft, config, {})
    for name in MEMORY.adapter_names:
        assert load_file(tmp_path / "ours_peft" / name / "adapter_model.safetensors").keys() == (
            load_file(tmp_path / "ours" / name / "adapter_model.safetensors").keys()
        )
        ours = load_file(tmp_path / "ours" / name / "adapter_model.safetensors")
        theirs = load_file(tmp_path / "peft" / name / "adapter_model.safetensors")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        config = [
            json.loads((tmp_path / d / name / "adapter_config.json").read_text())
            for d in ("ours", "peft")
        ]
        for c in config:
            c["target_modules"] = sorted(c["target_modules"])
        assert config[0] == config[1]
    assert json.loads((tmp_path / "ours" / "memory.json").read_text())["adapters"] == [
        "memory_0",
        "memory_1",
    ]
    for back, reference in zip(
        read_bank_weights(tmp_path / "ours", targets, MEMORY), weights, strict=True
    ):
        assert torch.equal(back[0], reference[0]) and torch.equal(back[1], reference[1])

    ids = torch.randint(0, 100, (2, 5))
    loaded = load_memory(llama, tmp_path / "ours")
    with torch.no_grad():
        both = loaded(input_ids=ids).logits
    llama = remove_memory(loaded)
    single = PeftModel.from_pretrained(llama, tmp_path / "ours" / "memory_0")
    assert single.peft_config["default"].r == MEMORY.rank
    llama = single.unload()
    bank = MemoryBank(targets, 1, MEMORY)
    bank.load_user(0, weights)
    with bank.attached(llama), bank.routing([0, 0]), torch.no_grad():
        torch.testing.assert_close(llama(input_ids=ids).logits, both, rtol=1e-5, atol=1e-5)


def test_slot_optimizer_and_clipping_match_torch_per_user():
    """Per slot: torch AdamW (+ warmup) and clip_grad_norm_, with users stepping unevenly."""
    memory = MemoryConfig(num_loras=1, rank=2, alpha=4)
    targets = [Target("a", 5, 3), Target("b", 3, 4)]
    bank = MemoryBank(targets, 3, memory)
    torch.manual_seed(0)
    for p in [*bank.lora_A, *bank.lora_B]:
        p.data.normal_()
    singles = [
        [p.detach()[s].clone().requires_grad_(True) for p in [*bank.lora_A, *bank.lora_B]]
        for s in range(3)
    ]
    opts = [torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1) for ps in singles]
    warm = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: min(1.0, (i + 1) / 3)) for o in opts]
    ours = SlotAdamW(bank, lr=0.05, weight_decay=0.1, warmup_steps=3)
    for step in range(6):
        active = [s for s in range(3) if (step + s) % 3]  # each slot sits some steps out
        grads = [torch.randn_like(p) * 5 for p in [*bank.lora_A, *bank.lora_B]]
        for p, g in zip([*bank.lora_A, *bank.lora_B], grads, strict=True):
            p.grad = g.clone()
            p.grad[[s for s in range(3) if s not in active]] = 0
        clip_grad_norm_per_slot(bank, 1.0)
        ours.active = active
        ours.step()
        ours.zero_grad()
        for s in active:
            for p, g in zip(singles[s], grads, strict=True):
                p.grad = g[s].clone()
            torch.nn.utils.clip_grad_norm_(singles[s], 1.0)
            opts[s].step()
            warm[s].step()
            opts[s].zero_grad()
    for s in range(3):
        for p, single in zip([*bank.lora_A, *bank.lora_B], singles[s], strict=True):
            torch.testing.assert_close(p.detach()[s], single.detach(), rtol=1e-6, atol=1e-6)


def compose(milp_cache, monkeypatch, *overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    monkeypatch.setenv("MILP_CACHE_DIR", str(milp_cache))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(
            "train",
            overrides=[
                "+experiment=lamp",
                *TINY_MODEL_OVERRIDES,
                "callbacks=none",
                "logger=none",
                "trainer.enable_progress_bar=false",
                "generation.max_new_tokens=8",
                *overrides,
            ],
        )


def adapters(directory):
    return {
        f"{f.parent.parent.name}/{f.parent.name}/{k}": v
        for f in sorted(directory.rglob("adapter_model.safetensors"))
        for k, v in load_file(f).items()
    }


def inject_users(
    cfg, base, memory, dm, users, out, injection: str, users_per_batch: int = 1, fast=None
):
    """Run one injector over `users` as milp.train does; returns the result records.
    `fast`: overrides of `injection.fast` (a mapping), or False for the plain path."""
    from omegaconf import OmegaConf, open_dict

    import milp.train as milp_train
    from milp.data.users import user_hash
    from milp.run.assemble import make_injector
    from milp.run.store import RunStore

    with open_dict(cfg):
        cfg.injection = OmegaConf.load(ROOT / "conf" / "injection" / f"{injection}.yaml")
        if injection == "batched":
            cfg.injection.users_per_batch = users_per_batch
        if fast is False:
            cfg.injection.fast = False
        elif fast:
            cfg.injection.fast = OmegaConf.merge(cfg.injection.fast, fast)
    placement = place_memory(memory, base.model)
    injector = make_injector(cfg, base, memory, placement, dm)
    store = RunStore(out, {"config": "x", "model": "x", "data": "x"})
    data = {u.user_id: user_hash(u) for u in users}
    inputs = milp_train.users_inputs(store, injector, users, data)
    return {
        t.user.user_id: milp_train.store_user(
            store, t, memory, placement, base, inputs[t.user.user_id]
        )
        for t in injector.run(users)
    }


def peft_reference(cfg, base, memory, dm, user):
    """One user's memory as peft trains it: fresh peft modules after the user's seed,
    torch's AdamW and clip_grad_norm_, the user's batches epoch by epoch as a Lightning
    fit draws them, float32, padded batches; answered through peft (its adapters
    switched off for the no-memory answers). Returns the user's result record and its
    memory modules."""
    seed_user(cfg.seed, user.seed_id)
    model = inject_memory(base.model, memory, place_memory(memory, base.model))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    loader = dm.select(user).train_dataloader()
    try:
        for _ in range(cfg.trainer.max_epochs):
            for batch in itertools.islice(loader, len(loader)):
                loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, cfg.trainer.gradient_clip_val)
                optimizer.step()
                optimizer.zero_grad()

        def switch(user_ids, use_memory):
            return nullcontext() if use_memory else model.disable_adapter()

        answers = answer_queries(
            model, base.tokenizer, dm, [user], switch, dict(cfg.generation), True
        )
        states = peft_module_states(model)
        count = sum(p.numel() for p in trainable)
        record = TrainedUser(user, answers, states, count, loss.item(), 0.0, 0.0).record()
        return record, states
    finally:
        base.model = remove_memory(model)


# Float32 paths: the plain one, and the exact fast-path pieces (packing, target-only
# logits, with memory on the top half: the prefix cache below it).
EXACT = {
    "plain": (False, []),
    "packed": ({"bf16": False}, []),
    "prefix-cache": ({"bf16": False}, ["memory.layers=top_half"]),
}


@pytest.mark.parametrize("case", sorted(EXACT))
def test_one_trainer_gives_pefts_memories_and_answers(milp_cache, monkeypatch, tmp_path, case):
    """users_per_batch=1 and 3 against peft trained by torch: same seed, same weights."""
    from hydra.utils import instantiate

    fast, extra = EXACT[case]
    cfg = compose(milp_cache, monkeypatch, "data.users.max_users=3", "trainer.max_epochs=2", *extra)
    memory = instantiate(cfg.memory)
    dm, base = instantiate(cfg.data), instantiate(cfg.model)
    dm.attach_tokenizer(base.tokenizer)
    users = dm.users
    reference = {u.user_id: peft_reference(cfg, base, memory, dm, u) for u in users}
    layers = 2 if extra else 4
    for users_per_batch in (1, 3):
        out = tmp_path / f"batched{users_per_batch}"
        batched = inject_users(cfg, base, memory, dm, users, out, "batched", users_per_batch, fast)
        # users x memories x layers x ffn x (A, B)
        assert len(adapters(out)) == 3 * 2 * layers * 3 * 2
        for uid, (record, states) in reference.items():
            saved = user_memory(adapters_dir(out), uid)
            assert sorted(states) == sorted(p.name for p in saved.glob("memory_*"))
            for name, module in states.items():
                ours = load_file(saved / name / "adapter_model.safetensors")
                assert ours.keys() == module.keys()
                for key, value in module.items():
                    # Float32 rounding differs (summation order: packed rows, one stacked
                    # product for the modules instead of peft's one per module); Adam's
                    # normalized steps carry it along, so the tolerance is a small
                    # fraction of one step (lr=1e-2).
                    torch.testing.assert_close(ours[key], value, rtol=0, atol=2e-4)
            other = batched[uid]
            assert other["train_loss"] == pytest.approx(record["train_loss"], rel=1e-4)
            assert other["trainable_parameters"] == record["trainable_parameters"]
            assert [p["prediction"] for p in other["predictions"]] == [
                p["prediction"] for p in record["predictions"]
            ]
            assert other["no_memory"] == record["no_memory"]
            assert other["memory"] == pytest.approx(record["memory"])


def test_bf16_fast_path_trains_to_the_float32_loss(milp_cache, monkeypatch, tmp_path):
    """The default fast path (bf16 autocast where the CPU has bf16) ends each user's
    training within 3% of the float32 path's loss, one user or three per step."""
    from hydra.utils import instantiate

    from milp.inject.fast import bf16_supported

    if not bf16_supported("cpu"):
        pytest.skip("this CPU has no bf16 matrix units: the fast path stays float32")
    cfg = compose(milp_cache, monkeypatch, "data.users.max_users=3", "trainer.max_epochs=2")
    memory = instantiate(cfg.memory)
    dm, base = instantiate(cfg.data), instantiate(cfg.model)
    dm.attach_tokenizer(base.tokenizer)
    plain = inject_users(
        cfg, base, memory, dm, dm.users, tmp_path / "plain", "sequential", 1, False
    )
    for injection in ("sequential", "batched"):
        fast = inject_users(cfg, base, memory, dm, dm.users, tmp_path / injection, injection, 3)
        for user_id, record in plain.items():
            assert fast[user_id]["train_loss"] == pytest.approx(record["train_loss"], rel=0.03)
            assert fast[user_id]["train_loss"] != record["train_loss"]  # bf16 did run


def test_unfilled_allocations_change_no_memory_bit(milp_cache, monkeypatch, tmp_path):
    """Training leaves fresh tensors unfilled (`unfilled_allocations`), which
    deterministic mode (`trainer.deterministic`) would NaN-fill: with the fill kept on,
    every saved memory is the same to the bit, one user or three per step."""
    from contextlib import nullcontext

    from hydra.utils import instantiate

    import milp.inject.fast

    cfg = compose(milp_cache, monkeypatch, "data.users.max_users=3", "trainer.max_epochs=1")
    assert cfg.trainer.deterministic  # what turns the fill on
    memory = instantiate(cfg.memory)
    dm, base = instantiate(cfg.data), instantiate(cfg.model)
    dm.attach_tokenizer(base.tokenizer)
    for users_per_batch in (1, 3):
        out = tmp_path / f"unfilled{users_per_batch}"
        inject_users(cfg, base, memory, dm, dm.users, out, "batched", users_per_batch)
        with monkeypatch.context() as patch:
            patch.setattr(milp.inject.fast, "unfilled_allocations", nullcontext)
            filled = tmp_path / f"filled{users_per_batch}"
            inject_users(cfg, base, memory, dm, dm.users, filled, "batched", users_per_batch)
        ours, theirs = adapters(out), adapters(filled)
        assert ours.keys() == theirs.keys() and ours
        for key, value in ours.items():
            assert torch.equal(value, theirs[key]), key


def test_a_trainer_stopped_early_is_an_error_not_a_shorter_training(
    milp_cache, monkeypatch, tmp_path
):
    """Each user trains for trainer.max_epochs: a Trainer that stops mid-way (here its
    max_time) would hand out memories trained for fewer steps, so it is refused."""
    from hydra.utils import instantiate

    from milp.errors import MilpError

    cfg = compose(
        milp_cache, monkeypatch, "data.users.max_users=2", "+trainer.max_time=00:00:00:00"
    )
    memory = instantiate(cfg.memory)
    dm, base = instantiate(cfg.data), instantiate(cfg.model)
    dm.attach_tokenizer(base.tokenizer)
    with pytest.raises(MilpError, match="stopped before its users' steps were done"):
        inject_users(cfg, base, memory, dm, dm.users, tmp_path / "run", "batched", 2)
    assert not list((tmp_path / "run").glob("users/*.json"))


def test_resume_from_continues_the_stored_memory(milp_cache, monkeypatch, tmp_path):
    """With lr=0 a resumed memory comes out exactly as stored: it started from it."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    cfg = compose(milp_cache, monkeypatch, "data.users.max_users=2", "trainer.max_epochs=1")
    memory = instantiate(cfg.memory)
    dm, base = instantiate(cfg.data), instantiate(cfg.model)
    dm.attach_tokenizer(base.tokenizer)
    inject_users(cfg, base, memory, dm, dm.users, tmp_path / "first", "sequential")
    stored = adapters(tmp_path / "first")
    with open_dict(cfg):
        cfg.optim.lr = 0.0
        cfg.memory.resume_from = str(tmp_path / "first")
    memory = instantiate(cfg.memory)
    inject_users(cfg, base, memory, dm, dm.users, tmp_path / "seq", "sequential")
    inject_users(cfg, base, memory, dm, dm.users, tmp_path / "b", "batched", 2)
    for run in ("seq", "b"):
        again = adapters(tmp_path / run)
        assert again.keys() == stored.keys()
        assert all(torch.equal(again[k], stored[k]) for k in stored)


def tree_digest(directory):
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


FAST = [
    "+experiment=lamp",
    *TINY_MODEL_OVERRIDES,
    "data.users.max_users=3",
    "trainer.max_epochs=1",
    "memory.rank=2",
    "generation.max_new_tokens=8",
    "callbacks=none",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


def test_batched_run_and_incremental_update_that_crashes(milp_cache, tmp_path):
    """`milp.train injection=batched` writes a whole run (records in the data's order,
    plain peft memories); an update run (memory.resume_from) killed mid-way leaves the
    stored memories untouched."""
    old = tmp_path / "old"
    run_milp([*FAST, "injection=batched", f"hydra.run.dir={old}"], milp_cache)
    metrics = json.loads((old / "metrics.json").read_text())
    assert metrics["users"] == 3 and metrics["memory"]["examples"] == 9
    assert metrics["no_memory"]["examples"] == 9
    lines = (old / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["user_id"] for line in lines] == sorted(
        json.loads(line)["user_id"] for line in lines
    )  # the data's order, whatever order users finished in
    before = tree_digest(old / "adapters")
    assert len([k for k in before if k.endswith("memory.json")]) == 3

    # The update: all users continue from `old`; killed as soon as one user is saved. With
    # 2 slots the third user starts only when the first two are done; its 20 epochs keep
    # it training for seconds after the first save, far longer than the 50 ms poll.
    new = tmp_path / "new"
    update = [
        *FAST,
        "injection=batched",
        "injection.users_per_batch=2",
        "trainer.max_epochs=20",
        f"memory.resume_from={old}",
    ]
    process = start_milp([*update, f"hydra.run.dir={new}"], milp_cache)
    deadline = time.time() + 120
    while not list(new.glob("adapters/*/memory.json")) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL  # killed mid-update, not finished
    assert len(list(new.glob("users/*.json"))) < 3
    assert tree_digest(old / "adapters") == before  # the stored memories are untouched
    assert (old / "metrics.json").is_file()

    run_milp([*update, f"hydra.run.dir={new}"], milp_cache)  # finishes the update
    assert tree_digest(old / "adapters") == before
    updated, stored = adapters(new / "adapters"), adapters(old / "adapters")
    assert updated.keys() == stored.keys()
    assert max(float((updated[k] - stored[k]).abs().max()) for k in stored) > 1e-3


@pytest.mark.slow
def test_an_update_cannot_overwrite_the_stored_run(milp_cache, tmp_path):
    old = tmp_path / "old"
    run_milp([*FAST, "data.users.max_users=1", f"hydra.run.dir={old}"], milp_cache)
    before = tree_digest(old / "adapters")
    clash = run_milp(
        [*FAST, "data.users.max_users=1", f"memory.resume_from={old}", f"hydra.run.dir={old}"],
        milp_cache,
        check=False,
    )
    assert clash.returncode == 2 and "different configuration" in clash.stderr
    assert tree_digest(old / "adapters") == before
