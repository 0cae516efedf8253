"""experiments/converge.py: memory settings tried on dev users, for real (tiny model,
LaMP-4 files whose users write distinct strings), and it never reads the test split."""

import sys

from conftest import ROOT, TINY_MODEL_OVERRIDES, milp_env
from test_attribute import TEST_WORDS, TRAIN_WORDS, write_split

sys.path.insert(0, str(ROOT / "experiments"))
import converge  # noqa: E402


def test_converge_tabulates_dev_runs_with_attribution_and_never_reads_test(
    milp_cache, tmp_path, monkeypatch
):
    data = tmp_path / "lamp4"
    data.mkdir()
    write_split(data, "dev", TEST_WORDS)
    write_split(data, "train", TRAIN_WORDS)  # the task memory's users; no test files at all
    for key, value in milp_env(milp_cache).items():
        monkeypatch.setenv(key, value)
    common = [
        *TINY_MODEL_OVERRIDES,
        "data=lamp4",
        f"data.path={data}",
        "memory.rank=2",
        "generation.max_new_tokens=2",
        "callbacks=none",
        "trainer.enable_progress_bar=false",
    ]
    converge.main(
        [
            "--source=lamp",
            "--settings=",
            "--setting=short=trainer.max_epochs=1",
            "--setting=long=trainer.max_epochs=4",
            f"--out={tmp_path / 'runs'}",
            f"--results={tmp_path / 'results'}",
            "--extra",
            *common,
        ]
    )
    table = (tmp_path / "results" / "converge_lamp.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[7:]}
    assert set(rows) == {"short", "long"}
    # Four epochs on one repeated word: only the owner's memory has it.
    assert "| 3/3 | 3/3 | 1.00 (0.33) |" in rows["long"]
    assert (tmp_path / "runs" / "lamp" / "long" / "attribution.png").is_file()
    # A finished setting is not run again (its run dir already has the results).
    assert converge.run_setting("lamp", [], tmp_path / "runs" / "lamp" / "long") is None
    # A later invocation with one setting keeps the other setting's row in the table.
    converge.main(
        [
            "--source=lamp",
            "--settings=",
            "--setting=long=trainer.max_epochs=4",
            f"--out={tmp_path / 'runs'}",
            f"--results={tmp_path / 'results'}",
            "--extra",
            *common,
        ]
    )
    again = (tmp_path / "results" / "converge_lamp.md").read_text()
    assert again == table
