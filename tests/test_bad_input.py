"""Malformed LaMP and JSONL input through `python -m milp.train`: one line, exit 2, no output.

Each row starts from a valid data set, breaks one thing, and runs the real entrypoint
(Hydra, config, loaders). All rows run in one separate process, one after the other, each
started with `runpy` as `python -m` starts a module; two rows also run as a process of
their own. The model config is made unloadable on purpose (`model.dtype` is not a
dtype): data must be refused before the model is built, so a row whose data got through
fails on the model's message instead of its own.
"""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, TINY_MODEL_OVERRIDES, milp_env, run_milp
from omegaconf import OmegaConf

from milp.data.datamodule import UserDataModule
from milp.data.history import load_history_users
from milp.data.lamp import load_lamp_split

# Reached only if a row's data is accepted: then the model is the next thing built.
UNLOADABLE_MODEL = ["model=hf", "model.name_or_path=unused", "model.dtype=not-a-dtype"]
COMMON = [*UNLOADABLE_MODEL, "logger=none", "callbacks=none"]
# What Hydra itself writes into a run directory before milp's code starts.
HYDRA_ENTRIES = {".hydra", "train.log"}

QUESTIONS = [
    {
        "id": "q1",
        "user_id": "ann",
        "input": "Generate a headline for the following article: The bridge reopened today.",
        "profile": [
            {"id": "p1", "text": "Rain all week.", "title": "Wet week ahead", "date": "2019-01-02"},
            {"id": "p2", "text": "A cafe opened.", "title": "Cafe opens", "date": "2019-03-01"},
        ],
    },
    {
        "id": "q2",
        "user_id": "ann",
        "input": "Generate a headline for the following article: Snow is coming.",
        "profile": [
            {"id": "p1", "text": "Rain all week.", "title": "Wet week ahead", "date": "2019-01-02"},
        ],
    },
    {
        "id": "q3",
        "user_id": "bob",
        "input": "Generate a headline for the following article: The team lost.",
        "profile": [{"id": "p9", "text": "Team wins.", "title": "Victory!", "date": "2020-05-05"}],
    },
]
GOLDS = {
    "task": "LaMP_4",
    "golds": [
        {"id": "q1", "output": "Bridge back"},
        {"id": "q2", "output": "Snow soon"},
        {"id": "q3", "output": "Defeat"},
    ],
}
USERS = [
    {
        "user_id": "alice",
        "history": [{"prompt": "How was your weekend?", "response": "Grand, went climbing!"}],
        "queries": [{"id": "a1", "prompt": "Any plans tonight?", "response": "Climbing."}],
    },
    {
        "user_id": "bob",
        "history": [{"prompt": "Coffee?", "response": "Always."}],
        "queries": [{"id": "b1", "prompt": "Tea?", "response": "Never."}, {"prompt": "Cake?"}],
    },
]


