"""Live revival: what ``rd.watch(..., revive=True)`` does at the end of each window.

Two actions, one per window at most:

* **revive** - the units dead over the window are recycled with
  :func:`reludoctor.fix.revive.revive_units` (outputs unchanged, their optimizer state reset).
* **rewind** - when the diagnosis says the *learning rate* killed the units (units died
  during training in windows with huge updates or loss spikes), or the loss or activations
  went non-finite, recycling alone cannot hold: the same steps kill the fresh units again and
  the survivors' weights have already blown up. The model and optimizer go back to the last
  stable window's state and every group's learning rate is divided by ``lr_factor``.

For rewinding, one copy of the model's and optimizer's state is kept on the CPU and renewed
at the end of every stable window (no loss spike, no update above the rules'
``high_update_ratio``). A learning-rate scheduler that sets the rate each step overrides the
lowered rate: lower its base rates too, or pass ``rewind_lr_factor=None``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from reludoctor.diagnose.rules import Observations, high_learning_rate, run_rules, unstable_window
from reludoctor.diagnose.summaries import LayerReport, Window
from reludoctor.diagnose.thresholds import Thresholds
from reludoctor.fix.revive import revive_units
from reludoctor.fix.saved_state import SavedState
from reludoctor.report.report import Report
from reludoctor.text import printable

logger = logging.getLogger("reludoctor")


class LiveRevival:
    """Acts at each window's end for a monitor; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        *,
        cap: int,
        lr_factor: float | None,
        thresholds: Thresholds,
        observations: Callable[[], Observations],
        example: Callable[[], torch.Tensor | None],
        counting_off: Callable[[], Any],
    ) -> None:
        if lr_factor is not None and (
            isinstance(lr_factor, bool)
            or not isinstance(lr_factor, int | float)
            or not math.isfinite(lr_factor)
            or lr_factor <= 1
        ):
            raise ValueError(
                f"rewind_lr_factor must be a number > 1 (or None to never rewind), got "
                f"{lr_factor!r}"
            )
        self.model = model
        self.optimizer = optimizer
        self.cap = cap
        self.lr_factor = lr_factor
        self.thresholds = thresholds
        self._observations = observations
        self._example = example
        self._counting_off = counting_off
        #: One entry per window end at which revival acted.
        self.actions: list[dict[str, Any]] = []
        self._stable: SavedState | None = None
        if lr_factor is not None:
            self._keep_state(0)

    def __call__(self, window: Window) -> None:
        observations = self._observations()  # once per window: it reads every layer's counts
        if self.lr_factor is not None:
            cause = _nonfinite(window) or _learning_rate_cause(observations, self.thresholds)
            if cause is not None and self._rewind(window, cause):
                return
        self._revive(window, observations.layers)
        if self.lr_factor is not None and not unstable_window(window, self.thresholds):
            self._keep_state(window.end_step)

    # -- recycling ------------------------------------------------------------------------
    def _revive(self, window: Window, layers: list[LayerReport]) -> None:
        example = self._example()
        if example is None or not any(layer.dead and layer.can_die for layer in layers):
            return
        with self._counting_off():
            record = revive_units(
                self.model,
                Report(layers=layers, windows=[], findings=[]),
                self.optimizer,
                example=example,
                max_units=self.cap,
            )
        revived = record.details["revived"]
        entry: dict[str, Any] = {
            "action": "revive",
            "step": window.end_step,
            "window": window.index,
            "revived": revived,
        }
        if record.skipped:
            entry["skipped"] = record.skipped
        self.actions.append(entry)
        if revived:
            logger.info(
                "reludoctor at step %d: revived %s",
                window.end_step,
                ", ".join(f"{len(u)} units of {printable(name)}" for name, u in revived.items()),
            )

    # -- rewinding ------------------------------------------------------------------------
    def _keep_state(self, step: int) -> None:
        self._stable = SavedState.take(self.model, self.optimizer, step)

    def _rewind(self, window: Window, cause: str) -> bool:
        """Back to the last stable state with lower learning rates; False if impossible."""
        assert self._stable is not None and self.lr_factor is not None
        step = self._stable.step
        before = [group["lr"] for group in self.optimizer.param_groups]
        after = [float(lr) / self.lr_factor for lr in before]
        try:
            self._stable.restore(self.model, self.optimizer)
        except (RuntimeError, ValueError, KeyError) as error:
            logger.warning(
                "reludoctor at step %d: could not rewind to step %d (%s); recycling units only",
                window.end_step,
                step,
                error,
            )
            return False
        for group, lr in zip(self.optimizer.param_groups, after, strict=True):
            group["lr"] = lr
        self.actions.append(
            {
                "action": "rewind",
                "step": window.end_step,
                "window": window.index,
                "rewound_to": step,
                "learning_rates": {"before": before, "after": after},
                "reason": cause,
            }
        )
        logger.warning(
            "reludoctor at step %d: %s; rewound model and optimizer to step %d and lowered "
            "the learning rate %s -> %s",
            window.end_step,
            cause,
            step,
            _rates(before),
            _rates(after),
        )
        return True


def _learning_rate_cause(observations: Observations, thresholds: Thresholds) -> str | None:
    """The high_learning_rate rule's message, if it fires."""
    findings = run_rules(observations, thresholds, (high_learning_rate,)).findings
    return next((f.message for f in findings), None)


def _nonfinite(window: Window) -> str | None:
    if window.loss_nonfinite or any(layer.nonfinite_units for layer in window.layers):
        return "the loss or activations became non-finite (inf/NaN)"
    return None


def _rates(rates: list[float]) -> str:
    return ", ".join(f"{lr:.3g}" for lr in rates)
