"""A run: its parts built from the config, its settings checked, its directory, files,
lock, shards of users and a search trial's early stop."""
