"""The fast-path blocks (milp.inject.fast) compute what the plain forward computes."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from milp.data.datamodule import IGNORE_INDEX, pad_right
from milp.inject.fast import (
    FastPath,
    bf16_frozen_weights,
    bf16_supported,
    cpu_attention,
    fast_autocast,
    fast_training,
)
from milp.inject.loss import pack_rows, target_loss
from milp.inject.prefix import PrefixCache, prefix_bytes
from milp.memory.space import MemoryConfig, inject_memory, remove_memory
from milp.models.tiny import length_bucketed_batches


def make_batch(lengths, prompt_lengths, vocab=100, seed=0):
    """Right-padded rows of random tokens; the loss falls after each row's prompt."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for n, p in zip(lengths, prompt_lengths, strict=True):
        row = torch.randint(3, vocab, (n,), generator=g).tolist()
        ids.append(row)
        labels.append([IGNORE_INDEX] * p + row[p:])
    return {
        "input_ids": pad_right(ids, 0),
        "attention_mask": pad_right([[1] * len(r) for r in ids], 0),
        "labels": pad_right(labels, IGNORE_INDEX),
    }


def subset(batch, rows):
    """Some rows of a batch, trimmed to their own longest row (another padding width)."""
    index = torch.tensor(rows)
    width = int(batch["attention_mask"][index].sum(1).max())
    return {k: v[index, :width] for k, v in batch.items()}


def with_memory(llama, layers):
    """peft memory on `layers`, with non-zero B so every LoRA weight gets a gradient."""
    model = inject_memory(llama, MemoryConfig(rank=4, layers=layers, dropout=0.0))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return model


def loss_and_grads(model, batch, prefix=None):
    for p in model.parameters():
        p.grad = None
    loss = target_loss(model, batch, prefix).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


BATCH = dict(lengths=[5, 12, 9, 7], prompt_lengths=[2, 6, 0, 7])


def test_target_only_loss_equals_full_loss(llama):
    batch = make_batch(**BATCH)
    for model in (llama, with_memory(llama, [1, 2, 3])):
        expected = model(**batch).loss
        rows = target_loss(model, batch)
        assert torch.allclose(rows.mean(), expected, rtol=1e-6, atol=1e-6)
        # Per-group means are each group's own loss (the batched path's per-user loss).
        means, counts = rows.per_group(torch.tensor([0, 1, 1, 0]), 3)
        assert torch.allclose(means[1], model(**subset(batch, [1, 2])).loss, rtol=1e-5)
        assert counts.tolist() == [3 + 0, 6 + 8, 0]


def test_post_processed_logits_use_the_full_forward(llama):
    batch = make_batch(**BATCH)
    llama.config.logit_scale = 1.0  # a model whose logits are not lm_head(hidden)
    try:
        assert torch.allclose(target_loss(llama, batch).mean(), llama(**batch).loss, rtol=1e-6)
    finally:
        del llama.config.logit_scale


@pytest.mark.parametrize("start", [0, 2])
def test_prefix_cache_gives_the_same_loss_and_gradients(llama, start):
    model = with_memory(llama, list(range(start, 4)))
    batch = make_batch(**BATCH)
    cache = PrefixCache(model, start)
    assert cache.enabled, cache.reason
    expected_loss, expected_grads = loss_and_grads(model, batch)
    assert expected_grads and all(g.abs().sum() > 0 for g in expected_grads.values())
    first_loss, first_grads = loss_and_grads(model, batch, cache)  # fills the cache
    assert cache.misses == 4 and cache.hits == 0
    # A later epoch: other groupings and padding widths, states replayed from the cache.
    part = subset(batch, [3, 0])
    part_loss, part_grads = loss_and_grads(model, part)
    replay_loss, replay_grads = loss_and_grads(model, part, cache)
    assert cache.hits == 2
    for (loss, grads), (ref_loss, ref_grads) in (
        ((first_loss, first_grads), (expected_loss, expected_grads)),
        ((replay_loss, replay_grads), (part_loss, part_grads)),
    ):
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert torch.allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6), name
    assert cache.nbytes == prefix_bytes(5 + 12 + 9 + 7, llama.config.hidden_size)


@pytest.mark.skipif(not bf16_supported("cpu"), reason="no bf16 matrix units on this CPU")
def test_prefix_cache_under_bf16_autocast(llama):
    model = with_memory(llama, [2, 3])
    batch = make_batch(**BATCH)
    cache = PrefixCache(model, 2)
    with fast_autocast("cpu", bf16=True):
        expected_loss, expected_grads = loss_and_grads(model, batch)
        loss_and_grads(model, batch, cache)
        loss, grads = loss_and_grads(model, batch, cache)  # replayed
    assert cache.hits == 4
    assert torch.allclose(loss, expected_loss, rtol=2e-2)
    for name in grads:
        scale = expected_grads[name].abs().max()
        assert (grads[name] - expected_grads[name]).abs().max() <= 5e-2 * scale, name


