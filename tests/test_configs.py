"""Every shipped config option composes, and builds where its packages are here.

Options are discovered from the config directories, so a new file is tested without
editing this one. Models and data that need a download or an optional package (the Hub
models, SmolLM2, Chit-Chat) are composed and their `_target_`s resolved, not loaded.
"""

import json
from pathlib import Path

import pytest
from conftest import ROOT, TINY_MODEL_OVERRIDES
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

CONF = ROOT / "conf"
LOADED_DATA = ("synthetic", "lamp4", "lamp5", "lamp7", "history", "chitchat", "shakespeare")
FIXTURES = ROOT / "tests" / "fixtures"
LOADED_MODELS = ("tiny",)


def options(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def composed(*overrides: str, hydra_config: bool = False) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra_config)


def targets(node) -> list[str]:
    """Every `_target_` in a config tree."""
    found = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append(node._target_)
        for key in node:
            found += targets(node._get_node(key))
    elif isinstance(node, ListConfig):
        for item in node:
            found += targets(item)
    return found


def assert_targets_resolve(cfg: DictConfig) -> None:
    for target in targets(cfg):
        assert callable(get_object(target)), target


@pytest.fixture
def cache(milp_cache, monkeypatch):
    monkeypatch.setenv("MILP_CACHE_DIR", str(milp_cache))
    return milp_cache


def lamp_files(directory: Path, task: str) -> Path:
    """A two-user LaMP dev split with the task's own profile fields."""
    fields = {
        "LaMP_4": {"text": "An article.", "title": "A headline"},
        "LaMP_5": {"abstract": "An abstract.", "title": "A title"},
        "LaMP_7": {"text": "A tweet."},
    }[task]
    directory.mkdir(parents=True)
    questions = [
        {"id": f"q{i}", "input": f"Query {i}.", "profile": [{"id": f"p{i}"} | fields]}
        for i in range(2)
    ]
    golds = [{"id": f"q{i}", "output": f"answer {i}"} for i in range(2)]
    (directory / "dev_questions.json").write_text(json.dumps(questions))
    (directory / "dev_outputs.json").write_text(json.dumps({"task": task, "golds": golds}))
    return directory


def data_overrides(option: str, tmp_path: Path) -> list[str]:
    if option.startswith("lamp"):
        path = lamp_files(tmp_path / option, f"LaMP_{option[-1]}")
        return [f"data.path={path}", "split=dev"]
    if option == "history":
        path = tmp_path / "users.jsonl"
        record = {"user_id": "u", "history": [{"prompt": "hi", "response": "hey"}]}
        path.write_text(json.dumps(record | {"queries": [{"prompt": "yo"}]}) + "\n")
        return [f"data.path={path}"]
    # The real dialogue sources, converted from their small excerpts in tests/fixtures.
    if option == "chitchat":
        corpus = FIXTURES / "chitchat.json"
        return [f"data.users.corpus={corpus}", "data.users.min_history=10"] + [
            f"data.users.{key}_users=1" for key in ("test", "dev")
        ]
    if option == "shakespeare":
        users = {"texts": FIXTURES / "shakespeare", "min_history": 5, "test_users": 2}
        return [f"data.users.{k}={v}" for k, v in users.items()] + [
            f"data.users.{key}_users=1" for key in ("dev", "train")
        ]
    return []


@pytest.mark.parametrize("option", options(CONF / "data"))
def test_every_data_option(option, cache, tmp_path):
    cfg = composed(f"data={option}", *data_overrides(option, tmp_path))
    assert_targets_resolve(cfg.data)
    if option in LOADED_DATA:
        datamodule = instantiate(cfg.data)
        assert datamodule.users and datamodule.name
        if option in ("chitchat", "shakespeare"):  # real sources name what they came from
            assert str(FIXTURES) in datamodule.source["path"]


@pytest.mark.parametrize("option", options(CONF / "model"))
def test_every_model_option(option, cache):
    overrides = ["model.name_or_path=some/model"] if option == "hf" else []
    if option in LOADED_MODELS:
        overrides += TINY_MODEL_OVERRIDES
    cfg = composed(f"model={option}", *overrides)
    assert_targets_resolve(cfg.model)
    if option in LOADED_MODELS:
        base = instantiate(cfg.model)
        assert base.tokenizer.pad_token_id is not None


