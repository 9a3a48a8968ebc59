"""Device-side counters per layer, windows of steps, and the history they leave.

The per-step path does one fused reduction per layer (a running per-unit maximum of the
pre-activation: a unit is alive iff its maximum is > 0). The costlier statistics - firing
counts, |output| sums for the dormancy score, gradient statistics - are taken only on sampled
steps. Nothing in the per-step path reads a value back from an accelerator.

Non-finite pre-activations (NaN, +inf) never count as firing and never hide other values: a
unit's maximum is taken over its finite values only, and each unit counts the calls in which
it saw a NaN or +inf, with the first step that did. On the CPU a call is checked with one sum of
its per-unit maxima and only a call that holds such values is reduced again; on an accelerator
(where a check would wait for the device) every call takes its maximum over a copy with those
values replaced by -inf, besides the plain one that finds them.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from reludoctor.catalogue.activations import NON_NEGATIVE
from reludoctor.probe import counters
from reludoctor.probe.counters import HOST_COUNTERS, Snapshot
from reludoctor.probe.inputs import InputStats
from reludoctor.probe.probes import Sink, Site, whole_base

if TYPE_CHECKING:  # what the summarizer (diagnose) makes of the counts
    from reludoctor.diagnose.summaries import Window

#: Sampled statistics of a large activation use the batch's first samples, up to this many
#: values: the temporaries they need then stay small (fresh multi-megabyte temporaries cost
#: more in page faults than the arithmetic), and a rate needs no more.
SAMPLED_ELEMENTS = 1 << 16
#: The update-to-weight ratio is measured on a weight's first rows (a copy of at most this
#: many rows lives from the backward pass to ``doc.step`` on sampled steps).
UPDATE_ROWS = 256
#: A window's loss curve keeps at most this many points (means of equal runs of steps).
LOSS_POINTS = 16
#: Rows of the first model input kept to trace where units flow (for reviving them).
EXAMPLE_ROWS = 8
#: Pre-activation values kept per layer from a window's last sampled step (spread evenly over
#: the batch's first samples), for histograms.
HISTOGRAM_VALUES = 4096


#: On a GPU a layer's per-call maxima are kept on the device (a few kernels each, no read-back)
#: and folded into the running counters every this many calls; on the CPU at once.
PENDING_MAXIMA = 16
#: ... as long as they take at most this many floats per layer.
PENDING_BUDGET = 1 << 20
#: On the CPU a tracker's lasting tensors are views of blocks of this many bytes (Slab);
#: a tensor over a quarter of it gets its own allocation.
SLAB_BYTES = 4 << 20


class Slab:
    """Lasting CPU tensors (counters, kept values, scratch) carved from a few large blocks.

    Each layer's lasting tensors are made during the model's first forward, between its
    large transient tensors. Made one by one, small tensors that stay can fragment the C
    heap, which then grows and faults fresh pages in: benchmarks/scan.py's 256-layer MLP
    peaked 450 MiB above plain inference that way, 200 MiB with a slab.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocks: dict[torch.dtype, tuple[torch.Tensor, int]] = {}

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised CPU tensor of ``shape`` that lives as long as it is referenced."""
        numel = math.prod(shape)
        if numel * dtype.itemsize > SLAB_BYTES // 4:
            with torch.inference_mode(False):  # an inference tensor could not be updated later
                return torch.empty(shape, dtype=dtype)
        with self._lock:
            block, used = self._blocks.get(dtype, (None, 0))
            if block is None or used + numel > block.numel():
                with torch.inference_mode(False):
                    block, used = torch.empty(SLAB_BYTES // dtype.itemsize, dtype=dtype), 0
            line = max(1, 64 // dtype.itemsize)  # each tensor starts a cache line of its own
            self._blocks[dtype] = (block, used + -(-numel // line) * line)
        return block[used : used + numel].view(shape)

    def full(self, shape: tuple[int, ...], value: float, dtype: torch.dtype) -> torch.Tensor:
        return self.empty(shape, dtype).fill_(value)


class StepMarks:
    """The running step (1-based) as a one-element tensor per device: what a compiled graph
    reads to date an event (a Python number would be guarded and recompile each step)."""

    def __init__(self) -> None:
        self._marks: dict[torch.device, torch.Tensor] = {}
        self._step = 1

    def on(self, device: torch.device) -> torch.Tensor:
        mark = self._marks.get(device)
        if mark is None:
            with torch.inference_mode(False):
                mark = torch.full((1,), float(self._step), device=device)
            self._marks[device] = mark
        return mark

    @property
    def running(self) -> int:
        return self._step

    def advance(self, step: int) -> None:
        """Steps before ``step`` have ended."""
        self._step = step
        for mark in self._marks.values():
            mark.fill_(float(step))


class PendingMaxima:
    """A layer's per-call maxima on an accelerator, kept on the device until a fold.

    Each call writes two rows, its plain per-unit maximum and its maximum over finite values,
    and its step, with no read-back; a fold reduces up to ``limit`` calls at once into the
    running maximum and the non-finite counts (a fixed handful of kernels).
    """

    def __init__(self) -> None:
        self.count = 0
        self._rows: torch.Tensor | None = None  # (limit, 2, units): plain, finite
        self._steps: torch.Tensor | None = None  # (limit,): each call's step
        self._views: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __len__(self) -> int:
        return self.count

    def take(self, layer: LayerState, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The next call's (plain, finite) rows of ``dtype``, for the caller to write."""
        rows = self._rows
        if rows is None or rows.dtype != dtype or rows.shape[0] != layer.pending_limit:
            self.fold_into(layer)
            with torch.inference_mode(False):
                shape = (layer.pending_limit, 2, layer.units)
                rows = self._rows = torch.empty(shape, dtype=dtype, device=layer.device)
                self._steps = torch.empty(layer.pending_limit, device=layer.device)
            # views made once: indexing anew would cost a dispatch per view per call
            steps = self._steps
            self._views = [(row[0], row[1], step) for row, step in zip(rows, steps, strict=True)]
        plain, finite, step = self._views[self.count]
        self.count += 1
        step.fill_(float(layer.step_marks.running))
        return plain, finite

    def fold_into(self, layer: LayerState) -> None:
        """Fold the kept calls into ``layer``'s maximum and non-finite counts."""
        count, self.count = self.count, 0
        if not count:
            return
        rows, steps = self._rows[:count], self._steps[:count]
        torch.maximum(layer.max_pre, rows[:, 1].amax(0), out=layer.max_pre)
        plain = rows[:, 0]
        bad = plain.isnan().logical_or_(plain.isposinf())
        layer.nonfinite.add_(bad.sum(0))
        first = torch.where(bad.any(1), steps, math.inf).amin()
        torch.minimum(layer.nonfinite_first, first, out=layer.nonfinite_first)

    def clear(self) -> None:
        self.count = 0


