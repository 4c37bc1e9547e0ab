"""Comparison: every method trained on the same task and budget, planned before and reported after."""
