"""Scoring: the metrics, the run's report, and attribution (does a memory know its owner)."""