def write_lamp(directory: Path, questions: list, golds: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dev_questions.json").write_text(json.dumps(questions), encoding="utf-8")
    (directory / "dev_outputs.json").write_text(json.dumps(golds), encoding="utf-8")
    return directory


def write_jsonl(path: Path, users: list) -> Path:
    path.write_text("".join(json.dumps(u) + "\n" for u in users), encoding="utf-8")
    return path


def lamp_case(mutate: Callable[[list, dict], None], *overrides: str):
    """A row on LaMP files: `mutate(questions, golds)` breaks the valid data in place."""

    def make(tmp: Path) -> list[str]:
        questions, golds = copy.deepcopy(QUESTIONS), copy.deepcopy(GOLDS)
        mutate(questions, golds)
        data = write_lamp(tmp / "lamp", questions, golds)
        return ["data=lamp4", f"data.path={data}", "split=dev", *overrides]

    return make


def lamp_bytes_case(name: str, old: bytes, new: bytes):
    """A row on LaMP files whose bytes are edited (e.g. to break their encoding)."""

    def make(tmp: Path) -> list[str]:
        data = write_lamp(tmp / "lamp", QUESTIONS, GOLDS)
        path = data / name
        raw = path.read_bytes()
        assert old in raw
        path.write_bytes(raw.replace(old, new, 1))
        return ["data=lamp4", f"data.path={data}", "split=dev"]

    return make


def jsonl_case(mutate: Callable[[list], None] | None, *overrides: str, raw: bytes | None = None):
    """A row on a JSONL history file: `mutate(users)` in place, or `raw` bytes as the file."""

    def make(tmp: Path) -> list[str]:
        path = tmp / "users.jsonl"
        if raw is not None:
            path.write_bytes(raw)
        else:
            users = copy.deepcopy(USERS)
            if mutate is not None:
                mutate(users)
            write_jsonl(path, users)
        return ["data=history", f"data.path={path}", *overrides]

    return make


def setitem(target: dict, key, value) -> None:
    target[key] = value


INVALID_UTF8_JSONL = (
    b'{"user_id": "alice", "history": [{"prompt": "hi", "response": "caf\xe9"}],'
    b' "queries": [{"prompt": "x"}]}\n'
)

# (row id, how to make the run's arguments, what the one line says after "milp: error: ")
ROWS = [
    # --- LaMP files -------------------------------------------------------------
    (
        "lamp-null-user-id",
        lamp_case(lambda q, g: setitem(q[2], "user_id", None)),
        "dev_questions.json: record 2 (id='q3'): 'user_id' must be a string or an integer, "
        "got None",
    ),
    (
        "lamp-list-user-id",
        lamp_case(lambda q, g: setitem(q[0], "user_id", ["ann"])),
        "record 0 (id='q1'): 'user_id' must be a string or an integer, got ['ann']",
    ),
    (
        "lamp-list-question-id",
        lamp_case(lambda q, g: setitem(q[1], "id", ["q2"])),
        "dev_questions.json: record 1: 'id' must be a string or an integer, got ['q2']",
    ),
    (
        "lamp-list-gold-id",
        lamp_case(lambda q, g: setitem(g["golds"][0], "id", ["q1"])),
        "dev_outputs.json: gold 0: 'id' must be a string or an integer",
    ),
    (
        "lamp-list-profile-item-id",
        lamp_case(lambda q, g: setitem(q[2]["profile"][0], "id", [9])),
        "record 2 (id='q3'): profile item 0: 'id' must be a string or an integer, got [9]",
    ),
    (
        "lamp-duplicate-gold-id",
        lamp_case(lambda q, g: g["golds"].append({"id": "q1", "output": "Other"})),
        "dev_outputs.json: gold 3 (id='q1'): duplicate id (also gold 0)",
    ),
    (
        "lamp-empty-input",
        lamp_case(lambda q, g: setitem(q[1], "input", "  ")),
        "record 1 (id='q2'): 'input' is an empty string",
    ),
    (
        "lamp-empty-gold",
        lamp_case(lambda q, g: setitem(g["golds"][2], "output", "")),
        "dev_outputs.json: gold 2 (id='q3'): 'output' is an empty string",
    ),
    (
        "lamp-empty-title",
        lamp_case(lambda q, g: setitem(q[0]["profile"][1], "title", "")),
        "record 0 (id='q1'): profile item 1: 'title' is an empty string",
    ),
    (
        "lamp-mixed-date-kinds",
        # A 2030 number would sort before "2019-01-02" as text: refused, not guessed.
        lamp_case(
            lambda q, g: q[1]["profile"].append(
                {"id": "p3", "text": "Sun.", "title": "Sunny", "date": 2030}
            )
        ),
        "record 1 (id='q2') profile item 1: 'date' is a number, but record 0 (id='q1') "
        "profile item 0 of the same user has a string date",
    ),
    (
        "lamp-bad-date-type",
        lamp_case(lambda q, g: setitem(q[2]["profile"][0], "date", [2020])),
        "record 2 (id='q3'): profile item 0: 'date' must be a number or a non-empty string",
    ),
    (
        "lamp-reused-profile-id",
        lamp_case(lambda q, g: setitem(q[1]["profile"][0], "title", "Dry week ahead")),
        "record 1 (id='q2') profile item 0: profile item id 'p1' is reused with different "
        "content (first in record 0 (id='q1') profile item 0)",
    ),
    (
        "lamp-invalid-utf8-questions",
        lamp_bytes_case("dev_questions.json", b"Rain all", b"R\xe4in all"),
        "dev_questions.json: not valid UTF-8 (line 1, byte",
    ),
    (
        "lamp-invalid-utf8-outputs",
        lamp_bytes_case("dev_outputs.json", b"Defeat", b"D\xc3feat"),
        "dev_outputs.json: not valid UTF-8 (line 1, byte",
    ),
    (
        "lamp-no-questions",
        lamp_case(lambda q, g: (q.clear(), g["golds"].clear())),
        "dev_questions.json: no questions (an empty array)",
    ),
    (
        "lamp-gold-in-history",
        lamp_case(lambda q, g: setitem(g["golds"][2], "output", "  VICTORY! ")),
        "1 query gold output(s) appear in the same user's history, e.g. user 'bob' query "
        "'q3' gold '  VICTORY! '",
    ),
    (
        "lamp-max-history-0",
        lamp_case(lambda q, g: None, "data.users.max_history=0"),
        "data.users.max_history must be an integer >= 1 or null (all items), got 0",
    ),
    (
        "lamp-max-users-0",
        lamp_case(lambda q, g: None, "data.users.max_users=0"),
        "data.users.max_users must be an integer >= 1 or null (all users), got 0",
    ),
    # --- JSONL history files ----------------------------------------------------
    (
        "jsonl-invalid-utf8",
        jsonl_case(None, raw=INVALID_UTF8_JSONL),
        f"users.jsonl: line 1: not valid UTF-8 (column {INVALID_UTF8_JSONL.index(0xE9) + 1})",
    ),
    (
        "jsonl-null-user-id",
        jsonl_case(lambda u: setitem(u[1], "user_id", None)),
        "users.jsonl: line 2: 'user_id' must be a string or an integer, got None",
    ),
    (
        "jsonl-list-user-id",
        jsonl_case(lambda u: setitem(u[0], "user_id", ["alice"])),
        "users.jsonl: line 1: 'user_id' must be a string or an integer, got ['alice']",
    ),
    (
        "jsonl-duplicate-query-id",
        jsonl_case(lambda u: setitem(u[1]["queries"][0], "id", "a1")),
        "users.jsonl: line 2: queries[0]: duplicate query id 'a1' (also line 1: queries[0])",
    ),
    (
        "jsonl-list-query-id",
        jsonl_case(lambda u: setitem(u[0]["queries"][0], "id", ["a1"])),
        "users.jsonl: line 1: queries[0]: 'id' must be a string or an integer",
    ),
    (
        "jsonl-empty-history-prompt",
        jsonl_case(lambda u: setitem(u[0]["history"][0], "prompt", "")),
        "users.jsonl: line 1: history[0]: 'prompt' is an empty string",
    ),
    (
        "jsonl-empty-history-response",
        jsonl_case(lambda u: setitem(u[1]["history"][0], "response", " \n")),
        "users.jsonl: line 2: history[0]: 'response' is an empty string",
    ),
    (
        "jsonl-empty-query-prompt",
        jsonl_case(lambda u: setitem(u[1]["queries"][1], "prompt", "")),
        "users.jsonl: line 2: queries[1]: 'prompt' is an empty string",
    ),
    (
        "jsonl-empty-query-response",
        jsonl_case(lambda u: setitem(u[0]["queries"][0], "response", "")),
        "users.jsonl: line 1: queries[0]: 'response' is an empty string",
    ),
    (
        "jsonl-non-string-response",
        jsonl_case(lambda u: setitem(u[0]["queries"][0], "response", 42)),
        "users.jsonl: line 1: queries[0]: 'response' must be a string, got 42",
    ),
    (
        "jsonl-gold-in-history",
        jsonl_case(lambda u: setitem(u[0]["queries"][0], "response", "grand, went  Climbing!")),
        "users.jsonl: 1 query gold output(s) appear in the same user's history, e.g. user "
        "'alice' query 'a1'",
    ),
    (
        "jsonl-max-history-0",
        jsonl_case(lambda u: None, "data.users.max_history=0"),
        "data.users.max_history must be an integer >= 1 or null (all items), got 0",
    ),
    (
        "jsonl-max-history-negative",
        jsonl_case(lambda u: None, "data.users.max_history=-2"),
        "data.users.max_history must be an integer >= 1 or null (all items), got -2",
    ),
    (
        "jsonl-max-users-0",
        jsonl_case(lambda u: None, "data.users.max_users=0"),
        "data.users.max_users must be an integer >= 1 or null (all users), got 0",
    ),
    (
        "jsonl-no-users",
        jsonl_case(None, raw=b"\n\n"),
        "users.jsonl: no users in file",
    ),
    (
        "jsonl-duplicate-key",
        jsonl_case(
            None,
            raw=b'{"user_id": "alice", "history": [{"prompt": "a", "response": "b"}],'
            b' "history": [{"prompt": "c", "response": "d"}], "queries": [{"prompt": "x"}]}\n',
        ),
        "users.jsonl: line 1: duplicate key 'history' in one object",
    ),
    (
        "jsonl-misspelled-history",
        jsonl_case(lambda u: u[1].update(histroy=u[1]["history"])),
        "users.jsonl: line 2: unknown key 'histroy' (a user has user_id, history, queries)",
    ),
    (
        "jsonl-misspelled-response",
        jsonl_case(lambda u: setitem(u[0]["history"][0], "responce", "x")),
        "users.jsonl: line 1: history[0]: unknown key 'responce' (a history item has prompt, "
        "response)",
    ),
    (
        "jsonl-answer-instead-of-response",
        jsonl_case(lambda u: setitem(u[1]["queries"][1], "answer", "Yes.")),
        "users.jsonl: line 2: queries[1]: unknown key 'answer' (a queries item has id, prompt, "
        "response)",
    ),
    (
        "jsonl-lone-surrogate-user-id",
        jsonl_case(lambda u: setitem(u[1], "user_id", "bob\ud800")),
        "users.jsonl: line 2: 'user_id' holds a lone surrogate ('\\ud800' at character 3)",
    ),
    (
        "jsonl-lone-surrogate-response",
        jsonl_case(lambda u: setitem(u[0]["history"][0], "response", "\udfff!")),
        "users.jsonl: line 1: history[0]: 'response' holds a lone surrogate",
    ),
    (
        "jsonl-huge-integer-id",
        jsonl_case(
            None,
            raw=b'{"user_id": ' + b"9" * 5000 + b', "history": [{"prompt": "p", "response": '
            b'"r"}], "queries": [{"prompt": "x"}]}\n',
        ),
        "users.jsonl: line 1: an integer of 5000 digits (at most 4300)",
    ),
    (
        "jsonl-deep-nesting",
        jsonl_case(
            None,
            raw=b'{"user_id": "a", "history": [{"prompt": "p", "response": "r"}], "queries": '
            + b"[" * 100_000
            + b"]" * 100_000
            + b"}\n",
        ),
        "users.jsonl: line 1: nested too deeply to parse",
    ),
    (
        "lamp-duplicate-key",
        lamp_bytes_case("dev_questions.json", b'"input": ', b'"input": "x",\n "input": '),
        "dev_questions.json: line 2: duplicate key 'input' in one object",
    ),
    (
        "lamp-misspelled-user-id",
        lamp_case(lambda q, g: q[1].update(userid=q[1].pop("user_id"))),
        "record 1 (id='q2'): unknown key 'userid' (a question has id, user_id, input, profile)",
    ),
    (
        "lamp-misspelled-profile-date",
        lamp_case(lambda q, g: q[0]["profile"][0].update(dtae="2020-01-01")),
        "profile item 0: unknown key 'dtae' (a profile item has id, date, text, title)",
    ),
    (
        "lamp-misspelled-output",
        lamp_case(lambda q, g: setitem(g["golds"][1], "outputs", "Snow")),
        "dev_outputs.json: gold 1 (id='q2'): unknown key 'outputs' (a gold has id, output)",
    ),
    # --- data settings shared by every source -----------------------------------
    (
        "batch-size-0",
        jsonl_case(lambda u: None, "data.batch_size=0"),
        "data.batch_size must be an integer >= 1, got 0",
    ),
    (
        "max-target-tokens-1",
        jsonl_case(lambda u: None, "data.prompt_format.max_target_tokens=1"),
        "data.prompt_format.max_target_tokens must be an integer >= 2, got 1",
    ),
    (
        "template-without-prompt",
        jsonl_case(lambda u: None, "data.prompt_format.template=Answer:"),
        "data.prompt_format.template must contain '{prompt}'",
    ),
    (
        "allow-gold-not-a-bool",
        jsonl_case(lambda u: None, "data.allow_gold_in_history=maybe"),
        "data.allow_gold_in_history must be true or false, got 'maybe'",
    ),
    # --- injection settings ------------------------------------------------------
    (
        "fast-path-unknown-key",
        jsonl_case(lambda u: None, "+injection.fast.bf17=true"),
        "injection.fast.bf17 is not a fast-path setting",
    ),
    (
        "fast-path-negative-cache",
        jsonl_case(lambda u: None, "injection.fast.prefix_cache_mib=-1"),
        "injection.fast.prefix_cache_mib must be >= 0",
    ),
    # --- run settings: NaN, infinite, negative, fractional, too large -------------
    *(
        (f"setting-{re.sub('[^a-z0-9_.-]', '-', override)}", jsonl_case(None, override), message)
        for override, message in [
            ("optim.lr=-1", "optim.lr must be a number >= 0, got -1"),
            ("optim.lr=nan", "optim.lr must be a number >= 0, got nan"),
            ("optim.lr=inf", "optim.lr must be a number >= 0, got inf"),
            ("optim.lr=0", "optim.lr=0 leaves fresh memory untrained"),
            ("optim.weight_decay=-0.1", "optim.weight_decay must be a number >= 0, got -0.1"),
            ("optim.warmup_steps=1.5", "optim.warmup_steps must be an integer >= 0, got 1.5"),
            ("memory.alpha=nan", "memory.alpha must be a number > 0, got nan"),
            ("memory.alpha=-16", "memory.alpha must be a number > 0, got -16"),
            ("memory.dropout=nan", "memory.dropout must be a number in [0, 1], got nan"),
            ("memory.dropout=1", "memory.dropout must be in [0, 1), got 1"),
            ("memory.rank=2.5", "memory.rank must be an integer >= 1, got 2.5"),
            ("memory.rank=inf", "memory.rank must be an integer >= 1, got inf"),
            ("memory.num_loras=1000", "memory.num_loras must be an integer in [0, 64], got 1000"),
            ("memory.num_loras=-1", "memory.num_loras must be an integer in [0, 64], got -1"),
            ("memory.layers=[1.5]", "memory.layers[0] must be an integer >= 0, got 1.5"),
            ("memory.layers=[true]", "memory.layers[0] must be an integer >= 0, got True"),
            ("trainer.max_epochs=0", "trainer.max_epochs=0 trains nothing"),
            ("trainer.max_epochs=2.5", "trainer.max_epochs must be an integer >= 0, got 2.5"),
            ("+trainer.max_steps=0", "trainer.max_steps must be an integer >= 1, got 0"),
            ("trainer.gradient_clip_val=nan", "trainer.gradient_clip_val must be a number >= 0"),
            ("generation.max_new_tokens=0", "generation.max_new_tokens must be an integer in "),
            ("generation.max_new_tokens=1e9", "generation.max_new_tokens must be an integer in "),
            ("generation.num_beams=0", "generation.num_beams must be an integer in [1, 64]"),
            ("retrieval.k=-1", "retrieval.k must be an integer >= 0, got -1"),
            ("seed=-1", "seed must be an integer in [0, 4294967295], got -1"),
            ("seed=nan", "seed must be an integer in [0, 4294967295], got nan"),
        ]
    ),
    (
        "setting-users-per-batch-0",
        jsonl_case(lambda u: None, "injection=batched", "injection.users_per_batch=0"),
        "injection.users_per_batch must be an integer >= 1, got 0",
    ),
    (
        "synthetic-max-users-0",
        lambda tmp: ["data=synthetic", "data.users.max_users=0"],
        "data.users.max_users must be an integer >= 1 or null (all users), got 0",
    ),
    (
        "chitchat-max-history-0",
        lambda tmp: ["data=chitchat", "data.users.max_history=0"],
        "data.users.max_history must be an integer >= 1 or null (all earlier replies), got 0",
    ),
    (
        "shakespeare-history-fraction-1",
        lambda tmp: ["data=shakespeare", "data.users.history_fraction=1"],
        "data.users.history_fraction must be a number in (0, 1), got 1",
    ),
    (
        "shakespeare-texts-missing",
        lambda tmp: ["data=shakespeare", f"data.users.texts={tmp / 'no-plays'}"],
        "no-plays: not a directory",
    ),
]


# Runs `python -m milp.train ARGS` for each ARGS in the JSON file argv[1], one after the
# other in this one process (as runpy, the way `python -m` starts a module), and writes
# each run's exit code and stderr, or the traceback of anything else it raised, to argv[2].
DRIVER = """
import contextlib, io, json, runpy, sys, traceback
runs_file, results_file, results = sys.argv[1], sys.argv[2], []
for args in json.load(open(runs_file)):
    sys.argv, stderr, code = ["milp.train", *args], io.StringIO(), None
    try:
        with contextlib.redirect_stderr(stderr):
            runpy.run_module("milp.train", run_name="__main__", alter_sys=True)
    except SystemExit as exited:
        code = exited.code
    except BaseException:
        stderr.write(traceback.format_exc())
    results.append({"code": code, "stderr": stderr.getvalue()})
json.dump(results, open(results_file, "w"))
"""


def run_all(runs: list[list[str]], tmp: Path, cache: Path) -> list[dict]:
    """Run `python -m milp.train` once per argument list, all in one fresh process.

    One process keeps the table fast (Python, torch and Hydra start once), and a fresh
    one sees none of the logging handlers or captured streams of the test session.
    """
    (tmp / "runs.json").write_text(json.dumps(runs))
    subprocess.run(
        [sys.executable, "-c", DRIVER, str(tmp / "runs.json"), str(tmp / "results.json")],
        cwd=ROOT,
        env=milp_env(cache),
        check=True,
        timeout=600,
    )
    return json.loads((tmp / "results.json").read_text())


def assert_one_line_error(
    code: int | None, stderr: str, message: str, run_dir: Path, fresh: bool = True
) -> None:
    """Exit code 2, one line on stderr that says `message`; a fresh `run_dir` holds only
    what Hydra writes before milp starts."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("milp: error: ") and message in lines[0], lines[0]
    if fresh:
        assert {p.name for p in run_dir.iterdir()} <= HYDRA_ENTRIES, sorted(run_dir.iterdir())


EARLIER_RUN = {
    "fingerprint.txt": "0123456789abcdef\n",
    "metrics.json": '{"users": 1}',
    "predictions.jsonl": '{"id": "a1"}\n',
    "users/alice.json": '{"user_id": "alice"}',
}


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> dict[str, tuple[dict, Path, Path]]:
    """Every row run once: {row id: (its exit code and stderr, its run dir, the cache)}."""
    root = tmp_path_factory.mktemp("bad-input")
    cache = root / "cache"  # no row may fill it: no data generated, no model built
    runs, run_dirs = [], {}
    for row_id, make_args, _ in ROWS:
        row_dir = root / row_id
        row_dir.mkdir()
        run_dirs[row_id] = row_dir / "run"
        runs.append([*COMMON, *make_args(row_dir), f"hydra.run.dir={row_dir / 'run'}"])
    # A run directory that holds an earlier run's results, given a refused file.
    earlier = root / "earlier"
    for name, text in EARLIER_RUN.items():
        (earlier / "run" / name).parent.mkdir(parents=True, exist_ok=True)
        (earlier / "run" / name).write_text(text)
    make = jsonl_case(lambda u: setitem(u[1], "user_id", None))
    runs.append([*COMMON, *make(earlier), f"hydra.run.dir={earlier / 'run'}"])
    run_dirs["earlier"] = earlier / "run"
    results = run_all(runs, root, cache)
    return {
        row_id: (result, run_dirs[row_id], cache)
        for row_id, result in zip([*(r[0] for r in ROWS), "earlier"], results, strict=True)
    }


@pytest.mark.parametrize("row_id, message", [(r[0], r[2]) for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_before_the_model(table, row_id, message):
    result, run_dir, cache = table[row_id]
    assert_one_line_error(result["code"], result["stderr"], message, run_dir)
    assert not cache.exists()


def test_the_valid_data_of_the_rows_loads(tmp_path):
    """Every row breaks data that is otherwise accepted, so its error is its own."""
    data = write_lamp(tmp_path / "lamp", QUESTIONS, GOLDS)
    lamp_users = load_lamp_split("LaMP_4", data, "dev")
    assert [(u.user_id, len(u.history), len(u.queries)) for u in lamp_users] == [
        ("ann", 2, 2),
        ("bob", 1, 1),
    ]
    history_users = load_history_users(write_jsonl(tmp_path / "users.jsonl", USERS))
    assert [q.id for q in history_users[1].queries] == ["b1", "bob/1"]
    for users in (lamp_users, history_users):
        assert UserDataModule(users).gold_in_history == {"count": 0, "examples": []}


def test_gold_in_history_can_be_allowed_and_is_counted(tmp_path):
    questions, golds = copy.deepcopy(QUESTIONS), copy.deepcopy(GOLDS)
    golds["golds"][2]["output"] = "victory!"
    users = load_lamp_split("LaMP_4", write_lamp(tmp_path, questions, golds), "dev")
    leaks = UserDataModule(users, allow_gold_in_history=True).gold_in_history
    assert leaks == {"count": 1, "examples": ["user 'bob' query 'q3' gold 'victory!'"]}


def test_bad_input_keeps_an_earlier_runs_files(table):
    """Refused data leaves an existing run directory's results byte for byte."""
    result, run_dir, _ = table["earlier"]
    assert_one_line_error(
        result["code"], result["stderr"], "'user_id' must be a string", run_dir, fresh=False
    )
    assert {name: (run_dir / name).read_text() for name in EARLIER_RUN} == EARLIER_RUN
    names = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}
    assert {n for n in names if not n.startswith(".hydra/")} == {*EARLIER_RUN, "train.log"}


