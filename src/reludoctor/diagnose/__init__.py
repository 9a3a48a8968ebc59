"""Judging what was counted: per-layer and per-window summaries, facts read from the model,
findings and the rules that make them. Pure functions over plain observations."""