def test_packed_rows_give_the_same_loss_and_gradients(llama):
    model = with_memory(llama, [2, 3])
    batch = make_batch(**BATCH)
    expected_loss, expected_grads = loss_and_grads(model, batch)
    packed = pack_rows(batch, pad_id=0)
    assert packed["input_ids"].shape == (1, 5 + 12 + 9 + 7)
    cache = PrefixCache(model, 2)

    def check(prefix):
        loss, grads = loss_and_grads(model, packed, prefix)
        assert torch.allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
        for name in grads:
            assert torch.allclose(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6)

    for prefix in (None, cache, cache):  # full forward, cache filled, cache replayed
        check(prefix)
    with cpu_attention(model, "cpu") as implementation:  # packed masks in eager attention
        assert implementation == "eager"
        check(None)
        check(cache)
    assert llama.config._attn_implementation == "sdpa"
    assert cache.hits == 8 and cache.misses == 4
    # One packed row per group (a bank slot): each group's mean is its own loss, and
    # the shorter row's end padding changes nothing.
    groups = [1, 0, 0, 1]
    by_group = pack_rows(batch, groups, pad_id=0)
    assert by_group["groups"].tolist() == [1, 0]
    means, _ = target_loss(model, by_group, cache, owners=[1, 0]).per_group(by_group["groups"], 2)
    assert torch.allclose(means[0], model(**subset(batch, [1, 2])).loss, rtol=1e-5)
    assert torch.allclose(means[1], model(**subset(batch, [0, 3])).loss, rtol=1e-5)
    # Rows capped at the padded width (12): longest first into the first row with room.
    capped = pack_rows(batch, pad_id=0, max_width=12)
    assert capped["segment_lengths"].tolist() == [[12, 0], [9, 0], [5, 7]]
    assert capped["input_ids"].shape == (3, 12)
    loss, grads = loss_and_grads(model, capped, None)
    assert torch.allclose(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for name in grads:
        assert torch.allclose(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6)
    by_group = pack_rows(batch, groups, pad_id=0, max_width=12)
    assert by_group["groups"].tolist() == [1, 0, 0]  # a group's rows stay adjacent


def test_prefix_cache_memory_cap_and_release(llama):
    model = with_memory(llama, [2, 3])
    batch = make_batch(**BATCH)
    capped = PrefixCache(model, 2, max_bytes=0)
    expected, _ = loss_and_grads(model, batch)
    for _ in range(2):  # nothing stored: every row recomputed, same loss
        assert torch.allclose(loss_and_grads(model, batch, capped)[0], expected, rtol=1e-5)
    assert capped.nbytes == 0 and capped.not_stored == 8 and capped.hits == 0

    cache = PrefixCache(model, 2)
    with torch.no_grad():
        cache.final_hidden(batch, owners=["a", "b", "b", "a"])
    cache.release("b")
    assert cache.nbytes == prefix_bytes(5 + 7, llama.config.hidden_size)
    cache.clear()
    assert cache.nbytes == 0 and not cache.entries


def test_prefix_cache_refuses_left_padding_and_other_models(llama):
    model = with_memory(llama, [2, 3])
    batch = make_batch(**BATCH)
    left = {k: v.flip(1) for k, v in batch.items()}
    with pytest.raises(ValueError, match="right-padded"):
        PrefixCache(model, 2).final_hidden(left)
    remove_memory(model)
    model = with_memory(llama, [1, 2, 3])
    assert "trainable" in PrefixCache(model, 2).reason
    remove_memory(model)
    assert "not a layer" in PrefixCache(llama, 4).reason
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).eval()
    assert not PrefixCache(gpt2, 1).enabled  # falls back: the caller uses the full forward


def test_length_buckets_are_deterministic_permutations():
    lengths = [int(x) for x in torch.randint(1, 200, (103,), generator=torch.Generator())]

    def draw(seed):
        return length_bucketed_batches(lengths, 8, torch.Generator().manual_seed(seed), 4)

    batches = draw(3)
    assert batches == draw(3) and batches != draw(4)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert all(len(b) == 8 for b in batches if b is not batches[-1]) or len(batches) == 13
    # Sorting within windows leaves far less padding than a plain shuffle.
    shuffled = torch.randperm(103, generator=torch.Generator().manual_seed(3)).tolist()

    def padding(groups):
        return sum(len(g) * max(lengths[i] for i in g) - sum(lengths[i] for i in g) for g in groups)

    assert padding(batches) < 0.5 * padding([shuffled[i : i + 8] for i in range(0, 103, 8)])


def test_bf16_weights_match_autocast_casts(llama):
    embedding = llama.get_input_embeddings().weight
    llama.lm_head.weight = embedding  # tied, as in SmolLM2: the head's copy is its own
    model = with_memory(llama, [2, 3])
    batch = make_batch(**BATCH)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_loss, expected_grads = loss_and_grads(model, batch)
        with bf16_frozen_weights(model) as swapped:
            assert swapped == 4 * 7 + 1  # q k v o gate up down per layer, and the head
            assert llama.get_input_embeddings().weight is embedding
            loss, grads = loss_and_grads(model, batch)
    assert llama.lm_head.weight is embedding and embedding.dtype == torch.float32
    assert torch.equal(loss, expected_loss)
    for name in grads:
        assert torch.allclose(grads[name], expected_grads[name], rtol=1e-5, atol=1e-7), name


def test_fast_autocast_falls_back_to_float32():
    a = torch.randn(4, 4)
    with fast_autocast("cpu", bf16=False):
        assert (a @ a).dtype == torch.float32
    with fast_autocast("cpu"):
        expected = torch.bfloat16 if bf16_supported("cpu") else torch.float32
        assert (a @ a).dtype == expected


def test_fresh_tensors_go_unfilled_only_while_training(llama):
    """The NaN fill that deterministic mode adds to every new tensor is off while the
    fast path trains, back on while it pauses (answering) and after it ends."""
    flag = torch.utils.deterministic
    assert flag.fill_uninitialized_memory
    with fast_training(llama, FastPath(), "cpu", start_layer=0) as session:
        assert not flag.fill_uninitialized_memory
        with session.paused():
            assert flag.fill_uninitialized_memory
        assert not flag.fill_uninitialized_memory
    assert flag.fill_uninitialized_memory