@pytest.mark.parametrize("option", options(CONF / "injection"))
def test_every_injection_option_builds_an_injector(option, cache):
    from milp.inject.injector import Injector
    from milp.memory.space import place_memory
    from milp.run.assemble import make_injector

    cfg = composed("+experiment=lamp", f"injection={option}", *TINY_MODEL_OVERRIDES)
    memory, datamodule, base = (instantiate(cfg[k]) for k in ("memory", "data", "model"))
    datamodule.attach_tokenizer(base.tokenizer)
    placement = place_memory(memory, base.model)
    injector = make_injector(cfg, base, memory, placement, datamodule)
    assert isinstance(injector, Injector)
    assert injector.slots == {"sequential": 1, "batched": 16}[option]  # users per step


@pytest.mark.parametrize("option", options(CONF / "experiment"))
def test_every_experiment(option, cache):
    cfg = composed(f"+experiment={option}")
    assert_targets_resolve(cfg)
    instantiate(cfg.memory)
    with open_dict(cfg):
        cfg.paths.output_dir = "run"  # Hydra's run dir: known only inside a run
    OmegaConf.to_container(cfg, resolve=True)  # every other interpolation resolves


def flat(node: DictConfig) -> dict:
    """A composed config as dotted keys -> plain values (interpolations left as written)."""
    out = {}
    for key, value in OmegaConf.to_container(node, resolve=False).items():
        if isinstance(value, dict):
            out |= {f"{key}.{k}": v for k, v in flat(OmegaConf.create(value)).items()}
        else:
            out[str(key)] = value
    return out


# What defines each experiment, as composed: a default of a config group that changes
# one of these changes the experiment, and fails here.
RUN = {"seed": 0, "split": "test", "objective": "rougeL", "history_of": "own"}
RUN |= {"compare_without_memory": True, "optim.weight_decay": 0.0, "optim.warmup_steps": 0}
RUN |= {"generation.do_sample": False, "generation.num_beams": 1, "retrieval.k": 0}
RUN |= {"trainer.gradient_clip_val": 1.0, "trainer.precision": "32-true"}
RUN |= {"memory.alpha": 16, "memory.dropout": 0.0, "memory.target_modules": ["ffn"]}
RUN |= {"injection._target_": "milp.inject.injector.Injector", "data.batch_size": 8}
RUN |= {"injection.users_per_batch": 1}
# Run directories store this name in their config and their fingerprint hashes it: a
# module move that changed it would refuse every earlier run's resume (milp/memory/__init__.py).
RUN |= {"memory._target_": "milp.memory.MemoryConfig"}
REAL = {
    "model._target_": "milp.models.smollm2.load_smollm2",
    "memory.num_loras": 1,
    "memory.rank": 8,
    "memory.layers": "top_half",
    "memory.init": "task",
    "attribution.enabled": True,
    "attribution.task_memory": True,
    "attribution.task_lr": 1.0e-3,
    "optim.lr": 3.0e-4,
    "data.users.max_history": 64,
    "data.users.context_turns": 4,
    "data.prompt_format.max_prompt_tokens": 512,
    "data.prompt_format.max_target_tokens": 40,
    "generation.max_new_tokens": 32,
    "generation.no_repeat_ngram_size": 3,
}
EXPERIMENTS = {
    "lamp": RUN
    | {
        "model._target_": "milp.models.tiny.load_tiny_model",
        **{f"model.{k}": v for k, v in dict(vocab_size=1024, hidden_size=128).items()},
        **{f"model.{k}": v for k, v in dict(intermediate_size=352, num_layers=8).items()},
        **{f"model.{k}": v for k, v in dict(num_heads=4, pretrain_pairs=4000).items()},
        **{f"model.{k}": v for k, v in dict(epochs=3, lr=0.003, seed=0, data_seed=0).items()},
        "data.name": "synthetic-lamp4",
        "data.users.max_history": 64,
        "data.prompt_format.max_prompt_tokens": 256,
        "data.prompt_format.max_target_tokens": 48,
        "memory.num_loras": 2,
        "memory.rank": 8,
        "memory.layers": "all",
        "memory.init": "fresh",
        "trainer.max_epochs": 8,
        "optim.lr": 1.0e-2,
        "generation.max_new_tokens": 32,
        "attribution.enabled": False,
    },
    "chitchat": RUN
    | REAL
    | {
        "data.name": "chitchat",
        "data.users.queries_per_user": 10,
        "data.users.min_query_conversations": 3,
        "data.users.test_users": 32,
        "data.users.dev_users": 16,
        "data.users.train_users": 8,
        "trainer.max_epochs": 4,
    },
    "shakespeare": RUN
    | REAL
    | {
        "data.name": "shakespeare",
        "data.users.queries_per_user": 5,
        "data.users.test_users": 32,
        "data.users.dev_users": 8,
        "data.users.dev_plays": 3,
        "data.users.train_users": 16,
        "trainer.max_epochs": 2,
    },
}


