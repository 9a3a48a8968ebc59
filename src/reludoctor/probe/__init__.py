"""Watching activations: where they are (probes), what they did (tracker's counters), and
combining ranks' counts under ``torch.distributed``. Knows nothing of rules or views."""
