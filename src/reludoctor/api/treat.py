"""``rd.treat``: try the remedies the diagnosis ranks, on copies, and keep what measurably works.

>>> import torch, torch.nn.functional as F
>>> import reludoctor as rd
>>> from reludoctor.scenarios import ZeroInit
>>> setup = ZeroInit().build()
>>> batches = setup.batches(32)
>>> treatment = rd.treat(setup.model, setup.optimizer, batches, F.mse_loss, steps=50)
>>> treatment.winner.remedy
'revive_units'
>>> float(setup.model[0].weight.detach().abs().sum())  # untouched until applied
0.0
>>> record = treatment.apply(setup.model, setup.optimizer, example=batches[0][0])
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from reludoctor.api.monitor import silenced_live_findings, watch
from reludoctor.api.scan import scan
from reludoctor.catalogue.remedies import REMEDY_CATALOGUE, TREATABLE
from reludoctor.fix.remedies import (
    RemedyError,
    RemedyRecord,
    add_batch_norm,
    kaiming_init,
    lower_learning_rate,
    reset_norm_shift,
    swap_activation,
)
from reludoctor.fix.revive import revive_units
from reludoctor.report.report import Report

#: A remedy is recommended only when it lowers the loss reached by at least this share.
MIN_IMPROVEMENT = 0.05
#: Share of the last steps whose mean loss is "the loss reached".
FINAL_SHARE = 0.1

LossFn = Callable[[Any, Any], torch.Tensor]


def _apply(
    code: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    example: torch.Tensor,
    options: dict[str, Any] | None = None,
) -> RemedyRecord:
    """Apply the remedy ``code`` (with ``options``) to ``model``/``optimizer`` in place."""
    options = options or {}
    remedy = REMEDY_CATALOGUE.get(code)
    if remedy is not None and remedy.swap_to is not None:
        return swap_activation(model, remedy.swap_to)
    if code == "kaiming_init":
        return kaiming_init(model)
    if code == "batch_norm":
        return add_batch_norm(model, optimizer)
    if code == "lower_learning_rate":
        return lower_learning_rate(optimizer, options.get("factor", 10.0))
    if code == "reset_norm_shift":
        return reset_norm_shift(model)
    if code == "revive_units":
        report = scan(model, example, batch_size=len(example))
        return revive_units(model, report, optimizer, example=example)
    raise RemedyError(f"{code} is not a change reludoctor can make to a model in place")


@dataclass
class Trial:
    """One remedy tried on a copy: the loss reached, the alive fraction, and the change."""

    remedy: str
    loss: float | None
    alive_fraction: float | None
    improvement: float | None  # (untreated loss - this loss) / untreated loss
    worst_dead_fraction: float | None = None  # the deadest layer's, at the end
    changed: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def label(self) -> str:
        """The remedy with its options, e.g. ``lower_learning_rate (factor 100)``."""
        options = ", ".join(f"{key} {value:g}" for key, value in self.options.items())
        return f"{self.remedy} ({options})" if options else self.remedy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Treatment:
    """The untreated run, every trial, and the ranking (best first)."""

    steps: int
    untreated_loss: float
    untreated_alive_fraction: float | None
    candidates: list[str]
    trials: list[Trial]
    not_tried: list[str] = field(default_factory=list)
    untreated_worst_dead_fraction: float | None = None

    @property
    def ranking(self) -> list[Trial]:
        """Trials that lowered the loss by at least :data:`MIN_IMPROVEMENT`, best first."""
        worked = [
            t for t in self.trials if t.improvement is not None and t.improvement >= MIN_IMPROVEMENT
        ]
        return sorted(worked, key=lambda t: (-(t.improvement or 0), -(t.alive_fraction or 0)))

    @property
    def winner(self) -> Trial | None:
        ranking = self.ranking
        return ranking[0] if ranking else None

    @property
    def verdict(self) -> str:
        """One line: the winner and its change of loss, or why there is none."""
        winner = self.winner
        if winner is not None:
            return f"{winner.label} {-(winner.improvement or 0):+.0%}"
        return "no remedy helped" if self.candidates else "no finding to treat"

    def apply(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        example: torch.Tensor | None = None,
    ) -> RemedyRecord:
        """Apply the winning remedy to the user's model and optimizer (``example``: one input
        batch, needed by ``revive_units``)."""
        if self.winner is None:
            raise RemedyError("treat found no remedy that lowered the loss: nothing to apply")
        if self.winner.remedy == "revive_units" and example is None:
            raise RemedyError("applying revive_units needs example= (one input batch)")
        winner = self.winner
        return _apply(winner.remedy, model, optimizer, example, winner.options)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "untreated_loss": self.untreated_loss,
            "untreated_alive_fraction": self.untreated_alive_fraction,
            "untreated_worst_dead_fraction": self.untreated_worst_dead_fraction,
            "candidates": self.candidates,
            "not_tried": self.not_tried,
            "trials": [t.to_dict() for t in self.trials],
            "ranking": [t.label for t in self.ranking],
            "verdict": self.verdict,
        }


def treat(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Any, Any]],
    loss_fn: LossFn,
    *,
    steps: int = 200,
    report: Report | None = None,
    remedies: Iterable[str] | None = None,
) -> Treatment:
    """Try the remedies the diagnosis ranks for this model, each on a copy of ``model`` and
    ``optimizer`` trained ``steps`` steps on ``batches`` (cycled), against an untreated copy
    trained the same way. The user's model and optimizer are not touched: call
    :meth:`Treatment.apply` to apply the winner.

    ``report`` is the diagnosis to follow (by default the untreated copy's own run is
    diagnosed); ``remedies`` overrides which to try. A healthy run gets no candidates.
    """
    if not isinstance(steps, int) or steps < 1:
        raise RemedyError(f"treat: steps must be an integer >= 1, not {steps!r}")
    _check_optimizer(model, optimizer)
    kept = _take_batches(batches, steps)
    _check_device(model, kept[0][0])

    untreated_model, untreated_opt = copy.deepcopy((model, optimizer))
    untreated_loss, untreated_alive, untreated_report = _train(
        untreated_model, untreated_opt, kept, loss_fn, steps
    )
    diagnosis = report or untreated_report
    if remedies is not None:
        candidates = list(dict.fromkeys(remedies))
        unknown = [c for c in candidates if c not in TREATABLE]
        if unknown:
            raise RemedyError(
                f"treat: cannot try {', '.join(unknown)}; choose from {', '.join(TREATABLE)}"
            )
        not_tried: list[str] = []
    else:
        ranked = diagnosis.remedies() if not diagnosis.healthy else []
        candidates = [c for c in ranked if c in TREATABLE]
        not_tried = [c for c in ranked if c not in TREATABLE]
    trials = []
    for code in candidates:
        for options in REMEDY_CATALOGUE[code].variants:
            trials.append(
                _trial(code, dict(options), model, optimizer, kept, loss_fn, steps, untreated_loss)
            )
    return Treatment(
        steps,
        untreated_loss,
        untreated_alive,
        candidates,
        trials,
        not_tried,
        _worst_dead_fraction(untreated_report),
    )


def _trial(
    code: str,
    options: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[Any, Any]],
    loss_fn: LossFn,
    steps: int,
    untreated_loss: float,
) -> Trial:
    """Apply one remedy to copies of model and optimizer, train them, and measure."""
    trial_model, trial_opt = copy.deepcopy((model, optimizer))
    try:
        record = _apply(code, trial_model, trial_opt, batches[0][0], options)
    except RemedyError as error:
        return Trial(code, None, None, None, error=str(error), options=options)
    loss, alive, report = _train(trial_model, trial_opt, batches, loss_fn, steps)
    improvement = (untreated_loss - loss) / abs(untreated_loss) if untreated_loss else None
    if improvement is not None and not math.isfinite(improvement):
        improvement = None
    worst = _worst_dead_fraction(report)
    return Trial(code, loss, alive, improvement, worst, record.changed, options=options)


def _worst_dead_fraction(report: Report) -> float:
    """The highest dead fraction among layers whose units can die (0 when there are none)."""
    return max((layer.dead_fraction for layer in report.layers if layer.can_die), default=0.0)


def _check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        raise RemedyError(f"treat needs a torch optimizer, not {type(optimizer).__name__}")
    owned = {id(p) for g in groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
    if missing:
        raise RemedyError(
            f"treat: the optimizer does not own {missing[0]} (and {len(missing) - 1} more) of "
            "the model's trainable parameters; pass the optimizer that trains this model"
        )


def _take_batches(batches: Iterable[tuple[Any, Any]], steps: int) -> list[tuple[Any, Any]]:
    kept = list(itertools.islice(iter(batches), steps))
    if not kept:
        raise RemedyError("treat: batches gave nothing; pass (inputs, targets) pairs")
    if not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in kept):
        raise RemedyError("treat: each batch must be an (inputs, targets) pair")
    return kept


def _check_device(model: nn.Module, x: Any) -> None:
    param = next(model.parameters(), None)
    if isinstance(x, torch.Tensor) and param is not None and x.device != param.device:
        raise RemedyError(
            f"treat: the model is on {param.device} but the batches are on {x.device}; move "
            "one to the other's device"
        )


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[Any, Any]],
    loss_fn: LossFn,
    steps: int,
) -> tuple[float, float | None, Report]:
    """Train ``steps`` steps (cycling ``batches``) watched; the mean loss over the last
    :data:`FINAL_SHARE` of steps, the alive fraction of the layers whose units can die, and
    the report."""
    losses: list[torch.Tensor] = []
    model.train()
    window = max(1, min(100, steps // 5))  # a few windows, so units dying in the run show
    with silenced_live_findings(), watch(model, optimizer=optimizer, window=window) as doc:
        for x, y in itertools.islice(itertools.cycle(batches), steps):
            loss = loss_fn(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            doc.step(loss=loss)
            losses.append(loss.detach())
        report = doc.report()
    tail = torch.stack(losses[-max(1, int(steps * FINAL_SHARE)) :]).float()
    final = float(tail.mean())
    dead = report.mortal_dead_fraction()
    alive = None if dead is None else 1 - dead
    return final, alive, report