def test_every_experiment_is_pinned():
    assert sorted(EXPERIMENTS) == options(CONF / "experiment")


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_each_experiment_composes_to_its_settings(experiment):
    settings = flat(composed(f"+experiment={experiment}"))
    expected = EXPERIMENTS[experiment]
    assert {k: settings.get(k, "<missing>") for k in expected} == expected


def test_the_bare_command_runs_the_embedded_experiment():
    """`python -m milp.train` with no experiment is the main job (the README says so)."""
    assert flat(composed()) == flat(composed("+experiment=lamp"))


# What each method sets on top of an experiment, and that it changes nothing else: MiLP's
# methods keep the experiment's memory; the others bring their own (or none).
NO_MEMORY = {"memory.num_loras": 0}
METHODS = {
    "zero_shot": (NO_MEMORY | {"retrieval.k": 0}, ("memory.",)),
    "rag": (NO_MEMORY | {"retrieval.k": 2}, ("memory.",)),
    "oppu": (
        {"memory.num_loras": 1, "memory.rank": 8, "memory.layers": "all", "retrieval.k": 0}
        | {"memory.target_modules": ["q_proj", "v_proj"], "memory.alpha": 16},
        ("memory.",),
    ),
    "milp": ({"retrieval.k": 0}, ()),
    "milp_rag": ({"retrieval.k": 2}, ("retrieval.",)),
    "milp_sparse": ({"retrieval.k": 0, "data.min_examples_per_epoch": 16}, ()),
}


def test_every_method_is_pinned():
    assert sorted(METHODS) == options(CONF / "method")


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_sets_its_settings_and_nothing_else(method, experiment):
    base = flat(composed(f"+experiment={experiment}"))
    settings = flat(composed(f"+experiment={experiment}", f"+method={method}"))
    expected, replaced = METHODS[method]
    assert {k: settings.get(k, "<missing>") for k in expected} == expected
    changed = {k for k in base.keys() | settings.keys() if base.get(k) != settings.get(k)}
    assert {k for k in changed if not k.startswith(replaced) and k not in expected} == set()
    if method != "oppu" and expected.get("memory.num_loras") != 0:
        assert {k: v for k, v in settings.items() if k.startswith("memory.")} == {
            k: v for k, v in base.items() if k.startswith("memory.")
        }


def test_the_gpu_trainer_composes():
    default, gpu = flat(composed()), flat(composed("trainer=gpu"))
    assert (gpu["trainer.accelerator"], gpu["trainer.precision"]) == ("gpu", "bf16-mixed")
    changed = {k for k in default if default[k] != gpu[k]}
    assert changed == {"trainer.accelerator", "trainer.precision"}
    assert_targets_resolve(composed("trainer=gpu"))


@pytest.mark.parametrize("experiment", options(CONF / "experiment"))
@pytest.mark.parametrize("option", options(CONF / "method"))
def test_every_method(option, experiment, cache):
    cfg = composed(f"+experiment={experiment}", f"+method={option}")
    memory = instantiate(cfg.memory)
    assert memory.enabled == (option not in ("zero_shot", "rag"))
    assert (cfg.retrieval.k > 0) == (option in ("rag", "milp_rag"))
    if option.startswith("milp"):  # MiLP's methods keep the experiment's own memory
        own = instantiate(composed(f"+experiment={experiment}").memory)
        assert (memory.num_loras, memory.rank, memory.layers) == (
            own.num_loras,
            own.rank,
            own.layers,
        )


@pytest.mark.parametrize("experiment", options(CONF / "experiment"))
def test_memory_none_replaces_every_experiments_memory(experiment, cache):
    cfg = composed(f"+experiment={experiment}", "memory=none")
    assert instantiate(cfg.memory).num_loras == 0


def test_memory_none_and_a_method_replace_the_experiments_memory(cache):
    oppu = instantiate(composed("+experiment=lamp", "+method=oppu").memory)
    assert (oppu.num_loras, oppu.target_modules) == (1, ["q_proj", "v_proj"])


@pytest.mark.parametrize("option", options(ROOT / "sweeps"))
def test_every_sweep_composes_with_its_sweeper(option, cache):
    cfg = composed("+experiment=lamp", f"+sweep={option}", hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert callable(get_object(sweeper._target_))
    assert sweeper.params, "a sweep searches something"
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key.lstrip("+"), default="absent") != "absent", key
