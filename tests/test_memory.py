import re

import pytest
import torch
from peft import PeftModel

from milp.errors import MilpError
from milp.memory.adapters import load_memory, peft_module_states
from milp.memory.adapters import save_memory as save_states
from milp.memory.space import (
    MemoryConfig,
    inject_memory,
    place_memory,
    remove_memory,
    trainable_parameters,
)


def save_memory(peft_model, directory, info):
    """Save a live peft memory the way milp.train does."""
    config = next(iter(peft_model.peft_config.values()))
    return save_states(directory, peft_module_states(peft_model), config, info)


LORA_PARAM = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_[AB]\.(memory_\d+)\.weight$")


def trainable_places(model) -> set[tuple[int, str, str]]:
    places = set()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            match = LORA_PARAM.search(name)
            assert match, f"unexpected trainable parameter {name}"
            places.add((int(match.group(1)), match.group(3), match.group(4)))
    return places


@pytest.mark.parametrize(
    "layers, expected",
    [
        ("all", [0, 1, 2, 3]),
        ("top_half", [2, 3]),
        ("bottom_half", [0, 1]),
        ("every_other", [0, 2]),
        ([3, 1], [1, 3]),
    ],
)
def test_memory_goes_to_the_chosen_layers_and_ffn_only(llama, layers, expected):
    model = inject_memory(llama, MemoryConfig(num_loras=2, rank=4, layers=layers))
    ffn = ["down_proj", "gate_proj", "up_proj"]
    assert trainable_places(model) == {
        (layer, module, f"memory_{i}") for layer in expected for module in ffn for i in range(2)
    }
    # rank 4, hidden 32, ffn 64: per module A+B = 4*(in+out) = 4*96; 3 modules, 2 memories.
    assert trainable_parameters(model) == len(expected) * 3 * 2 * 4 * 96


def test_attention_and_explicit_modules(llama):
    model = inject_memory(
        llama,
        MemoryConfig(num_loras=1, rank=2, layers=[0], target_modules=["attention", "up_proj"]),
    )
    assert {m for _, m, _ in trainable_places(model)} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "up_proj",
    }


@pytest.mark.parametrize(
    "config, message",
    [
        (
            dict(layers=[0, 4]),
            "memory.layers: layer index 4 is out of range; the model has 4 layers",
        ),
        (dict(target_modules=["lm_head_x"]), "memory.target_modules: 'lm_head_x' is not a linear"),
        (dict(rank=0), "memory.rank must be an integer >= 1, got 0"),
        (
            dict(rank=64),
            "memory.rank=64 is above the width of model.layers.0.mlp.gate_proj (32 x 64); "
            "at most 32",
        ),
        (dict(layers="middle"), "memory.layers: unknown preset 'middle'"),
        (dict(num_loras=-1), "memory.num_loras must be an integer in [0, 64], got -1"),
    ],
)
def test_invalid_memory_config_is_named(llama, config, message):
    with pytest.raises(MilpError, match=re.escape(message)):
        place_memory(MemoryConfig(**config), llama)


def test_save_load_round_trip_with_peft(llama, tmp_path):
    torch.manual_seed(1)
    model = inject_memory(llama, MemoryConfig(num_loras=2, rank=4, layers="top_half"))
    for parameter in model.parameters():
        if parameter.requires_grad:  # B starts at zero; make the memory non-trivial
            parameter.data.normal_(std=0.5)
    tokens = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        with_memory = model(tokens).logits
    directory = save_memory(model, tmp_path / "alice", {"user_id": "alice"})
    assert sorted(p.name for p in directory.iterdir()) == ["memory.json", "memory_0", "memory_1"]
    assert (directory / "memory_0" / "adapter_model.safetensors").is_file()

    base = remove_memory(model)
    with torch.no_grad():
        assert not torch.allclose(base(tokens).logits, with_memory)

    restored = load_memory(base, directory)
    with torch.no_grad():
        torch.testing.assert_close(restored(tokens).logits, with_memory)
    assert trainable_parameters(restored) == 0

    # Each memory module alone is a standard peft adapter.
    base = remove_memory(restored)
    single = PeftModel.from_pretrained(base, directory / "memory_0")
    assert single.peft_config["default"].r == 4


def test_save_replaces_atomically(llama, tmp_path):
    model = inject_memory(llama, MemoryConfig(num_loras=1, rank=2))
    save_memory(model, tmp_path / "u", {"version": 1})
    save_memory(model, tmp_path / "u", {"version": 2})
    assert '"version": 2' in (tmp_path / "u" / "memory.json").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["u"]  # no temporary leftovers


def test_remove_memory_restores_the_base(llama):
    tokens = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        before = llama(tokens).logits
    model = inject_memory(llama, MemoryConfig(num_loras=1, rank=2))
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data.fill_(0.1)
    base = remove_memory(model)
    with torch.no_grad():
        torch.testing.assert_close(base(tokens).logits, before)
    assert not any("lora" in name for name, _ in base.named_parameters())


@pytest.mark.parametrize(
    "window, expected",
    [
        ((0, 4), [0, 1, 2, 3]),
        ((1, 2), [1, 2]),
        ((2, 8), [2, 3]),  # clipped at the top layer
        ((3, 1), [3]),
        ((1, None), [1, 2, 3]),  # no length: up to the top
    ],
)
def test_layer_window_places_a_contiguous_block(llama, window, expected):
    start, length = window
    config = MemoryConfig(num_loras=1, rank=2, layers=[0], window_start=start, window_length=length)
    assert place_memory(config, llama).layers == expected  # the window replaces `layers`
    model = inject_memory(llama, config)
    assert {layer for layer, _, _ in trainable_places(model)} == set(expected)


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(window_start=4, window_length=1), "memory.window_start: layer 4 is out of range"),
        (dict(window_start=-1), "memory.window_start must be >= 0"),
        (dict(window_start=0, window_length=0), "memory.window_length must be >= 1"),
        (dict(window_length=2), "memory.window_length is set but memory.window_start is not"),
        (dict(window_start=1.5), "memory.window_start must be an integer or null"),
        (dict(target_modules="ffn+"), "memory.target_modules: empty name"),
        (dict(target_modules="ffn+mlp_x"), "memory.target_modules: 'mlp_x' is not a linear"),
    ],
)
def test_invalid_window_or_alias_is_named(llama, config, message):
    with pytest.raises(MilpError, match=re.escape(message)):
        place_memory(MemoryConfig(**config), llama)


@pytest.mark.parametrize(
    "alias, expected",
    [
        ("ffn", {"gate_proj", "up_proj", "down_proj"}),
        ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
        (
            "ffn+attention",
            {"gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"},
        ),
        ("attention+up_proj", {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj"}),
    ],
)
def test_target_modules_string_alias(llama, alias, expected):
    config = MemoryConfig(num_loras=1, rank=2, layers=[1], target_modules=alias)
    assert config.target_modules == alias.split("+")  # a plain, serializable list
    assert set(place_memory(config, llama).modules) == expected
    model = inject_memory(llama, config)
    assert {module for _, module, _ in trainable_places(model)} == expected