IN_A_PROCESS = [r for r in ROWS if r[0] in {"jsonl-invalid-utf8", "lamp-null-user-id"}]


@pytest.mark.parametrize(
    "make_args, message", [r[1:] for r in IN_A_PROCESS], ids=[r[0] for r in IN_A_PROCESS]
)
def test_bad_input_in_a_real_process(make_args, message, tmp_path):
    """The same refusal from a separate `python -m milp.train`: no traceback, exit 2."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "milp.train", *make_args(tmp_path), f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=milp_env(tmp_path / "cache"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert_one_line_error(result.returncode, result.stderr, message, run_dir)
    assert not (tmp_path / "cache").exists()


# Rows refused once the model is known (a bound that depends on its width) or where the
# refused thing is a stored memory: the tiny model is built, and still nothing is written.
MODEL = [*TINY_MODEL_OVERRIDES, "logger=none", "callbacks=none", "trainer.max_epochs=1"]


def pickled_memory(tmp: Path) -> list[str]:
    """A run to continue (`memory.resume_from`) whose memory has peft's pickle fallback,
    `adapter_model.bin`, instead of safetensors."""
    module = tmp / "earlier" / "adapters" / "alice" / "memory_0"
    module.mkdir(parents=True)
    (module.parent / "memory.json").write_text(json.dumps({"adapters": ["memory_0"]}))
    (module / "adapter_config.json").write_text("{}")
    (module / "adapter_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    return [*jsonl_case(None, "memory.num_loras=1")(tmp), f"memory.resume_from={tmp / 'earlier'}"]


MODEL_ROWS = [
    (
        "rank-above-width",
        jsonl_case(None, "memory.rank=1e9"),
        "memory.rank=1000000000 is above the width of model.layers.0.mlp.gate_proj "
        "(64 x 128); at most 64",
    ),
    (
        "pickled-adapter",
        pickled_memory,
        "alice/memory_0: no adapter_model.safetensors; adapter_model.bin is refused, milp loads "
        "adapter weights from safetensors only",
    ),
]


@pytest.fixture(scope="module")
def model_table(tmp_path_factory, milp_cache) -> dict[str, tuple[dict, Path]]:
    root = tmp_path_factory.mktemp("bad-input-model")
    runs, run_dirs = [], {}
    for row_id, make_args, _ in MODEL_ROWS:
        (root / row_id).mkdir()
        run_dirs[row_id] = root / row_id / "run"
        runs.append([*MODEL, *make_args(root / row_id), f"hydra.run.dir={run_dirs[row_id]}"])
    results = run_all(runs, root, milp_cache)
    return {r[0]: (result, run_dirs[r[0]]) for r, result in zip(MODEL_ROWS, results, strict=True)}


@pytest.mark.parametrize(
    "row_id, message", [(r[0], r[2]) for r in MODEL_ROWS], ids=[r[0] for r in MODEL_ROWS]
)
def test_bad_setting_is_one_line_once_the_model_is_known(model_table, row_id, message):
    result, run_dir = model_table[row_id]
    assert_last_line_error(result["code"], result["stderr"], message)
    assert {p.name for p in run_dir.iterdir()} <= HYDRA_ENTRIES, sorted(run_dir.iterdir())


def assert_last_line_error(code: int | None, stderr: str, message: str, exit_code: int = 2):
    """Like `assert_one_line_error` for runs that get as far as loading the model, whose
    libraries print progress bars and warnings to stderr first: the error is the last
    line, and nothing is a traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == exit_code and "Traceback" not in stderr, stderr
    assert lines[-1].startswith("milp: error: ") and message in lines[-1], stderr


