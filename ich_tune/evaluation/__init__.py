"""Judging a model: validation metrics (metrics) and the figures of a run (plots)."""
