"""A Lightning callback that holds a run at a known point, so a test can interrupt it there.

Tests that press Ctrl-C mid-run must not depend on how fast a machine trains: named in a
run's config (`+callbacks.gate._target_=interrupt_gate.HoldOnceFileExists`, with
`tests/` on PYTHONPATH), the callback stops the next user's training once an earlier
user's result file exists, says so in a file, and waits there for the signal.
"""

import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class HoldOnceFileExists(Callback):
    """At the start of a user's training, if `after` exists: write `holding`, then wait.

    SIGINT ends the wait as Ctrl-C would end training (a KeyboardInterrupt inside
    `trainer.fit`); if none comes within `timeout_s`, the run fails instead of hanging.
    """

    def __init__(self, after: str, holding: str, timeout_s: float = 300.0) -> None:
        self.after, self.holding, self.timeout_s = Path(after), Path(holding), timeout_s

    def on_train_start(self, trainer, pl_module) -> None:
        if not self.after.exists():
            return
        self.holding.write_text(f"holding: {self.after} exists\n")
        time.sleep(self.timeout_s)  # a signal's handler raises out of the sleep
        raise RuntimeError(f"interrupt_gate: no signal within {self.timeout_s} s")