def in_mount(directory: Path, options: str) -> list[str] | None:
    """A command prefix that runs a command with a fresh tmpfs (`options`) on `directory`,
    in a mount namespace of its own; None where this machine does not allow one."""
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs '{directory}'"],
        capture_output=True,
    )
    if probe.returncode != 0:
        return None
    script = f'mount -t tmpfs -o {options} tmpfs "$0" && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, str(directory)]


def unwritable(kind: str, tmp: Path) -> tuple[list[str], Path]:
    """A command prefix and a run directory that cannot be written for reason `kind`."""
    if kind == "not-a-directory":
        (tmp / "file").write_text("a file where the run directory's parent should be")
        return [], tmp / "file" / "run"
    run_dir = tmp / "mount" / "run"
    run_dir.parent.mkdir()
    if kind == "read-only" and os.geteuid() != 0:
        run_dir.mkdir()
        run_dir.chmod(0o555)
        return [], run_dir
    prefix = in_mount(run_dir.parent, "ro,size=64k" if kind == "read-only" else "size=24k")
    if prefix is None:
        pytest.skip("needs a mount namespace (unshare -m) to make a read-only or full file system")
    return prefix, run_dir


@pytest.mark.parametrize("kind", ["not-a-directory", "read-only", "full"])
def test_unwritable_run_dir_is_one_line_exit_1(kind, milp_cache, tmp_path):
    """An environment fault, not bad input: one `milp: error:` line naming the directory
    or file, exit status 1, no traceback."""
    prefix, run_dir = unwritable(kind, tmp_path)
    args = [*MODEL, *jsonl_case(None)(tmp_path), f"hydra.run.dir={run_dir}"]
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "milp.train", *args],
        cwd=ROOT,
        env=milp_env(milp_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    reason = {
        "not-a-directory": "Not a directory",
        "read-only": "Read-only file system" if prefix else "Permission denied",
        "full": "No space left on device",
    }[kind]
    assert_last_line_error(result.returncode, result.stderr, reason, exit_code=1)


# --- A run directory whose data or memories changed since it was written -----------------
# Through the real entrypoints: a resume trains again exactly the users whose inputs or
# memory files no longer hash as their records say; the readers refuse a corrupt memory.
RESUMED = [
    *MODEL,
    "data=history",
    "memory.rank=2",
    "generation.max_new_tokens=4",
    "compare_without_memory=false",
    "trainer.enable_progress_bar=false",
]
CAROL = {
    "user_id": "carol",
    "history": [{"prompt": "Favourite food?", "response": "Noodles, every day."}],
    "queries": [{"id": "c1", "prompt": "Lunch?", "response": "Noodles."}],
}


def records(run_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (run_dir / "users").glob("*.json")}


def run_command(module: str, args: list[str], cache: Path) -> subprocess.CompletedProcess:
    """`python -m milp.<module> ARGS`, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", f"milp.{module}", *args],
        cwd=ROOT,
        env=milp_env(cache),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def changed_run(tmp_path_factory, milp_cache) -> dict:
    """A finished run; then alice's gold is edited in the data file and bob's first memory
    module truncated to half, and the run is resumed in the same directory (the log line
    saying why a user is trained again goes to the console and the run's train.log)."""
    tmp = tmp_path_factory.mktemp("changed-run")
    users = copy.deepcopy(USERS) + [CAROL]
    data, run_dir = write_jsonl(tmp / "users.jsonl", users), tmp / "run"
    args = [*RESUMED, f"data.path={data}", f"hydra.run.dir={run_dir}"]
    run_milp(args, milp_cache)
    first = records(run_dir)
    carol_stamp = (run_dir / "users" / "carol.json").stat().st_mtime_ns
    users[0]["queries"][0]["response"] = "Bouldering at the gym."
    write_jsonl(data, users)
    weights = run_dir / "adapters" / "bob" / "memory_0" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    run_milp(args, milp_cache)
    return {
        "run_dir": run_dir,
        "first": first,
        "log": (run_dir / "train.log").read_text(),  # the log of both runs
        "carol_stamp": carol_stamp,
        "weights": weights,
    }


def test_an_edited_gold_retrains_its_user_and_scores_the_new_gold(changed_run):
    run_dir, log = changed_run["run_dir"], changed_run["log"]
    assert "[INFO] - user alice: its data changed since its stored result; training it again" in log
    lines = (run_dir / "predictions.jsonl").read_text().splitlines()
    predictions = {p["id"]: p for p in map(json.loads, lines)}
    assert predictions["a1"]["gold"] == "Bouldering at the gym."
    assert records(run_dir)["alice"]["memory"]["examples"] == 1
    # The gold is not what the memory learns: trained again, it is the same memory.
    first = changed_run["first"]["alice"]
    assert records(run_dir)["alice"]["memory_sha256"] == first["memory_sha256"]
    assert records(run_dir)["alice"]["inputs"]["data"] != first["inputs"]["data"]
    # An unchanged user is reused as it was, not trained again.
    assert (run_dir / "users" / "carol.json").stat().st_mtime_ns == changed_run["carol_stamp"]
    assert "user carol" not in log


def test_a_truncated_memory_is_trained_again_on_resume(changed_run):
    run_dir, log = changed_run["run_dir"], changed_run["log"]
    assert (
        f"[WARNING] - user bob: {changed_run['weights']}: fails its SHA-256 check against "
        "memory.json (corrupt or truncated); training it again" in log
    )
    stored = records(run_dir)["bob"]
    assert stored["memory_sha256"] == changed_run["first"]["bob"]["memory_sha256"]
    assert changed_run["weights"].stat().st_size > 0
    assert json.loads((run_dir / "metrics.json").read_text())["users"] == 3


def test_generate_and_attribute_refuse_a_corrupt_memory_with_one_line(
    changed_run, milp_cache, tmp_path
):
    """`milp.generate` on a memory truncated after the run; `milp.attribute` on a memory
    replaced whole by another user's (consistent in itself, not the one the run recorded)."""
    run_dir = tmp_path / "run"
    shutil.copytree(changed_run["run_dir"], run_dir)
    weights = run_dir / "adapters" / "bob" / "memory_0" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    served = run_command("generate", [f"store={run_dir}"], milp_cache)
    assert_last_line_error(
        served.returncode,
        served.stderr,
        f"{weights}: fails its SHA-256 check against memory.json (corrupt or truncated)",
    )
    assert not (run_dir / "answers.jsonl").exists()

    shutil.rmtree(run_dir / "adapters" / "bob")
    shutil.copytree(run_dir / "adapters" / "alice", run_dir / "adapters" / "bob")
    attributed = run_command("attribute", [f"store={run_dir}"], milp_cache)
    assert_last_line_error(
        attributed.returncode,
        attributed.stderr,
        f"{run_dir / 'adapters' / 'bob' / 'memory.json'}: fails its SHA-256 check against "
        "the run's record of this user (corrupt or truncated)",
    )
    assert not (run_dir / "attribution.json").exists()


def test_generate_refuses_a_run_whose_users_file_is_gone_with_one_line(
    changed_run, milp_cache, tmp_path
):
    """The run's data, rebuilt for serving, fails as `milp.train` would: one line naming
    the file, and no answers written."""
    run_dir = tmp_path / "run"
    shutil.copytree(changed_run["run_dir"], run_dir)
    config = run_dir / ".hydra" / "config.yaml"
    gone = tmp_path / "moved" / "users.jsonl"
    stored = OmegaConf.load(config)
    stored.data.path = str(gone)
    OmegaConf.save(stored, config)
    served = run_command("generate", [f"store={run_dir}"], milp_cache)
    assert_last_line_error(served.returncode, served.stderr, f"{gone}: file not found")
    assert not (run_dir / "answers.jsonl").exists()
