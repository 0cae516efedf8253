"""A memory: the search space and its placement on a model's layers (`space.py`), and
the saved-memory format (`adapters.py`).

`milp.memory.MemoryConfig` is the name conf/memory/*.yaml and every run directory's
stored config (`.hydra/config.yaml`) build a memory by, and the run's fingerprint hashes
that config: the name stays where it is whichever module defines the class.
"""

from milp.memory.space import MemoryConfig

__all__ = ["MemoryConfig"]
