"""``rd.watch``: the monitor a training loop keeps on for the whole run."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from reludoctor.checks import positive_int, require_module
from reludoctor.diagnose.facts import ModelFacts, read_model_facts, read_optimizer_facts
from reludoctor.diagnose.findings import Finding
from reludoctor.diagnose.observe import observe
from reludoctor.diagnose.rules import LIVE_RULES, Observations, run_rules
from reludoctor.diagnose.summaries import LayerReport, Window
from reludoctor.diagnose.summarize import DORMANCY_THRESHOLD, UNIT_DETAIL_LIMIT, Summarizer
from reludoctor.diagnose.thresholds import Thresholds
from reludoctor.fix.autopilot import Autopilot
from reludoctor.fix.live_revival import LiveRevival
from reludoctor.probe.compiled import compiled_module, is_compiled
from reludoctor.probe.probes import BACKEND_REASON, Probes, model_name
from reludoctor.probe.ranks import DEFAULT_RANK_TIMEOUT, world
from reludoctor.probe.tracker import Tracker
from reludoctor.report.build import build_report
from reludoctor.report.report import Report
from reludoctor.text import printable

if TYPE_CHECKING:
    from reludoctor.probe.distributed import RankCombiner
    from reludoctor.report.sinks import RunLog
    from reludoctor.report.tensorboard import TensorBoardLog

DEFAULT_WINDOW = 100
DEFAULT_SAMPLE_EVERY = 10
#: Most units live revival recycles at one window's end (the deadest layers first): a cap
#: keeps one bad window from re-initialising a whole network.
DEFAULT_REVIVE_CAP = 128
#: With live revival, the learning rate is divided by this when it killed units.
DEFAULT_REWIND_LR_FACTOR = 10.0

logger = logging.getLogger("reludoctor")


@contextlib.contextmanager
def silenced_live_findings() -> Iterator[None]:
    """Keep live findings off the ``reludoctor`` logger (for callers that show them)."""
    previous = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = previous


class Monitor:
    """Watches one model's activations; see :func:`watch`."""

    def __init__(
        self,
        model: nn.Module,
        *,
        window: int = DEFAULT_WINDOW,
        sample_every: int = DEFAULT_SAMPLE_EVERY,
        count_eval: bool = False,
        thresholds: Thresholds | None = None,
        dormancy_threshold: float = DORMANCY_THRESHOLD,
        unit_detail_limit: int = UNIT_DETAIL_LIMIT,
        on_window: Callable[[Window], None] | None = None,
        optimizer: Any = None,
        on_finding: Callable[[Finding], None] | None = None,
        revive: bool = False,
        revive_cap: int = DEFAULT_REVIVE_CAP,
        rewind_lr_factor: float | None = DEFAULT_REWIND_LR_FACTOR,
        repair: bool = False,
        log_dir: str | os.PathLike[str] | None = None,
        rank_timeout: float = DEFAULT_RANK_TIMEOUT,
        scaler: Any = None,
    ) -> None:
        wrapper = require_module(model, "rd.watch")
        #: The model watched (the module a ``torch.compile`` wrapper compiles).
        self.model = model = compiled_module(wrapper)
        self._compiled_before = is_compiled(wrapper) or is_compiled(model)
        if revive and optimizer is None:
            raise ValueError(
                "rd.watch(revive=True) needs optimizer=: reviving units resets the optimizer's "
                "state for them"
            )
        if revive and repair:
            raise ValueError(
                "rd.watch: pass revive=True or repair=True, not both (repair=True recycles "
                "units as its first step)"
            )
        revive_cap = positive_int(revive_cap, "revive_cap")
        self.thresholds = thresholds or Thresholds()
        self.optimizer = optimizer
        self.on_finding = on_finding
        self._announced: set[tuple[str, str | None]] = set()
        self._static_facts = read_model_facts(model)
        self.summarizer = Summarizer(dormancy_threshold, unit_detail_limit)
        self.tracker = Tracker(
            positive_int(window, "window"),
            positive_int(sample_every, "sample_every"),
            summarize=self.summarizer.window,
        )
        self.tracker.learning_rate = self._learning_rate
        self.scaler = scaler
        self.tracker.gradient_scale = self._gradient_scale
        self.rank, world_size = world()
        #: Under ``torch.distributed``, what combines the ranks' counts at each window's end.
        self.ranks: RankCombiner | None = None
        if world_size > 1:
            from reludoctor.probe.distributed import RankCombiner

            self.ranks = RankCombiner(rank_timeout)
            self.tracker.combine = self.ranks.combine
        #: Where the run is logged at each window's end (rank 0 only): see :meth:`add_log`.
        self.logs: list[RunLog] = []
        self.tracker.on_window.append(self._write_logs)  # the window, then its findings
        self.tracker.on_window.append(self._announce_findings)
        self.revival: LiveRevival | None = None
        if revive:
            self.revival = LiveRevival(
                model,
                optimizer,
                cap=revive_cap,
                lr_factor=rewind_lr_factor,
                thresholds=self.thresholds,
                observations=self._observations,
                example=lambda: self.example_input,
                counting_off=self._not_counting,
            )
            self.tracker.on_window.append(self.revival)
        self.autopilot: Autopilot | None = None
        if repair and world_size > 1:
            warnings.warn(
                "rd.watch(repair=True) does not repair under torch.distributed yet (each rank "
                "would judge its own loss and could change its copy of the model alone): "
                "watching without repair",
                RuntimeWarning,
                stacklevel=3,
            )
        elif repair:
            self.autopilot = Autopilot(
                model,
                optimizer,
                thresholds=self.thresholds,
                observations=self._observations,
                example=lambda: self.example_input,
                counting_off=self._not_counting,
                compiled=lambda: self.ran_compiled,
            )
            self.tracker.on_window.append(self.autopilot)
        if on_window is not None:
            self.tracker.on_window.append(on_window)
        self.count_eval = count_eval
        self._residual_adds: int | None = None
        #: The TensorBoard log written at each window's end (with ``log_dir``), else None.
        self.tensorboard: TensorBoardLog | None = None
        if log_dir is not None and self.rank == 0:  # other ranks write nothing
            from reludoctor.report.tensorboard import TensorBoardLog

            self.tensorboard = TensorBoardLog(log_dir)
            self.add_log(self.tensorboard)
        try:
            self.probes: Probes | None = Probes(wrapper, self.tracker, count_eval=count_eval)
        except BaseException:
            for log in self.logs:
                log.close()
            raise
        #: Parts of the model whose activations cannot be seen: (module name, reason).
        self.unwatched: list[tuple[str, str]] = list(self.probes.unwatched)
        self._ran_compiled = False
        self._compiled_gap: str | None = None
        self._counted_in_graph = False
        #: The backend a model compiled before watching is compiled with (None: unknown).
        self._backend = self.probes.backend
        self._graph_counts_checked = False
        self.tracker.on_window.append(self._check_graph_counts)
        #: Whether :meth:`begin_counted_step` began a step that has not ended.
        self._counted_step = False

    # -- the training loop's side ---------------------------------------------------------
    def step(
        self,
        loss: torch.Tensor | float | None = None,
        *,
        optimizer: Any = None,
        scaler: Any = None,
    ) -> Window | None:
        """Mark the end of a training step; closes a window every ``window`` steps.

        Cheap: no value is read back from the device except when a window closes.
        ``optimizer`` (once is enough) lets the diagnosis read its type and learning rates,
        as ``rd.watch(optimizer=...)`` does; ``scaler`` (once is enough) is the loop's
        ``torch.amp.GradScaler``, as for ``rd.watch``. Returns the window it closed, or None.

        A ``loss`` that is not a scalar raises ``ValueError``; an error of reludoctor's own
        never does: watching stops (with a warning) and the report says from which step.
        """
        if optimizer is not None:
            self.optimizer = optimizer
            if self.autopilot is not None:
                self.autopilot.optimizer = optimizer
        if scaler is not None:
            self.scaler = scaler
        if loss is not None:
            self.tracker.record_loss(loss)
        try:
            return self.tracker.step()
        except Exception as error:  # reludoctor's own: never the training loop's
            self.tracker.fail(error, step=self.tracker.steps)
            return None

    def begin_counted_step(self, inputs: Any = None) -> None:
        """Count every activation call from now until :meth:`end_counted_step`, however the
        training step reaches the network (forwards of the model itself are counted without
        it). ``inputs``, the step's model input, feeds the input statistics. For frameworks
        that run the step themselves: Lightning's callback calls these around each batch;
        :meth:`counted_step` is the same as a ``with`` block. Nothing happens when the model
        could not be watched or the monitor is closed."""
        probes = self.probes
        if probes is None or self._counted_step:
            return
        probes.enter()
        self._counted_step = True
        if inputs is not None and probes.counting and self.tracker.wants_model_input():
            self.tracker.observe_model_input(inputs)

    def end_counted_step(self) -> None:
        """End what :meth:`begin_counted_step` began (nothing when it did not begin one)."""
        if self._counted_step and self.probes is not None:
            self.probes.leave()
        self._counted_step = False

    @contextlib.contextmanager
    def counted_step(self, inputs: Any = None) -> Iterator[None]:
        """Count every activation call inside, as :meth:`begin_counted_step` does.

        Example:
            >>> import torch, reludoctor as rd
            >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
            >>> with rd.watch(net) as doc:
            ...     with doc.counted_step(inputs=torch.randn(8, 4)):
            ...         _ = net[1](net[0](torch.randn(8, 4)))  # the layers, not the model
            ...     _ = doc.step()
            >>> doc.report().layers[0].samples
            8
        """
        self.begin_counted_step(inputs)
        try:
            yield
        finally:
            self.end_counted_step()

    def _gradient_scale(self) -> torch.Tensor | None:
        """The factor the loop's ``GradScaler`` multiplies gradients by (on their device, no
        read-back), or None without one."""
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler._get_scale_async()

    def _learning_rate(self) -> float | None:
        facts = read_optimizer_facts(self.optimizer) if self.optimizer is not None else None
        return max(facts.learning_rates) if facts and facts.learning_rates else None

    @property
    def revivals(self) -> list[dict[str, Any]]:
        """What live revival did: one entry per window end at which it acted (``action``
        "revive" with the units per layer, or "rewind" with the step and learning rates)."""
        return self.revival.actions if self.revival is not None else []

    @contextlib.contextmanager
    def _not_counting(self) -> Iterator[None]:
        """Forwards inside are not counted (revival's own eval forward)."""
        if self.probes is None:
            yield
            return
        probes, counting = self.probes, self.probes.count_eval
        probes.count_eval = False
        try:
            yield
        finally:
            probes.count_eval = counting

    def layer_reports(self) -> list[LayerReport]:
        """Per-layer summaries over the last closed window and the open one (what
        :meth:`report` holds), without running the rules."""
        _, snapshots = self.tracker.open_window()
        return self.summarizer.layer_reports(self.tracker.layers, snapshots)

    @property
    def example_input(self) -> torch.Tensor | None:
        """The first rows of the first input the model saw while watched (None before)."""
        return self.tracker.example_input

    @property
    def facts(self) -> ModelFacts:
        """What is known of the model, optimizer and inputs so far."""
        static = self._static_facts
        return ModelFacts(
            layers=static.layers,
            norm_layers=static.norm_layers,
            residual_adds=self.probes.residual_adds if self.probes else self._residual_adds,
            optimizer=read_optimizer_facts(self.optimizer) if self.optimizer is not None else None,
            inputs=self.tracker.inputs.facts(),
        )

    def _announce_findings(self, window: Window) -> None:
        """At each window's end: log new symptoms and hand them to ``on_finding``."""
        observations = Observations([], list(self.tracker.windows))
        new = []
        for finding in run_rules(observations, self.thresholds, LIVE_RULES).findings:
            key = (finding.code, finding.layer)
            if finding.severity == "info" or key in self._announced:
                continue
            self._announced.add(key)
            new.append(finding)
            if self.rank == 0:
                logger.warning(
                    "reludoctor at step %d: %s", window.end_step, printable(finding.message)
                )
            if self.on_finding is not None:
                self.on_finding(finding)
        for log in self.logs:
            log.write_findings(new, window.end_step)

    def add_log(self, log: RunLog) -> None:
        """Log the run to ``log`` too: each closed window, the findings announced at its end,
        and the diagnosis at :meth:`close` (see :class:`~reludoctor.report.sinks.RunLog`).
        Under ``torch.distributed``, add logs on rank 0 only."""
        self.logs.append(log)

    def _write_logs(self, window: Window) -> None:
        for log in self.logs:
            log.write_window(window)

    @property
    def steps(self) -> int:
        return self.tracker.steps

    @property
    def layer_names(self) -> list[str]:
        """Names of the activation layers seen so far (they appear at the first forward)."""
        return [layer.site.name for layer in self.tracker.layers]

    # -- results --------------------------------------------------------------------------
    def report(self, *, warn_if_empty: bool = True) -> Report:
        """A report over all closed windows plus the open one.

        Layer summaries (dead units, dormancy, gradients) cover the last closed window and
        the open one together, so even a run shorter than one window gets a report. A report
        with no layer (no activation ran in a counted forward) is warned about, unless
        ``warn_if_empty`` is False.
        """
        report = self._report()
        blind = self.unwatched or self.ran_compiled  # an empty report then says why
        if warn_if_empty and not report.layers and not blind:
            warnings.warn(
                f"reludoctor saw no ReLU-family activation in {printable(model_name(self.model))} "
                "(none ran in a counted forward); the report is empty",
                RuntimeWarning,
                stacklevel=2,
            )
        return report

    def _report(self) -> Report:
        """:meth:`report`, without the warning about an empty one."""
        meta: dict[str, Any] = {
            "model": model_name(self.model),
            "torch": torch.__version__,
            "compiled": self.ran_compiled,
        }
        if isinstance(self.model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            meta["model"] = type(self.model.module).__name__
            meta["wrapper"] = type(self.model).__name__
        if self.revivals:
            meta["revivals"] = self.revivals
        if self.autopilot is not None:
            meta["autopilot"] = [dict(action) for action in self.autopilot.actions]
        if self.ranks is not None:
            meta["ranks"] = self.ranks.meta()
        meta.update(self.tracker.settings())
        meta.update(self.summarizer.settings())
        return build_report(self._observations(), self.thresholds, meta)

    @property
    def ran_compiled(self) -> bool:
        """Whether the model ran under ``torch.compile`` while watched (or is compiled)."""
        traced = self.probes.ran_compiled if self.probes is not None else self._ran_compiled
        return traced or self._compiled_before or is_compiled(self.model)

    def _counted_compiled(self) -> bool:
        """Whether compiled forwards ran with counts in their graph."""
        return self.probes.counted_compiled if self.probes is not None else self._counted_in_graph

    def _counts_dropped(self) -> bool:
        """Whether compiled forwards ran with counts in their graph and none arrived."""
        return self._counted_compiled() and not self.tracker.counted_in_graph()

    def _backend_reason(self) -> str:
        backend = self._backend
        return BACKEND_REASON.format(backend=f" ({backend})" if backend else "")

    def _check_graph_counts(self, window: Window) -> None:
        """At the first window's end after compiled forwards: say at once (one warning) when
        the backend dropped the counts, rather than only in the report."""
        if self._graph_counts_checked or not self._counted_compiled():
            return
        self._graph_counts_checked = True
        if self._counts_dropped():
            message = f"reludoctor: {printable(model_name(self.model))}: {self._backend_reason()}"
            try:
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            except Warning:  # warnings are errors here (python -W error): never raise
                logger.error(message)

    def _observations(self) -> Observations:
        """What the rules see now: layer summaries, every window, and the facts."""
        unwatched = list(self.unwatched)
        probes = self.probes
        gap = probes.compiled_gap if probes is not None else self._compiled_gap
        if gap is None and self._counts_dropped():
            gap = self._backend_reason()
        if gap is not None:
            unwatched.append((model_name(self.model), gap))
        return observe(self.tracker, self.summarizer, self.facts, unwatched)

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Remove every hook and wrapper; with ``log_dir``, write the diagnosis to the
        TensorBoard log and close it. The monitor can still make reports afterwards."""
        self.end_counted_step()
        if self.probes is not None:
            self._residual_adds = self.probes.residual_adds
            self._ran_compiled = self.probes.ran_compiled
            self._compiled_gap = self.probes.compiled_gap
            self._counted_in_graph = self.probes.counted_compiled
            self.probes.remove()
            self.tracker.disarm()
            self.probes = None
            self.tracker.settle_open_window()  # with other ranks: all of them close together
        logs, self.logs = self.logs, []
        if logs:
            report = self._report()
            for log in logs:
                log.close(report)

    @property
    def closed(self) -> bool:
        return self.probes is None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "probes", None) is not None or getattr(self, "logs", None):
            self.close()


def watch(
    model: nn.Module,
    *,
    window: int = DEFAULT_WINDOW,
    sample_every: int = DEFAULT_SAMPLE_EVERY,
    count_eval: bool = False,
    thresholds: Thresholds | None = None,
    dormancy_threshold: float = DORMANCY_THRESHOLD,
    on_window: Callable[[Window], None] | None = None,
    optimizer: Any = None,
    on_finding: Callable[[Finding], None] | None = None,
    revive: bool = False,
    revive_cap: int = DEFAULT_REVIVE_CAP,
    rewind_lr_factor: float | None = DEFAULT_REWIND_LR_FACTOR,
    repair: bool = False,
    log_dir: str | os.PathLike[str] | None = None,
    rank_timeout: float = DEFAULT_RANK_TIMEOUT,
    scaler: Any = None,
) -> Monitor:
    """Watch every ReLU-family activation of ``model`` while it trains.

    Args:
        model: any ``nn.Module``; activation modules and functional calls are both seen.
        window: steps per window; a unit is dead in a window if it never fired in it.
        sample_every: the costlier statistics (firing rates, dormancy, gradients) are taken
            on every ``sample_every``-th step; deadness is checked on every step.
        count_eval: also count forwards made in eval mode (off: validation is not counted).
        thresholds: overrides for the rules' thresholds.
        dormancy_threshold: ReDo's tau for calling a unit dormant.
        on_window: called with each closed :class:`Window`.
        optimizer: the training loop's optimizer, so the diagnosis can weigh its learning
            rate against what happened (also accepted by ``doc.step``).
        on_finding: called at a window's end with each new warning or error finding (dying
            units, identical outputs ...), so a loop can react while it happens; they are
            also logged to the ``reludoctor`` logger.
        revive: recycle dead units at each window's end (see
            :func:`reludoctor.fix.revive.revive_units`: outputs unchanged, optimizer state for
            them reset); needs ``optimizer``. Each revival is logged (``reludoctor`` logger,
            info) and kept in ``doc.revivals`` and the report's ``meta["revivals"]``.
        revive_cap: at most this many units revived per window.
        rewind_lr_factor: with ``revive``, when the diagnosis finds that the learning rate
            killed units (they died in windows with huge updates or loss spikes), recycling
            them cannot hold: the model and optimizer are rewound to the last stable window
            and every learning rate is divided by this factor (logged as a warning, kept in
            ``doc.revivals``). Costs one CPU copy of the model's and optimizer's state;
            ``None`` never rewinds. See :mod:`reludoctor.fix.live_revival`.
        repair: when the run collapses or layers die at error level and the loss stops
            improving, take the next repair step at a window's end (recycle units, rewind
            with a lower rate, batch norm, LeakyReLU, re-initialise), each undone if the next
            window's loss is worse; what it did is in ``doc.autopilot.actions`` and the
            report's ``meta["autopilot"]``. See :mod:`reludoctor.fix.autopilot`.
        log_dir: a directory (created if missing) to write a TensorBoard log to
            (``tensorboard --logdir <log_dir>``), at each window's end: per layer the dead
            fraction, alive units, gradient norm and histograms of pre-activations and
            per-unit gradients, plus the loss and the new findings; on ``close()``, the
            diagnosis. Needs the ``tensorboard`` package. See :mod:`reludoctor.report.tensorboard`.
            Under ``torch.distributed`` only rank 0 writes it (and logs live findings).
        rank_timeout: under ``torch.distributed`` (world size > 1), every rank's counts are
            summed at each window's end (``all_reduce``: a unit alive on any rank is alive),
            so every rank must call ``watch`` and ``close``; a rank that does not arrive
            within this many seconds is named missing and the others go on with their own
            counts. See :mod:`reludoctor.probe.distributed`.
        scaler: the loop's ``torch.amp.GradScaler`` (mixed precision), so gradients are
            measured unscaled (also accepted by ``doc.step``). A step it skips for overflow
            changes no weight: its update ratio is 0, and its gradients' non-finite rows are
            not counted.

    Example:
        >>> import torch, reludoctor as rd
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> with rd.watch(model, window=10) as doc:
        ...     for _ in range(3):
        ...         model(torch.randn(16, 4)).sum().backward()
        ...         doc.step()
        >>> doc.report().layers[0].name
        '1'
    """
    return Monitor(
        model,
        window=window,
        sample_every=sample_every,
        count_eval=count_eval,
        thresholds=thresholds,
        dormancy_threshold=dormancy_threshold,
        on_window=on_window,
        optimizer=optimizer,
        on_finding=on_finding,
        revive=revive,
        revive_cap=revive_cap,
        rewind_lr_factor=rewind_lr_factor,
        repair=repair,
        log_dir=log_dir,
        rank_timeout=rank_timeout,
        scaler=scaler,
    )