class LayerState:
    """Counters of one activation call site, on the device its inputs live on.

    Each counter of :data:`~reludoctor.probe.counters.COUNTERS` is a tensor in ``tensors``
    and also a plain attribute of the same name (``layer.max_pre``), and each of
    ``HOST_COUNTERS`` an int attribute: the per-call path reads them with no lookup.
    """

    if TYPE_CHECKING:  # the counters' attributes, bound from the declaration

        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, site: Site, x: torch.Tensor, slab: Slab, step_marks: StepMarks) -> None:
        self.site = site
        self.slab = slab
        self.rank = x.dim()
        self.unit_dim = site.unit_dim
        self.units = int(x.shape[self.unit_dim]) if self.rank else 1
        self.reduce_dims = tuple(d for d in range(self.rank) if d != self.unit_dim)
        # Which contiguous reductions reach the units (see _per_unit).
        if self.rank >= 2 and self.unit_dim == self.rank - 1:
            self.layout = "units_last"
        elif self.rank >= 3 and self.unit_dim == 1:
            self.layout = "channels"
        else:
            self.layout = "other"
        #: The shape of the view this layer's activation was last applied to, and its base's.
        self._viewed: tuple[torch.Size, torch.Size] | None = None
        #: Pre-activation values of the open window's last sampled step (a view of a buffer
        #: made once), and the positions they are gathered from, for the latest input shape.
        self.values: torch.Tensor | None = None
        #: Whether ``values`` were kept in the open window (a closed one leaves them stale).
        self.values_fresh = False
        self._values_buffer: torch.Tensor | None = None
        self._index_buffer: torch.Tensor | None = None
        self._value_index: torch.Tensor | None = None
        self._indexed: torch.Size | None = None
        self.tensors = counters.allocate(self.units, x.device, slab.full)
        self.step_marks = step_marks
        self.to(x.device)
        self.reset_host()
        self.last: Snapshot | None = None
        #: Whether a compiled graph has counted this layer's inputs (seen in a snapshot).
        self.graph_counted = False
        self.warned_shape = False
        self.saved_rows: torch.Tensor | None = None  # weight rows before the optimizer step
        self.start = _start_stats(self, x)
        #: Pre-activation values of the first batch.
        start = _value_sample(self, x)
        self.start_values = slab.empty(tuple(start.shape)).copy_(start).numpy()

    def to(self, device: torch.device) -> None:
        """Move the counters to ``device`` (binding each to its attribute) and make the
        device's working state afresh."""
        self.tensors = counters.move(self.tensors, device)
        for name, tensor in self.tensors.items():
            setattr(self, name, tensor)
        self.device = device
        #: On the CPU, each call's per-unit reductions are written here (no allocation).
        self.scratch = self.slab.empty((self.units,)) if device.type == "cpu" else None
        #: The scratch seen from numpy: summing it there is the cheapest finiteness check.
        self.scratch_numpy = self.scratch.numpy() if self.scratch is not None else None
        self.values = self._values_buffer = self._index_buffer = self._value_index = None
        self._indexed = None
        self.pending = PendingMaxima()
        # On the CPU each call's maxima are folded at once: small tensors kept across calls,
        # between the model's large transient ones, fragment the C heap, and it grows with
        # the run. Elsewhere folding is amortised over calls (fewer kernel launches).
        self.pending_limit = (
            1
            if device.type == "cpu"
            else max(1, min(PENDING_MAXIMA, PENDING_BUDGET // max(self.units, 1)))
        )
        #: The running step (1-based), on this layer's device, for counts taken in a graph.
        self.step_mark = self.step_marks.on(device)

    def reset_host(self) -> None:
        """Every host counter back to 0."""
        for name in HOST_COUNTERS:
            setattr(self, name, 0)

    def matching(self, x: torch.Tensor) -> torch.Tensor | None:
        """``x`` shaped as this layer's values (moving the counters to its device): ``x``
        itself, or the tensor it reshapes (an in-place activation applied to a view of the
        producing layer's output: the units are that layer's), or None when neither fits."""
        if not self._shaped_like(x):
            whole = whole_base(x)
            if whole is None and self.site.follows_base and x.is_contiguous():
                viewed = self._viewed  # the output of an activation applied to a view
                whole = x.view(viewed[1]) if viewed and viewed[0] == x.shape else None
            if whole is None or not self._shaped_like(whole):
                return self._mismatch(x)
            self._viewed = (x.shape, whole.shape)
            x = whole
        if x.device != self.device:
            self.fold()
            self.to(x.device)
        return x

    def _shaped_like(self, x: torch.Tensor) -> bool:
        return x.dim() == self.rank and (not self.rank or x.shape[self.unit_dim] == self.units)

    def _mismatch(self, x: torch.Tensor) -> None:
        if not self.warned_shape:
            self.warned_shape = True
            warnings.warn(
                f"reludoctor: layer {self.site.name!r} first ran with {self.units} units "
                f"(rank {self.rank}) and now with shape {tuple(x.shape)}; calls of the new shape "
                "are not counted",
                RuntimeWarning,
                stacklevel=5,
            )
        return None

    def fold(self) -> None:
        self.pending.fold_into(self)

    def snapshot(self) -> Snapshot:
        """Host copy of every counter (one read per tensor)."""
        self.fold()
        snap = counters.read(self.tensors, {name: getattr(self, name) for name in HOST_COUNTERS})
        self.graph_counted = self.graph_counted or snap["graph_positions"] > 0
        fresh = self.values is not None and self.values_fresh
        snap["values"] = self.values.cpu().numpy().copy() if fresh else None
        return snap

    def keep_values(self, x: torch.Tensor) -> None:
        """Keep :func:`_value_sample` of ``x`` as the window's latest values, in buffers made
        once: a gather of positions worked out once per shape when ``x`` is contiguous
        float32 (the common case), else a copy of strided views."""
        if x.dtype == torch.float32 and x.is_contiguous():
            if self._indexed != x.shape:
                positions = _value_positions(self, x)
                self._index_buffer = self._room(self._index_buffer, positions.numel(), torch.int64)
                self._value_index = self._index_buffer[: positions.numel()].copy_(positions)
                self._indexed = x.shape
            index = self._value_index
            torch.index_select(x.view(-1), 0, index, out=self._values_of(index.numel()))
        else:
            sample = _value_sample(self, x)
            self._values_of(sample.numel()).copy_(sample)

    def _values_of(self, count: int) -> torch.Tensor:
        """The kept values, resized to ``count`` (at most ``HISTOGRAM_VALUES``)."""
        self.values_fresh = True
        values = self.values
        if values is not None and values.numel() == count:
            return values
        self._values_buffer = self._room(self._values_buffer, count, torch.float32)
        self.values = self._values_buffer[:count]
        return self.values

    def _room(self, buffer: torch.Tensor | None, count: int, dtype: torch.dtype) -> torch.Tensor:
        """``buffer`` if it holds ``count`` values, else a new one to keep (in the slab on the
        CPU): first just big enough, then ``HISTOGRAM_VALUES`` long, so at most two are made."""
        if buffer is not None and buffer.numel() >= count:
            return buffer
        size = count if buffer is None else max(count, HISTOGRAM_VALUES)
        if self.device.type == "cpu":
            return self.slab.empty((size,), dtype)
        with torch.inference_mode(False):
            return torch.empty(size, dtype=dtype, device=self.device)

    def reset(self) -> None:
        """Start a new window: counters at their initial values, nothing pending."""
        counters.reset(self.tensors)
        self.pending.clear()
        self.reset_host()
        self.values_fresh = False  # the buffer stays: a compiled graph holds it


def _start_stats(layer: LayerState, x: torch.Tensor) -> dict[str, float]:
    """The layer's first batch: share of units that did not fire, pre-activation mean/std
    (of its first samples, up to ``SAMPLED_ELEMENTS`` values)."""
    with torch.no_grad():
        x = x.detach().float()
        never = (_per_unit_max(layer, x) <= 0).float().mean()
        head = _leading_samples(layer, x)  # the mean and spread need no more values
        mean = head.mean()
        std = (head - mean).square_().mean().sqrt_()  # 6x faster than std_mean on the CPU
        stats = torch.stack([never, mean, std]).cpu().tolist()
    return dict(zip(("dead_fraction", "preact_mean", "preact_std"), stats, strict=True))


def _value_sample(layer: LayerState, x: torch.Tensor) -> torch.Tensor:
    """At most ``HISTOGRAM_VALUES`` values of ``x``, spread evenly over its first samples (a
    view of ``x`` where its dtype allows: copy it before ``x`` can change)."""
    with torch.no_grad():
        flat = _leading_samples(layer, x.detach()).reshape(-1)
        return flat[:: _value_stride(flat.numel())][:HISTOGRAM_VALUES].float()


def _value_positions(layer: LayerState, x: torch.Tensor) -> torch.Tensor:
    """Flat positions in ``x`` of the values :func:`_value_sample` takes."""
    leading = _leading_samples(layer, x).numel()
    positions = torch.arange(0, leading, _value_stride(leading), device=x.device)
    return positions[:HISTOGRAM_VALUES]


def _value_stride(leading: int) -> int:
    """Every how many of the leading values one is kept: ``HISTOGRAM_VALUES`` in all."""
    return max(1, leading // HISTOGRAM_VALUES)


def _leading_samples(layer: LayerState, x: torch.Tensor) -> torch.Tensor:
    """The first samples of the batch, at most ``SAMPLED_ELEMENTS`` values (a view)."""
    if layer.unit_dim == 0 or x.dim() < 2 or x.numel() <= SAMPLED_ELEMENTS:
        return x
    per_sample = x.numel() // x.shape[0]
    return x[: max(1, SAMPLED_ELEMENTS // per_sample)]


def _per_unit(
    layer: LayerState,
    x: torch.Tensor,
    reduce: Callable[..., torch.Tensor],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``reduce(tensor, dims)`` of ``x`` over every dim but the units' (written to ``out``
    when given, else a new tensor).

    Contiguous inputs are reduced along memory order: a strided reduction over (0, 2, 3) of
    a fresh conv output is 2-6x slower.
    """
    layout = layer.layout
    if layout == "units_last" and x.is_contiguous():
        return reduce(x if x.dim() == 2 else x.reshape(-1, layer.units), 0, out=out)
    if layout == "channels" and x.is_contiguous():
        return reduce(reduce(x.flatten(2), 2), 0, out=out)
    dims = layer.reduce_dims
    if dims:
        return reduce(x, dims, out=out)
    return x.float().clone() if out is None else out.copy_(x)


def _per_unit_max(
    layer: LayerState, x: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    # amax writes only to a tensor of its input's dtype
    return _per_unit(layer, x, torch.amax, out if x.dtype == torch.float32 else None)


def _pending_maxima(
    layer: LayerState, x: torch.Tensor, plain: torch.Tensor, finite: torch.Tensor
) -> None:
    """Write ``x``'s per-unit maximum to ``plain`` and its maximum over finite values to
    ``finite``. A conv layer's channels are reduced over each sample's positions first, so
    the finite maximum leaves out, with a NaN or +inf, the other values of that sample in
    that channel: a unit can look deader for it, never alive (a full pass fewer)."""
    if layer.layout == "channels":
        spatial = tuple(range(2, x.dim()))
        samples = torch.amax(x.flatten(2), 2) if x.is_contiguous() else torch.amax(x, spatial)
        torch.amax(samples, 0, out=plain)
        torch.amax(_finite_or_neginf(samples), 0, out=finite)
    else:
        _per_unit(layer, x, torch.amax, plain)
        _per_unit(layer, _finite_or_neginf(x), torch.amax, finite)


def _norm32(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The 2-norm as float32: accumulated in float32 for narrower types, in the tensor's own
    type for wider ones (float64 cannot be narrowed on the way in)."""
    if x.dtype.itemsize > 4:
        return torch.linalg.vector_norm(x, dim=dim).float()
    return torch.linalg.vector_norm(x, dim=dim, dtype=torch.float32)


def _finite_or_neginf(x: torch.Tensor) -> torch.Tensor:
    """``x`` with NaN and +inf replaced by -inf: its maximum is that of the finite values."""
    return torch.nan_to_num(x, nan=-math.inf, posinf=-math.inf, neginf=-math.inf)


def _per_unit_sum(layer: LayerState, x: torch.Tensor) -> torch.Tensor:
    return _per_unit(layer, x, _sum32, layer.scratch)


def _sum32(x: torch.Tensor, dims: Any, out: torch.Tensor | None = None) -> torch.Tensor:
    return torch.sum(x, dims, dtype=torch.float32, out=out)


@dataclass
class WindowCounts:
    """What was counted over one window of steps (or so far in the open one), for
    :attr:`Tracker.summarize` to turn into a :class:`~reludoctor.diagnose.summaries.Window`."""

    index: int
    start_step: int
    end_step: int
    complete: bool
    #: Each layer with its counts over the window.
    layers: list[tuple[LayerState, Snapshot]]
    #: ``loss_mean``, ``loss_last`` ... as :class:`Window` names them (empty: no loss given).
    loss: dict[str, Any]
    output_spread: float | None
    learning_rate: float | None


class Tracker(Sink):
    """Receives observations from :class:`Probes`, closes windows, keeps the history."""

    def __init__(
        self, window: int, sample_every: int, summarize: Callable[[WindowCounts], Window]
    ) -> None:
        self.window = window
        self.sample_every = sample_every
        #: Turns a window's counts into its summary (:mod:`reludoctor.diagnose.summarize`).
        self.summarize = summarize
        self.layers: list[LayerState] = []
        self._armed: list[Any] = []
        self.steps = 0
        self.window_start = 0
        self.windows: list[Window] = []
        self.sampling = True
        self.on_window: list[Callable[[Window], None]] = []
        self.learning_rate: Callable[[], float | None] = lambda: None
        #: The factor gradients are scaled by (mixed precision's GradScaler), or None.
        self.gradient_scale: Callable[[], torch.Tensor | None] = lambda: None
        self.inputs = InputStats()
        self.example_input: torch.Tensor | None = None
        self._slab = Slab()
        self._step_marks = StepMarks()
        self._scratch = threading.local()  # per thread: a CPU buffer reused for elementwise work
        self._saved: list[LayerState] = []
        #: Sum of the sampled outputs' spreads, and how many (on the outputs' device).
        self._output_spread: torch.Tensor | None = None
        #: Combines a window's snapshots with other processes' (``torch.distributed``:
        #: :class:`reludoctor.probe.distributed.RankCombiner`); called with the snapshots and step.
        self.combine: Callable[[list[Snapshot], int], list[Snapshot]] | None = None
        #: The step in which watching stopped after an error of its own (see ``fail``).
        self.failure_step: int | None = None
        self._settled: tuple[int, list[Snapshot]] | None = None
        self._reset_loss()

    def settings(self) -> dict[str, Any]:
        """How it counts, and how far: the report's ``meta`` keeps these."""
        return {
            "steps": self.steps,
            "window": self.window,
            "sample_every": self.sample_every,
        }

    def read_producer(
        self, layer: LayerState, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        """The weight (units first) and bias of the layer feeding ``layer``, as they are now:
        for frameworks whose weights are not torch parameters the probes could keep (Keras
        passes copies before each report)."""
        layer.site = dataclasses.replace(layer.site, weight=weight, bias=bias)

    # -- Sink -----------------------------------------------------------------------------
    def fail(self, error: BaseException, step: int | None = None) -> None:
        """:meth:`Sink.fail`, keeping the step it happened in (default: the running one)."""
        if self.failure is None:
            self.failure_step = self.steps + 1 if step is None else step
        super().fail(error)

    def new_layer(self, site: Site, x: torch.Tensor) -> LayerState | None:
        if site.follows_base:
            x = whole_base(x) if whole_base(x) is not None else x
        if not x.is_floating_point() or (x.dim() and x.shape[site.unit_dim] == 0):
            return None
        with torch.inference_mode(False):  # counters made in an inference-mode forward
            layer = LayerState(site, x, self._slab, self._step_marks)
        self.layers.append(layer)
        if self.sampling:
            self._arm(layer)
        return layer

    def observe_input(self, layer: LayerState, x: torch.Tensor) -> None:
        if (
            x.dim() != layer.rank
            or x.device != layer.device
            or (layer.rank and x.shape[layer.unit_dim] != layer.units)
        ):
            x = layer.matching(x)
            if x is None:
                return
        n = x.numel() // layer.units
        if n == 0:
            return
        # The one reduction of every step: the per-unit maximum over finite values, kept until
        # the next fold (on the CPU folded at once, from the scratch it was written to).
        if x.requires_grad:
            x = x.detach()
        if layer.pending_limit == 1:
            latest = _per_unit_max(layer, x, layer.scratch)
            total = layer.scratch_numpy.sum() if latest is layer.scratch else latest.float().sum()
            if not math.isfinite(total):  # a NaN or +inf (or a unit all -inf, or overflow)
                latest = self._finite_maximum(layer, x, latest)
            torch.maximum(layer.max_pre, latest, out=layer.max_pre)
        else:
            _pending_maxima(layer, x, *layer.pending.take(layer, x.dtype))
            if len(layer.pending) >= layer.pending_limit:
                layer.fold()
        layer.positions += n
        layer.rows += x.shape[0] if layer.rank >= 2 else 1
        if not self.sampling:
            return
        layer.keep_values(x)
        if layer.site.kind not in NON_NEGATIVE:
            # sign(max(x, 0)) is 1 where x > 0: cheaper than summing a boolean mask; a NaN or
            # +inf is not a firing.
            head = _leading_samples(layer, x)
            positive = torch.clamp_min(head, 0, out=self._buffer(head))
            positive = torch.nan_to_num_(positive, nan=0.0, posinf=0.0).sign_()
            layer.fire_count += _per_unit_sum(layer, positive)

    def _finite_maximum(
        self, layer: LayerState, x: torch.Tensor, maxima: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-unit maximum of ``x``'s finite values, counting the units that saw a NaN or
        +inf (from ``maxima``, the plain per-unit maximum, when already taken), without
        waiting for the device."""
        if maxima is None:
            maxima = _per_unit_max(layer, x)
        bad = torch.isnan(maxima) | torch.isposinf(maxima)
        layer.nonfinite.add_(bad)
        first = layer.nonfinite_first
        first.copy_(torch.minimum(first, torch.where(bad.any(), layer.step_mark, math.inf)))
        return _per_unit_max(layer, _finite_or_neginf(x))

    def observe_output(self, layer: LayerState, out: torch.Tensor) -> None:
        if out.numel() == 0:
            return
        matched = layer.matching(out)
        if matched is None:
            return
        head = _leading_samples(layer, matched.detach() if matched.requires_grad else matched)
        layer.sampled_positions += head.numel() // layer.units
        # A NaN or +inf output adds nothing: neither magnitude nor a firing.
        if layer.site.kind in NON_NEGATIVE:
            # The output is never negative: it is its own magnitude, and > 0 where x > 0.
            finite = torch.nan_to_num(head, nan=0.0, posinf=0.0, out=self._buffer(head))
            layer.abs_sum += _per_unit_sum(layer, finite)
            layer.fire_count += _per_unit_sum(layer, finite.sign_())
        else:
            magnitude = torch.abs(head, out=self._buffer(head))
            magnitude = torch.nan_to_num_(magnitude, nan=0.0, posinf=0.0)
            layer.abs_sum += _per_unit_sum(layer, magnitude)

    def _buffer(self, like: torch.Tensor) -> torch.Tensor | None:
        """An uninitialised tensor shaped like ``like``, for an elementwise result that is
        reduced at once. On the CPU, one buffer per thread and dtype is reused: a fresh
        allocation of this size is mapped anew by the OS each time, and the page faults
        cost more than the work. None elsewhere (``out=None``: CUDA's allocator caches)."""
        if like.device.type != "cpu":
            return None
        buffers = self._scratch.__dict__.setdefault("buffers", {})
        flat, shape, view = buffers.get(like.dtype, (None, None, None))
        if shape == like.shape:  # the view made last time (a dispatch each saved)
            return view
        if flat is None or flat.numel() < like.numel():
            flat = self._slab.empty((like.numel(),), like.dtype)
        view = flat[: like.numel()].view(like.shape)
        buffers[like.dtype] = (flat, like.shape, view)
        return view

    def wants_model_input(self) -> bool:
        return self.inputs.wanted

    def observe_model_input(self, x: Any) -> None:
        self.inputs.add(x)
        if self.example_input is None and isinstance(x, torch.Tensor) and x.dim() >= 1:
            with torch.inference_mode(False):
                self.example_input = x[:EXAMPLE_ROWS].detach().clone()

    def observe_model_output(self, out: Any) -> None:
        """Spread of the outputs across the batch, relative to their size (identical: ~0)."""
        out = _first_output(out)
        if out is None:
            return
        if self._output_spread is None or self._output_spread.device != out.device:
            with torch.inference_mode(False):
                self._output_spread = torch.zeros(2, device=out.device)
        self._add_spread(out)

    def _add_spread(self, out: torch.Tensor) -> None:
        with torch.no_grad():
            o = out.detach().float().reshape(out.shape[0], -1)
            # the per-column std written out: torch's std over dim 0 is ~3x slower on CPU
            std = (o - o.mean(0)).square().mean(0).sqrt()
            spread = std.mean() / (o.square().mean().sqrt() + 1e-12)
            self._output_spread.add_(torch.stack([spread, torch.ones_like(spread)]))

    # -- inside a torch.compile graph -----------------------------------------------------
    # What follows is traced into the user's compiled graph: tensor operations on tensors
    # made beforehand, and nothing else. A Python value read here would be guarded (a new
    # compilation whenever it changes), a value read back from a tensor would break the graph.

    def observe_traced_input(self, layer: LayerState, x: torch.Tensor) -> None:
        """:meth:`observe_input` in a compiled graph: the same counts, fused by the compiler
        with the activation (a call of another shape or device is not counted)."""
        x = _traced_match(layer, x)
        if x is None or x.numel() == 0:
            return
        x = x.detach()
        finite = self._finite_maximum(layer, x)
        layer.max_pre.copy_(torch.maximum(layer.max_pre, finite))
        layer.graph_positions.add_(x.numel() // layer.units)
        layer.graph_rows.add_(x.shape[0] if layer.rank >= 2 else 1)
        if not self.sampling:
            return
        if layer.values is not None and layer._indexed == x.shape:
            layer.values.copy_(x.reshape(-1)[layer._value_index])
            layer.values_fresh = True
        if layer.site.kind not in NON_NEGATIVE:
            head = _leading_samples(layer, x)
            positive = torch.nan_to_num(head.clamp_min(0), nan=0.0, posinf=0.0).sign()
            layer.fire_count.add_(_per_unit(layer, positive, _sum32))

    def observe_traced_output(self, layer: LayerState, out: torch.Tensor) -> None:
        """:meth:`observe_output` in a compiled graph (on sampled steps)."""
        out = _traced_match(layer, out)
        if out is None or out.numel() == 0:
            return
        head = _leading_samples(layer, out.detach())
        layer.graph_sampled_positions.add_(head.numel() // layer.units)
        if layer.site.kind in NON_NEGATIVE:
            finite = torch.nan_to_num(head, nan=0.0, posinf=0.0)
            layer.abs_sum.add_(_per_unit(layer, finite, _sum32))
            layer.fire_count.add_(_per_unit(layer, finite.sign(), _sum32))
        else:
            magnitude = torch.nan_to_num(head.abs(), nan=0.0, posinf=0.0)
            layer.abs_sum.add_(_per_unit(layer, magnitude, _sum32))

    def observe_traced_model_output(self, out: Any) -> None:
        """:meth:`observe_model_output` in a compiled graph (once an uncompiled forward has
        made its counter)."""
        out = _first_output(out)
        spread = self._output_spread
        if out is not None and spread is not None and spread.device == out.device:
            self._add_spread(out)

    # -- gradients: hooks armed only for sampled steps ------------------------------------
    def _arm(self, layer: LayerState) -> None:
        weight = layer.site.weight
        if weight is None or not weight.requires_grad:
            return
        self._armed.append(weight.register_post_accumulate_grad_hook(self._grad_hook(layer)))

    def disarm(self) -> None:
        for handle in self._armed:
            handle.remove()
        self._armed.clear()

    def _grad_hook(self, layer: LayerState) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            if (
                grad is None
                or grad.is_sparse
                or grad.device != layer.device
                or self.failure is not None
            ):
                return
            try:
                if layer.saved_rows is None:  # the optimizer has not stepped yet: keep W's rows
                    with torch.inference_mode(False):
                        layer.saved_rows = param.detach()[:UPDATE_ROWS].clone()
                    self._saved.append(layer)
                grad = grad.detach()
                scale = self.gradient_scale()
                if scale is not None:  # unscaled; an overflow (a step skipped) counts as 0
                    grad = torch.nan_to_num(grad / scale.to(grad.device), 0.0, 0.0, 0.0)
                self.observe_weight_gradient(layer, grad)
            except Exception as error:  # reludoctor's own: never the user's backward's
                self.fail(error)

        return hook

    def observe_update_ratio(self, layer: LayerState, ratio: float) -> None:
        """Count one step's update-to-weight ratio ``|W' - W| / |W|`` of the weight feeding
        ``layer``, measured outside the tracker (the Keras training-step tap)."""
        torch.clamp_min_(layer.update_ratio, float(ratio))
        layer.update_samples += 1

    def observe_weight_gradient(self, layer: LayerState, grad: torch.Tensor) -> None:
        """Count the gradient of the weight feeding ``layer`` (rows = units when they match)."""
        layer.grad_samples += 1
        if grad.dim() >= 2 and grad.shape[0] == layer.units:
            # One pass over the gradient: per-unit row norms give both statistics.
            rows = _norm32(grad.flatten(1), dim=1)
            layer.grad_row_sq.addcmul_(rows, rows)
            torch.maximum(layer.grad_row_max, rows, out=layer.grad_row_max)
            layer.grad_row_samples += 1
        else:
            layer.grad_sq += _norm32(grad).square()

    # -- steps and windows ----------------------------------------------------------------
    def _reset_loss(self) -> None:
        self._losses: list[torch.Tensor | float] = []

    def record_loss(self, loss: torch.Tensor | float) -> None:
        """Keep the step's loss (a detached reference: no device work until a window closes)."""
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"doc.step(loss=...) expects a scalar loss, got a tensor of shape "
                    f"{tuple(loss.shape)}; pass loss.mean() (or the value you call backward on)"
                )
            self._losses.append(loss.detach())
        else:
            self._losses.append(float(loss))

    def step(self, loss: torch.Tensor | float | None = None) -> Window | None:
        """End one training step; returns the window it closed, if any."""
        if loss is not None:
            self.record_loss(loss)
        self.steps = steps = self.steps + 1
        self._step_marks.advance(steps + 1)
        if self._saved:
            try:
                self._measure_updates()
            except Exception as error:  # reludoctor's own: never the training loop's
                self._saved.clear()
                self.fail(error)
        if self._armed:
            self.disarm()
        self.sampling = sampling = steps % self.sample_every == 0
        if sampling and self.failure is None:
            for layer in self.layers:
                self._arm(layer)
        if steps - self.window_start >= self.window:
            return self.close_window()
        return None

    def _measure_updates(self) -> None:
        """Update-to-weight ratio of the step that just ended (device work, no sync)."""
        for layer in self._saved:
            before, layer.saved_rows = layer.saved_rows, None
            weight = layer.site.weight
            if weight is None or before is None or weight.device != layer.device:
                continue
            with torch.no_grad():
                after = weight.detach()[:UPDATE_ROWS]
                ratio = _norm32(after - before) / (_norm32(before) + 1e-12)
                torch.maximum(layer.update_ratio, ratio, out=layer.update_ratio)
            layer.update_samples += 1
        self._saved.clear()

    def _loss_summary(self) -> dict[str, Any]:
        if not self._losses:
            return {}
        tensors = [v for v in self._losses if isinstance(v, torch.Tensor)]
        if len(tensors) == len(self._losses) and len({t.device for t in tensors}) == 1:
            flat = [t.reshape(()) if t.dim() else t for t in tensors]  # one element each
            values = torch.stack(flat).float().cpu().numpy().astype(np.float64)
        else:
            values = np.array([float(v) for v in self._losses])
        if not np.isfinite(values).all():
            return {"loss_last": _finite(values[-1]), "loss_nonfinite": True}
        chunks = np.array_split(values, min(LOSS_POINTS, len(values)))
        return {
            "loss_mean": float(values.mean()),
            "loss_last": float(values[-1]),
            "loss_max": float(values.max()),
            "loss_min": float(values.min()),
            "loss_curve": [float(c.mean()) for c in chunks],
        }

    def _window(self, snapshots: list[Snapshot], complete: bool) -> Window:
        spread = None
        total, samples = (0.0, 0) if self._output_spread is None else self._output_spread.tolist()
        if samples:
            spread = _finite(total / samples)
        counts = WindowCounts(
            index=len(self.windows),
            start_step=self.window_start,
            end_step=self.steps,
            complete=complete,
            layers=list(zip(self.layers, snapshots, strict=True)),
            loss=self._loss_summary(),
            output_spread=spread,
            learning_rate=self.learning_rate(),
        )
        return self.summarize(counts)

    def close_window(self) -> Window:
        snapshots = [layer.snapshot() for layer in self.layers]
        if self.combine is not None:
            snapshots = self.combine(snapshots, self.steps)
        window = self._window(snapshots, complete=True)
        for layer, snap in zip(self.layers, snapshots, strict=True):
            layer.last = snap
            layer.reset()
        self.windows.append(window)
        self.window_start = self.steps
        self._reset_loss()
        if self._output_spread is not None:
            self._output_spread.zero_()
        for callback in self.on_window:
            callback(window)
        return window

    def settle_open_window(self) -> None:
        """Combine the open window's counts now (with :attr:`combine`: a collective call, on
        every rank at once), for the reports made after the last step."""
        if self.combine is None or self.steps == self.window_start:
            return
        snapshots = [layer.snapshot() for layer in self.layers]
        self._settled = (self.steps, self.combine(snapshots, self.steps))

    def counted_in_graph(self) -> bool:
        """Whether a compiled graph has counted any layer's inputs (reads the device)."""
        return any(
            layer.graph_counted or float(layer.graph_positions.sum()) > 0 for layer in self.layers
        )

    def open_window(self) -> tuple[Window | None, list[Snapshot]]:
        """The window still open (None when it has seen nothing) and its snapshots."""
        if self._settled is not None and self._settled[0] == self.steps:
            snapshots = self._settled[1]
        else:
            snapshots = [layer.snapshot() for layer in self.layers]
        seen = any(s["positions"] for s in snapshots) or self._losses
        if not seen and self.steps == self.window_start:
            return None, snapshots
        return self._window(snapshots, complete=False), snapshots


def _first_output(out: Any) -> torch.Tensor | None:
    """The first tensor a forward returned, when it can show a spread across the batch."""
    if isinstance(out, (tuple, list)):
        out = next((o for o in out if isinstance(o, torch.Tensor)), None)
    elif isinstance(out, dict):
        out = next((o for o in out.values() if isinstance(o, torch.Tensor)), None)
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.dim() < 1:
        return None
    if out.shape[0] < 2 or out.numel() == 0:
        return None
    return out


def _traced_match(layer: LayerState, x: torch.Tensor) -> torch.Tensor | None:
    """:meth:`LayerState.matching` for a traced tensor (shapes known while tracing): ``x``,
    its reshaping to the producer's units when the activation ran on a view, or None."""
    if x.device != layer.device:
        return None
    if layer._shaped_like(x):
        return x
    viewed = layer._viewed
    if layer.site.follows_base and viewed is not None and viewed[0] == x.shape:
        return x.reshape(viewed[1])
    return None


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(value)
