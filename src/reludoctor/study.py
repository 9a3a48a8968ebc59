"""Answer the "Solution?" list of "Is ReLU Dead?" with measurements on its data (E1).

Each :class:`Variant` changes one thing of the E1 baseline (more data, dropout, more layers,
more epochs, another initialiser or activation, batch norm, a lower learning rate), trains it
under the monitor for a few seeds and records the final losses, the share of explained
variance (R^2) on the validation split, the dead fraction, the gradient norm of the first
layer and what reludoctor diagnosed. The verdict ("learns", "stuck", or "learns in k of n
runs") comes from R^2 alone and is set beside what the article says. The treatment column is
:func:`reludoctor.api.treat` on a fresh build of the first seed's model, following that run's
diagnosis: the remedy that lowered the loss most over ``treat_steps`` steps, or why none.

    >>> from reludoctor.study import run_study
    >>> result = run_study(samples=5_000, epochs=1, seeds=1, keys=["baseline"])
    >>> result.outcomes[0].verdict
    'stuck'
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from reludoctor.api.monitor import silenced_live_findings
from reludoctor.api.treat import Treatment, treat
from reludoctor.errors import InputError
from reludoctor.files import atomic_write_text
from reludoctor.report.report import Report
from reludoctor.scenarios import IsReluDead, RunResult

#: A run "learns" when it explains at least this share of the validation targets' variance.
#: A dead unit predicts 0 (R^2 far below 0); the best single ReLU reaches about 0.996 here.
LEARNED_R2 = 0.5

#: A run that does not fit yet but whose training loss fell by this share over its second half
#: of epochs is "learning slowly" (alive, helped), not stuck.
STILL_IMPROVING = 0.1

#: Training steps of each remedy (and of the untreated copy) in the treatment column.
TREAT_STEPS = 200

#: Rows of the training split used to measure the first layer's gradient after training.
GRADIENT_PROBE_ROWS = 8192

TARGET = "y = -x @ [1, 2, 3, 4] + 0.1 * noise (the article does not state its target)"

Claim = Literal["stuck", "helps"]


@dataclass(frozen=True)
class Variant:
    """One change to the E1 baseline (``changes``: fields of :class:`IsReluDead`), with what
    the article says it does: ``"stuck"`` (does not help), ``"helps"``, or None (not tried)."""

    key: str
    label: str
    changes: dict[str, Any] = field(default_factory=dict)
    article: Claim | None = None
    article_says: str = "not tried in the article"
    samples_factor: int = 1
    epochs_factor: int = 1


_INIT_SAYS = "no lasting effect: a slight early improvement, then gradients pulled to zero"
_ACT_SAYS = "fails here: vanishing gradients"

VARIANTS: tuple[Variant, ...] = (
    Variant("baseline", "baseline", {}, "stuck",
            "loss flat; output and gradients 0 for all 25 epochs"),
    Variant("more_data", "more data (2x)", {}, "stuck",
            "a big no: more data of the same distribution does not help", samples_factor=2),
    Variant("dropout", "dropout 0.2", {"dropout": 0.2}, "stuck",
            "dropout has little effect on dead activations"),
    Variant("more_layers", "3 hidden layers", {"hidden": (16, 16, 16)}, "stuck",
            "gradients still zero in every layer"),
    Variant("more_epochs", "more epochs (3x)", {}, "stuck",
            "no: a dead unit gets no gradient, so its weights never change", epochs_factor=3),
    Variant("he_normal", "he_normal", {"init": "he_normal"}, "stuck", _INIT_SAYS),
    Variant("he_uniform", "he_uniform", {"init": "he_uniform"}, "stuck", _INIT_SAYS),
    Variant("lecun_uniform", "lecun_uniform", {"init": "lecun_uniform"}, "stuck", _INIT_SAYS),
    Variant("random_uniform", "random_uniform", {"init": "random_uniform"}, "stuck", _INIT_SAYS),
    Variant("negative_uniform", "uniform(-1, 0)", {"init": "negative_uniform"}, "stuck",
            "gradients became zero as the epochs increased; output pulled to zero"),
    Variant("tanh", "tanh", {"activation": "tanh"}, "stuck", _ACT_SAYS),
    Variant("sigmoid", "sigmoid", {"activation": "sigmoid"}, "stuck", _ACT_SAYS),
    Variant("leaky_relu", "LeakyReLU", {"activation": "leaky_relu"}, "stuck", _ACT_SAYS),
    Variant("prelu", "PReLU", {"activation": "prelu"}),
    Variant("elu", "ELU", {"activation": "elu"}),
    Variant("selu", "SELU", {"activation": "selu", "init": "lecun_normal", "dropout": 0.1},
            "helps", "the only fix: gradients pulled away from zero, output small but not zero"),
    Variant("batch_norm", "batch norm", {"batch_norm": True}),
    Variant("lower_lr", "lr 1e-4 (10x lower)", {"lr": 1e-4}),
)  # fmt: skip


def _verdict(r2: float, train_loss: list[float]) -> str:
    """One run's verdict: it fits the target, is still getting better, or is stuck."""
    if r2 >= LEARNED_R2:
        return "learns"
    half = train_loss[len(train_loss) // 2]
    if train_loss[-1] <= (1 - STILL_IMPROVING) * half:
        return "learns slowly"
    return "stuck"


@dataclass
class Outcome:
    """One variant's measurements, averaged over its runs (one run per seed), and each run's
    verdict ("learns", "learns slowly" or "stuck")."""

    key: str
    label: str
    changes: dict[str, Any]
    train_loss: float
    val_loss: float
    r2: float
    dead_fraction: float | None
    first_layer_grad: float
    causes: list[str]
    article: Claim | None
    article_says: str
    run_verdicts: list[str]
    #: :meth:`reludoctor.api.treat.Treatment.to_dict` of the first seed (None: not treated).
    treatment: dict[str, Any] | None = None

    @property
    def runs(self) -> int:
        return len(self.run_verdicts)

    @property
    def helped_runs(self) -> int:
        """Runs that were not stuck."""
        return sum(v != "stuck" for v in self.run_verdicts)

    @property
    def verdict(self) -> str:
        """The runs' common verdict, or how they split (e.g. "stuck in 1 of 3 runs")."""
        if len(set(self.run_verdicts)) == 1:
            return self.run_verdicts[0]
        stuck = self.runs - self.helped_runs
        if stuck == 0:
            return "learns slowly" if "learns slowly" in self.run_verdicts else "learns"
        return f"stuck in {stuck} of {self.runs} runs"

    @property
    def agrees(self) -> bool | None:
        """Whether the measurement agrees with the article (None where it did not try)."""
        if self.article is None:
            return None
        if self.article == "stuck":
            return self.helped_runs == 0
        return self.helped_runs == self.runs

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(verdict=self.verdict, agrees=self.agrees)
        return data


@dataclass
class StudyResult:
    """The whole grid: settings, one :class:`Outcome` per variant, and the time it took."""

    samples: int
    epochs: int
    seeds: int
    outcomes: list[Outcome]
    seconds: float
    treat_steps: int = 0

    def legend(self) -> str:
        """What the table's columns and verdicts mean, and how long the study took."""
        treatment = (
            f"treatment: rd.treat on the first seed's fresh model for {self.treat_steps} steps: "
            "the remedy that lowered the loss most, and by how much. "
            if self.treat_steps
            else ""
        )
        return (
            f"target {TARGET}. verdict: 'learns' at R^2 >= {LEARNED_R2} on the validation "
            f"split, 'learns slowly' when the training loss still fell by {STILL_IMPROVING:.0%} "
            "over the second half of the epochs, else 'stuck'. dead: ReLU units never positive "
            "in the last window (- where the activation cannot die). grad L1: gradient norm of "
            f"the first layer's weights after training. article: what it says (- not tried). "
            f"{treatment}{self.seconds:.0f} s."
        )

    def disagreements(self) -> list[str]:
        """One sentence per variant whose measurement contradicts the article."""
        lines = []
        for o in self.outcomes:
            if o.agrees is False:
                dead = f", {o.dead_fraction:.0%} dead" if o.dead_fraction is not None else ""
                lines.append(
                    f"{o.label}: the article: {o.article_says}; measured: {o.verdict} "
                    f"(R^2 {o.r2:.2f}, first-layer gradient {o.first_layer_grad:.2g}{dead})"
                )
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": "Is ReLU Dead? solution list (E1 data: x uniform in (-1, 0), 4 features)",
            "target": TARGET,
            "samples": self.samples,
            "epochs": self.epochs,
            "seeds": self.seeds,
            "learned_r2": LEARNED_R2,
            "still_improving": STILL_IMPROVING,
            "treat_steps": self.treat_steps,
            "seconds": round(self.seconds, 1),
            "outcomes": [o.to_dict() for o in self.outcomes],
            "disagreements": self.disagreements(),
        }

    def to_csv(self) -> str:
        columns = [
            "key", "label", "train_loss", "val_loss", "r2", "dead_fraction",
            "first_layer_grad", "causes", "verdict", "article", "agrees", "treatment",
        ]  # fmt: skip
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for o in self.outcomes:
            row = o.to_dict()
            row["causes"] = " ".join(o.causes)
            row["treatment"] = o.treatment["verdict"] if o.treatment else ""
            writer.writerow(row)
        return buffer.getvalue()

    def save(self, folder: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``study.csv`` and ``study.json`` into ``folder``, each atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        csv_path = atomic_write_text(folder / "study.csv", self.to_csv())
        json_path = atomic_write_text(
            folder / "study.json", json.dumps(self.to_dict(), indent=2) + "\n"
        )
        return csv_path, json_path


def select(keys: Iterable[str] | None) -> list[Variant]:
    """The variants named by ``keys`` (all when None), in the grid's order."""
    if keys is None:
        return list(VARIANTS)
    wanted = list(keys)
    known = {v.key for v in VARIANTS}
    unknown = [k for k in wanted if k not in known]
    if unknown:
        raise InputError(
            f"unknown study variant(s) {', '.join(unknown)}; choose from {', '.join(known)}"
        )
    return [v for v in VARIANTS if v.key in wanted]


def run_study(
    *,
    samples: int = 200_000,
    epochs: int = 10,
    seeds: int = 3,
    keys: Iterable[str] | None = None,
    on_run: Callable[[Variant, int], None] | None = None,
    treat_steps: int = TREAT_STEPS,
) -> StudyResult:
    """Train every selected variant once per seed; ``on_run(variant, seed)`` after each run.
    Then treat the first seed's configuration for ``treat_steps`` steps (0: no treatment)."""
    if samples < 1000 or epochs < 1 or seeds < 1 or treat_steps < 0:
        raise InputError(
            f"the study needs samples >= 1000, epochs >= 1, seeds >= 1 and treat_steps >= 0 "
            f"(got {samples}, {epochs}, {seeds}, {treat_steps})"
        )
    variants = select(keys)
    start = time.perf_counter()
    outcomes = []
    for variant in variants:
        runs = []
        first: tuple[IsReluDead, Report] | None = None
        for seed in range(seeds):
            scenario = IsReluDead(
                samples=samples * variant.samples_factor,
                epochs=epochs * variant.epochs_factor,
                seed=seed,
                **variant.changes,
            )
            setup = scenario.build()
            with _quietly():
                result = scenario.run(setup=setup)
            assert result.report is not None
            runs.append(_measure(result, setup.train, setup.val))
            first = first or (scenario, result.report)
            if on_run is not None:
                on_run(variant, seed)
        outcome = _combine(variant, runs)
        if treat_steps and first is not None:
            outcome.treatment = _treat(*first, treat_steps).to_dict()
        outcomes.append(outcome)
    return StudyResult(samples, epochs, seeds, outcomes, time.perf_counter() - start, treat_steps)


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    with silenced_live_findings(), warnings.catch_warnings():
        # tanh and sigmoid have no ReLU-family activation to watch: expected here
        warnings.filterwarnings("ignore", "reludoctor saw no ReLU-family activation")
        yield


def _treat(scenario: IsReluDead, report: Report, steps: int) -> Treatment:
    """rd.treat on a fresh build of ``scenario``, following ``report``'s diagnosis."""
    setup = scenario.build()
    with _quietly():
        return treat(
            setup.model,
            setup.optimizer,
            setup.batches(scenario.batch_size),
            setup.loss_fn,
            steps=steps,
            report=report,
        )


@dataclass
class _Run:
    train_loss: float
    val_loss: float
    r2: float
    dead_fraction: float | None
    first_layer_grad: float
    causes: list[str]
    verdict: str


def _measure(
    result: RunResult,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
) -> _Run:
    report = result.report
    assert report is not None
    dead = report.mortal_dead_fraction()
    r2 = 1.0 - result.val_loss[-1] / float(val[1].var())
    return _Run(
        train_loss=result.train_loss[-1],
        val_loss=result.val_loss[-1],
        r2=r2,
        dead_fraction=dead,
        first_layer_grad=_first_layer_grad(result.model, train),
        causes=[f.code for f in report.causes()],
        verdict=_verdict(r2, result.train_loss),
    )


def _first_layer_grad(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Norm of the first Linear layer's weight gradient on the first training rows, in eval mode."""
    first = next(m for m in model.modules() if isinstance(m, nn.Linear))
    model.eval()
    model.zero_grad()
    x, y = train[0][:GRADIENT_PROBE_ROWS], train[1][:GRADIENT_PROBE_ROWS]
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert first.weight.grad is not None
    return float(first.weight.grad.norm())


def _combine(variant: Variant, runs: list[_Run]) -> Outcome:
    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    dead = [r.dead_fraction for r in runs if r.dead_fraction is not None]
    return Outcome(
        key=variant.key,
        label=variant.label,
        changes=dict(variant.changes),
        train_loss=mean([r.train_loss for r in runs]),
        val_loss=mean([r.val_loss for r in runs]),
        r2=mean([r.r2 for r in runs]),
        dead_fraction=mean(dead) if dead else None,
        first_layer_grad=mean([r.first_layer_grad for r in runs]),
        causes=list(dict.fromkeys(c for r in runs for c in r.causes)),
        article=variant.article,
        article_says=variant.article_says,
        run_verdicts=[r.verdict for r in runs],
    )
