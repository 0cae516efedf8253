"""A memory: the search space and its placement on a model's layers (`space.py`), and
the saved-memory format (`adapters.py`)."""
