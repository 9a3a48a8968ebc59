"""What the rules see: the tracker's summaries and windows, the facts, and the blind spots."""

from __future__ import annotations

import math
from collections.abc import Sequence

from reludoctor.diagnose.facts import ModelFacts
from reludoctor.diagnose.rules import Observations
from reludoctor.diagnose.summarize import Summarizer
from reludoctor.probe.tracker import Tracker


def observe(
    tracker: Tracker,
    summarizer: Summarizer,
    facts: ModelFacts,
    unwatched: Sequence[tuple[str, str]] = (),
) -> Observations:
    """What the rules see now: the layer summaries of what ``tracker`` counted (last closed
    window and the open one), every window, ``facts`` with each layer's bias in units of its
    pre-activation's spread, and what could not be watched (``unwatched`` modules, and the
    steps after an error of the tracker's own). Framework-neutral: Keras uses it too."""
    open_window, open_snapshots = tracker.open_window()
    windows = list(tracker.windows) + ([open_window] if open_window else [])
    layers = summarizer.layer_reports(tracker.layers, open_snapshots)
    facts = facts.with_preactivation_scale(
        {
            lay.producer: lay.start_preact_std
            for lay in layers
            if lay.producer and lay.start_preact_std and math.isfinite(lay.start_preact_std)
        }
    )
    blind_spots = [{"module": name, "reason": reason} for name, reason in unwatched]
    if tracker.failure is not None:
        blind_spots.append(
            {
                "module": "every layer",
                "reason": f"watching stopped in step {tracker.failure_step} after an error of "
                f"reludoctor's own ({tracker.failure}); the counts cover the steps before it",
            }
        )
    return Observations(layers, windows, facts, blind_spots)
