"""Repair on autopilot: what ``rd.watch(..., repair=True)`` does at the end of each window.

The run is **sick** when it collapsed (the window's outputs are identical across the batch:
their spread at most ``Thresholds.identical_spread``) or a layer whose units can die is dead
at ``Thresholds.dead_error_fraction`` or more. A sick run whose loss still improves (by
``Thresholds.plateau_improvement`` over the window before) is left alone, and so is every
healthy one. Otherwise the autopilot takes the next step of its ladder, one per window:

1. ``revive`` - recycle the dead units in place (:func:`reludoctor.fix.revive.revive_units`);
2. ``rewind`` - back to the last healthy window's model and optimizer, every learning rate
   divided by 10;
3. ``batch_norm`` - batch norm between each Linear/Conv and its ReLU in ``nn.Sequential``
   stacks, the new parameters added to the optimizer
   (:func:`~reludoctor.fix.remedies.add_batch_norm`);
4. ``leaky_relu`` - ReLU swapped for LeakyReLU (gradients below 0 again);
5. ``kaiming_init`` - every ReLU layer re-initialised (He), the optimizer's state cleared.

Each action is judged at the next window's end: when that window's mean loss is above the
mean loss of the window that led to the action, or went non-finite, the action is undone
(model, optimizer and learning rates as they were) and the next step is tried at the
following window. Without losses (``doc.step()`` given none) an action is kept unjudged. An action
that cannot apply (no dead unit with a Linear/Conv feeding it; a model whose layers run in a
custom ``forward``; a compiled model, whose graph a structural change would invalidate) is
skipped with the reason and the next step tried at once. Without a ``torch.optim`` optimizer
only recycling is possible: the other steps are skipped, and said so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from reludoctor.catalogue.activations import can_die
from reludoctor.diagnose.rules import Observations, identical_window
from reludoctor.diagnose.summaries import Window
from reludoctor.diagnose.thresholds import Thresholds
from reludoctor.fix.remedies import (
    RemedyError,
    RemedyRecord,
    add_batch_norm,
    kaiming_init,
    swap_activation,
)
from reludoctor.fix.revive import revive_units
from reludoctor.fix.saved_state import SavedState, cpu_copy
from reludoctor.probe.compiled import is_compiled
from reludoctor.report.report import Report
from reludoctor.text import short_number

logger = logging.getLogger("reludoctor")

#: The autopilot's steps, in the order it takes them while the run stays sick.
LADDER = ("revive", "rewind", "batch_norm", "leaky_relu", "kaiming_init")
#: Steps that change the model's structure or all of its weights.
STRUCTURAL = frozenset({"batch_norm", "leaky_relu", "kaiming_init"})
#: With ``rewind``, learning rates are divided by this.
REWIND_FACTOR = 10.0
#: Most units one ``revive`` recycles.
REVIVE_CAP = 128


class Autopilot:
    """Acts at each window's end for a monitor; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        *,
        thresholds: Thresholds,
        observations: Callable[[], Observations],
        example: Callable[[], torch.Tensor | None],
        counting_off: Callable[[], Any],
        compiled: Callable[[], bool] = lambda: False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.thresholds = thresholds
        self._observations = observations
        self._example = example
        self._counting_off = counting_off
        self._compiled = compiled
        #: Every action taken or skipped, with its evidence and its verdict.
        self.actions: list[dict[str, Any]] = []
        self._next = 0  # the ladder's next step
        self._previous_loss: float | None = None
        self._pending: tuple[dict[str, Any], Callable[[], None], float | None] | None = None
        self._healthy_state: SavedState | None = None
        if self.known_optimizer:
            self._keep_state(0)

    @property
    def known_optimizer(self) -> bool:
        """Whether the optimizer (set later when the monitor learns it) is a ``torch.optim``
        one: the steps beyond recycling need its state and parameter groups."""
        return isinstance(self.optimizer, torch.optim.Optimizer)

    def __call__(self, window: Window) -> None:
        loss = window.loss_mean
        loss = loss if loss is not None and math.isfinite(loss) else None
        if self._pending is not None:
            self._judge(window, loss)
        previous, self._previous_loss = self._previous_loss, loss
        sickness = self._sickness(window)
        if sickness is None:
            if self.known_optimizer:
                self._keep_state(window.end_step)
            return
        if _improving(previous, loss, self.thresholds):
            return
        self._act(window, sickness, loss)

    # -- judging ------------------------------------------------------------------------------
    def _sickness(self, window: Window) -> str | None:
        """Why the window is sick (None: it is not)."""
        t = self.thresholds
        if identical_window(window, t):
            return f"the outputs are identical across the batch (spread {window.output_spread:.2g})"
        dead = [
            layer
            for layer in window.layers
            if can_die(layer.kind) and layer.units and layer.dead_fraction >= t.dead_error_fraction
        ]
        if dead:
            worst = max(dead, key=lambda layer: layer.dead_fraction)
            return f"{worst.dead_fraction:.0%} of {worst.name}'s units are dead"
        return None

    def _judge(self, window: Window, loss: float | None) -> None:
        """Keep the pending action, or undo it when the window after it is worse."""
        assert self._pending is not None
        entry, undo, before = self._pending
        self._pending = None
        entry["loss_after"] = loss
        worse = window.loss_nonfinite or (before is not None and loss is not None and loss > before)
        if not worse and (before is None or loss is None):
            entry["verdict"] = "kept (no loss to judge it by: pass loss= to doc.step)"
        elif worse:
            undo()
            entry["verdict"] = "undone"
            logger.warning(
                "reludoctor at step %d: undid %s (loss %s -> %s)",
                window.end_step,
                entry["action"],
                short_number(before),
                short_number(loss),
            )
        else:
            entry["verdict"] = "kept"

    # -- acting -------------------------------------------------------------------------------
    def _act(self, window: Window, sickness: str, loss: float | None) -> None:
        while self._next < len(LADDER):
            step = LADDER[self._next]
            self._next += 1
            entry: dict[str, Any] = {
                "action": step,
                "step": window.end_step,
                "window": window.index,
                "evidence": sickness,
                "loss_before": loss,
            }
            try:
                undo = self._apply(step)
            except (RemedyError, RuntimeError, ValueError, KeyError) as error:
                entry["skipped"] = str(error)
                self.actions.append(entry)
                continue
            self.actions.append(entry)
            self._pending = (entry, undo, loss)
            logger.warning(
                "reludoctor at step %d: %s; autopilot: %s", window.end_step, sickness, step
            )
            return

    def _apply(self, step: str) -> Callable[[], None]:
        """Apply ``step`` in place; how to undo it. Raises when it cannot apply."""
        if step != "revive" and not self.known_optimizer:
            raise RemedyError(
                f"{step} needs a torch.optim optimizer (given {type(self.optimizer).__name__})"
            )
        if step in STRUCTURAL and (self._compiled() or is_compiled(self.model)):
            raise RemedyError(f"{step} would change a compiled model's graph")
        if step == "revive":
            return self._revive().undo
        if step == "rewind":
            if self._healthy_state is None:
                raise RemedyError("no healthy window's state was kept to rewind to")
            return self._rewind()
        saved = cpu_copy(self.optimizer.state_dict())
        record = _STRUCTURAL_REMEDIES[step](self.model, self.optimizer)

        def undo() -> None:
            record.undo()
            self.optimizer.load_state_dict(saved)

        return undo

    def _revive(self) -> RemedyRecord:
        example = self._example()
        if example is None:
            raise RemedyError("no input batch seen yet to trace the dead units with")
        layers = self._observations().layers
        with self._counting_off():
            record = revive_units(
                self.model,
                Report(layers=layers, windows=[], findings=[]),
                self.optimizer if self.known_optimizer else None,
                example=example,
                max_units=REVIVE_CAP,
            )
        if not record.details.get("revived"):
            raise RemedyError("; ".join(record.skipped) or "no dead unit to revive")
        return record

    def _keep_state(self, step: int) -> None:
        self._healthy_state = SavedState.take(self.model, self.optimizer, step)

    def _rewind(self) -> Callable[[], None]:
        assert self._healthy_state is not None
        replaced = self._healthy_state.restore(self.model, self.optimizer)
        for group in self.optimizer.param_groups:
            group["lr"] = float(group["lr"]) / REWIND_FACTOR
        return lambda: replaced.restore(self.model, self.optimizer)


def _kaiming(model: nn.Module, optimizer: torch.optim.Optimizer) -> RemedyRecord:
    record = kaiming_init(model)
    optimizer.state.clear()
    return record


_STRUCTURAL_REMEDIES: dict[str, Callable[[nn.Module, Any], RemedyRecord]] = {
    "batch_norm": add_batch_norm,
    "leaky_relu": lambda model, _: swap_activation(model, "leaky_relu"),
    "kaiming_init": _kaiming,
}


def _improving(previous: float | None, loss: float | None, t: Thresholds) -> bool:
    """Whether the loss fell by ``plateau_improvement`` of itself since the window before."""
    if previous is None or loss is None or previous <= 0:
        return False
    return (previous - loss) / previous >= t.plateau_improvement
