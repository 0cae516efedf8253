"""MiLP's Hydra sweeper plugin: ``hydra/sweeper=milp_nevergrad`` (see README.md here).

The Sweeper class lives in ``.sweeper`` only (re-exporting it here would make Hydra's plugin
discovery list it twice); importing the package registers the config with the ConfigStore.
"""

from hydra_plugins.milp_sweeper import config  # noqa: F401  (ConfigStore registration)
