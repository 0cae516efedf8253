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
    import milp.train as milp_train
    from milp.inject import Injector
    from milp.memory import place_memory

    cfg = composed("+experiment=lamp", f"injection={option}", *TINY_MODEL_OVERRIDES)
    memory, datamodule, base = (instantiate(cfg[k]) for k in ("memory", "data", "model"))
    datamodule.attach_tokenizer(base.tokenizer)
    placement = place_memory(memory, base.model)
    injector = milp_train.make_injector(cfg, base, memory, placement, datamodule)
    assert isinstance(injector, Injector)


@pytest.mark.parametrize("option", options(CONF / "experiment"))
def test_every_experiment(option, cache):
    cfg = composed(f"+experiment={option}")
    assert_targets_resolve(cfg)
    instantiate(cfg.memory)
    with open_dict(cfg):
        cfg.paths.output_dir = "run"  # Hydra's run dir: known only inside a run
    OmegaConf.to_container(cfg, resolve=True)  # every other interpolation resolves


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
