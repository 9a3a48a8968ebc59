"""The per-layer counters, declared once, and every generic operation derived from them.

Each :class:`Counter` in :data:`COUNTERS` says its name, whether it holds one value per unit
or one in all, its dtype, the value it starts (and restarts) at, and how two of its values
combine (``"sum"``, ``"max"`` or ``"min"``). Allocating, resetting and moving a layer's
counters, reading them into a host :data:`Snapshot`, merging two snapshots, and packing
snapshots for a reduction across processes all follow from that declaration (as
torchmetrics' ``Metric.add_state`` drives its ``reset``, ``to`` and sync): a new counter is
one more line in :data:`COUNTERS`.

Counters named ``graph_<name>`` are counted inside a ``torch.compile`` graph and added, in
each snapshot, to the host counter ``<name>`` of :data:`HOST_COUNTERS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: How values of a counter combine, across windows and across processes.
REDUCTIONS: tuple[str, ...] = ("sum", "max", "min")
#: Prefix of the counters taken in a compiled graph, added to the host counter they name.
GRAPH_PREFIX = "graph_"

#: A layer's counters read back to the host: a numpy array per per-unit counter, a 0-d array
#: per scalar one, an int per host counter, and ``"values"`` (kept pre-activations or None).
Snapshot = dict[str, Any]
#: Makes a filled tensor: ``full(shape, value, dtype)`` (a :class:`Slab`'s on the CPU).
Full = Callable[[tuple[int, ...], float, torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class Counter:
    """A statistic kept per layer: declared once, reset, moved and combined generically."""

    name: str
    per_unit: bool
    dtype: torch.dtype
    initial: float
    reduce: str  # "max", "min" or "sum": how windows (and processes) combine

    def __post_init__(self) -> None:
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"counter {self.name!r}: reduce must be one of {REDUCTIONS}")

    def shape(self, units: int) -> tuple[int, ...]:
        """The tensor's shape for a layer of ``units`` units. One element rather than 0-d:
        torch.compile reads a 0-d CPU tensor as a Python number, and the graph's updates to
        it would be lost."""
        return (units,) if self.per_unit else (1,)


COUNTERS: tuple[Counter, ...] = (
    Counter("max_pre", True, torch.float32, -math.inf, "max"),
    # float32: a rate needs no more, and the cheapest count is a sum of sign(output).
    Counter("fire_count", True, torch.float32, 0.0, "sum"),
    Counter("abs_sum", True, torch.float32, 0.0, "sum"),
    Counter("grad_row_max", True, torch.float32, 0.0, "max"),  # largest row norm seen
    Counter("grad_row_sq", True, torch.float32, 0.0, "sum"),  # sum of squared row norms
    Counter("grad_sq", False, torch.float32, 0.0, "sum"),  # for weights without unit rows
    Counter("update_ratio", False, torch.float32, 0.0, "max"),  # |W' - W| / |W| per step
    # calls in which the unit saw a NaN or +inf pre-activation, and the first step with one
    Counter("nonfinite", True, torch.float32, 0.0, "sum"),
    Counter("nonfinite_first", False, torch.float32, math.inf, "min"),
    # Values and samples counted inside a torch.compile graph, where a Python counter cannot
    # be updated (a value read there is guarded: it would recompile at every step). They are
    # added to the host counters of the same name (without "graph_") in each snapshot.
    Counter("graph_positions", False, torch.float64, 0.0, "sum"),
    Counter("graph_rows", False, torch.float64, 0.0, "sum"),
    Counter("graph_sampled_positions", False, torch.float64, 0.0, "sum"),
)
#: Host-side integers: shapes are known on the host, so counting them needs no sync. They
#: start at 0 and are summed.
HOST_COUNTERS: tuple[str, ...] = (
    "positions",
    "rows",  # samples: the leading dim of each call (positions count every value per unit)
    "sampled_positions",
    "grad_samples",
    "grad_row_samples",
    "update_samples",
)

_NUMPY_REDUCE: dict[str, Callable[[Any, Any], Any]] = {
    "sum": np.add,
    "max": np.maximum,
    "min": np.minimum,
}
#: (graph counter, host counter it is added to) for every ``graph_`` counter.
_GRAPH_TOTALS: tuple[tuple[str, str], ...] = tuple(
    (c.name, c.name.removeprefix(GRAPH_PREFIX)) for c in COUNTERS if c.name.startswith(GRAPH_PREFIX)
)


def _check_declaration() -> None:
    names = [c.name for c in COUNTERS] + list(HOST_COUNTERS)
    if len(set(names)) != len(names):
        raise ValueError("counter names must be unique across COUNTERS and HOST_COUNTERS")
    for graph, host in _GRAPH_TOTALS:
        if host not in HOST_COUNTERS:
            raise ValueError(f"counter {graph!r} names no host counter {host!r}")


_check_declaration()


def names(reduce: str) -> tuple[str, ...]:
    """The counters combined by ``reduce`` (``"sum"``, ``"max"`` or ``"min"``), in order."""
    return tuple(c.name for c in COUNTERS if c.reduce == reduce)


# -- a layer's tensors -------------------------------------------------------------------------
def allocate(units: int, device: torch.device, full: Full | None = None) -> dict[str, torch.Tensor]:
    """Every counter of a layer of ``units`` units at its initial value, on ``device``:
    made by ``full`` on the CPU when given (a slab's), else by ``torch.full``."""
    with torch.inference_mode(False):  # counters must stay updatable outside it
        if full is not None and device.type == "cpu":
            return {c.name: full(c.shape(units), c.initial, c.dtype) for c in COUNTERS}
        return {
            c.name: torch.full(c.shape(units), c.initial, dtype=c.dtype, device=device)
            for c in COUNTERS
        }


def reset(tensors: Mapping[str, torch.Tensor]) -> None:
    """Put every counter back to its initial value, in place."""
    for c in COUNTERS:
        tensors[c.name].fill_(c.initial)


def move(tensors: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The counters on ``device`` (the same tensors where they already are)."""
    with torch.inference_mode(False):  # counters must stay updatable outside it
        return {c.name: tensors[c.name].to(device) for c in COUNTERS}


def read(tensors: Mapping[str, torch.Tensor], host: Mapping[str, int]) -> Snapshot:
    """Host copy of every counter (one read per tensor) and the host counters, with each
    ``graph_`` counter added to its host counter. No ``"values"`` entry."""
    snap: Snapshot = {}
    for c in COUNTERS:
        value = tensors[c.name].detach().cpu().numpy().copy()
        snap[c.name] = value if c.per_unit else value.reshape(())
    snap.update({name: host[name] for name in HOST_COUNTERS})
    for graph, name in _GRAPH_TOTALS:
        snap[name] += int(snap[graph])
    return snap


# -- snapshots ---------------------------------------------------------------------------------
def merge(a: Snapshot | None, b: Snapshot | None) -> Snapshot | None:
    """Combine two snapshots of the same layer by each counter's own reduction (host
    counters summed; ``b``'s values, else ``a``'s)."""
    if a is None or b is None:
        return a if b is None else b
    out: Snapshot = {}
    for c in COUNTERS:
        out[c.name] = _NUMPY_REDUCE[c.reduce](a[c.name], b[c.name])
    for name in HOST_COUNTERS:
        out[name] = a[name] + b[name]
    out["values"] = b["values"] if b["values"] is not None else a["values"]
    return out


def pack(snapshots: list[Snapshot], reduce: str) -> torch.Tensor:
    """One float64 tensor of the counters combined by ``reduce``: each snapshot's in turn,
    in declaration order, then (for ``"sum"``) each snapshot's host counters."""
    arrays = names(reduce)
    parts = [np.asarray(s[name], dtype=np.float64).ravel() for s in snapshots for name in arrays]
    if reduce == "sum":
        parts += [np.array([s[n] for n in HOST_COUNTERS], dtype=np.float64) for s in snapshots]
    return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0))


def unpack(snapshots: list[Snapshot], packed: Mapping[str, torch.Tensor]) -> list[Snapshot]:
    """Copies of ``snapshots`` holding the values of ``packed`` (reduction -> :func:`pack`'s
    layout, as reduced), each counter in its own shape and dtype, host counters as ints."""
    out = [dict(s) for s in snapshots]
    for reduce, reduced in packed.items():
        values = reduced.numpy()
        offset = 0
        for snap in out:
            for name in names(reduce):
                like = np.asarray(snap[name])
                snap[name] = (
                    values[offset : offset + like.size].reshape(like.shape).astype(like.dtype)
                )
                offset += like.size
        if reduce == "sum":
            for snap in out:
                for name in HOST_COUNTERS:
                    snap[name] = int(values[offset])
                    offset += 1
    return out
