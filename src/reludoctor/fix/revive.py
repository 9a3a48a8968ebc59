"""Revive dead units in place (ReDo-style recycling) without changing what the network computes.

A dead unit outputs 0 for every input. Reviving it gives it fresh incoming weights (He normal)
and a zero bias, so it can fire and learn again, and sets its *outgoing* weights - the columns
of the layers that read it - to zero, so at that moment the network's outputs are exactly what
they were. The optimizer's state for those rows and columns (Adam's moments, SGD's momentum)
is reset too, or stale moments would push the fresh weights straight back.

Which layers read a unit is found by tracing one forward pass: from the unit's producing
Linear/Conv layer, through element-wise activations, dropout, pooling, per-channel batch norm
and flattening, to the Linear/Conv layers that consume it. A unit whose output also goes
anywhere else (a residual addition, a layer norm, the model's output) cannot be revived without
changing the function, so its layer is skipped and the record says why.

    >>> import torch
    >>> from torch import nn
    >>> import reludoctor as rd
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> with torch.no_grad():
    ...     model[0].bias[:3] = -100.0  # three dead units
    >>> x = torch.randn(32, 4)
    >>> report = rd.scan(model, x)
    >>> before = model(x)
    >>> record = revive_units(model, report, example=x)
    >>> record.details["revived"]
    {'1': [0, 1, 2]}
    >>> torch.equal(model(x), before)
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from reludoctor.catalogue.activations import ACTIVATION_CATALOGUE
from reludoctor.diagnose.summaries import LayerReport
from reludoctor.fix.remedies import (
    CONV_LAYERS,
    WEIGHTED_LAYERS,
    RemedyError,
    RemedyRecord,
    applying,
)
from reludoctor.report.report import Report


@runtime_checkable
class UnitSource(Protocol):
    """What revival needs of a watching monitor (:class:`reludoctor.Monitor` is one): its
    layer summaries so far, and rows of the first input it saw."""

    def layer_reports(self) -> list[LayerReport]: ...

    @property
    def example_input(self) -> torch.Tensor | None: ...


#: Functions that act on each unit separately (element-wise, or per channel): a unit's values
#: stay its own through them. Every activation kind of the catalogue is one.
_PER_UNIT = frozenset(
    {
        *ACTIVATION_CATALOGUE, "relu_", "leaky_relu_", "elu_", "selu_", "celu_", "hardtanh_",
        "rrelu_", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
        "feature_alpha_dropout", "contiguous", "clone", "to", "float", "double", "half",
        "bfloat16", "type_as", "detach",
    }
)  # fmt: skip
#: Per-channel functions: they keep units only when the unit dimension is 1 (channels).
_PER_CHANNEL = frozenset(
    {
        "batch_norm", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d",
        "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
        "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
        "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    }
)  # fmt: skip
_SCALING = frozenset({"mul", "__mul__", "__rmul__", "div", "__truediv__", "__imul__"})
_RESHAPING = frozenset({"flatten", "view", "reshape"})
_CONSUMERS = {"linear": "linear", "conv1d": "conv", "conv2d": "conv", "conv3d": "conv"}


@dataclass(frozen=True)
class _Lineage:
    producer: str
    dim: int  # the unit axis, counted from the front
    block: int  # consecutive entries per unit along ``dim`` (after flattening channels)


@dataclass
class UnitFlow:
    """Where one producing layer's units go: the consuming layers, and anything else."""

    producer: str
    consumers: list[tuple[str, str, int]] = field(default_factory=list)  # name, kind, block
    escapes: list[str] = field(default_factory=list)
    #: What the producing layer received in the traced forward (its first call).
    producer_input: torch.Tensor | None = None


class _FlowTracer(TorchFunctionMode):
    """Follows tagged tensors (producer outputs) through one forward pass."""

    def __init__(self, weights: dict[int, str]) -> None:
        super().__init__()
        self.weights = weights  # id(weight parameter) -> module name
        self.lineage: dict[int, tuple[torch.Tensor, _Lineage]] = {}
        self.flows: dict[str, UnitFlow] = {}

    def tag(self, tensor: torch.Tensor, lineage: _Lineage) -> None:
        self.lineage[id(tensor)] = (tensor, lineage)
        self.flows.setdefault(lineage.producer, UnitFlow(lineage.producer))

    def of(self, value: Any) -> _Lineage | None:
        if isinstance(value, torch.Tensor):
            entry = self.lineage.get(id(value))
            if entry is not None and entry[0] is value:
                return entry[1]
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [(i, self.of(a)) for i, a in enumerate(args)]
        inputs += [(k, self.of(v)) for k, v in kwargs.items()]
        for nested in args:
            if isinstance(nested, (list, tuple)) and any(self.of(v) for v in nested):
                lineage = next(self.of(v) for v in nested if self.of(v))
                self._escape(lineage, getattr(func, "__name__", str(func)))
        tagged = [(position, lineage) for position, lineage in inputs if lineage is not None]
        for position, lineage in tagged:
            self._follow(func, position, lineage, args, kwargs, out)
        return out

    def _escape(self, lineage: _Lineage | None, where: str) -> None:
        if lineage is not None:
            flow = self.flows[lineage.producer]
            if where not in flow.escapes:
                flow.escapes.append(where)

    def _follow(self, func, position, lineage, args, kwargs, out) -> None:  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", str(func))
        first = out[0] if isinstance(out, tuple) and out else out
        if not isinstance(first, torch.Tensor):
            return  # sizes, shapes, dtypes: no data flows
        source = args[0] if args else None
        if name in _CONSUMERS and position == 0:
            self._consume(_CONSUMERS[name], lineage, args, kwargs, source)
            return
        if position != 0 or not isinstance(source, torch.Tensor):
            self._escape(lineage, name)
            return
        if name in _PER_UNIT or (name in _SCALING and _scalars_only(args[1:], kwargs)):
            if first.shape == source.shape:
                self.tag(first, lineage)
                return
        elif name in _PER_CHANNEL and lineage.dim == 1 and lineage.block == 1:
            if first.shape[:2] == source.shape[:2]:
                self.tag(first, lineage)
                return
        elif name in _RESHAPING:
            reshaped = _reshaped(lineage, tuple(source.shape), tuple(first.shape))
            if reshaped is not None:
                self.tag(first, reshaped)
                return
        self._escape(lineage, name)

    def _consume(self, kind, lineage, args, kwargs, source) -> None:  # type: ignore[no-untyped-def]
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        consumer = self.weights.get(id(weight)) if weight is not None else None
        if consumer is None or not isinstance(source, torch.Tensor):
            self._escape(lineage, f"{kind} with a weight that is not a module's")
            return
        groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
        if kind == "linear" and lineage.dim != source.dim() - 1:
            self._escape(lineage, f"{consumer} (units not on its input features)")
        elif kind == "conv" and (lineage.dim != 1 or lineage.block != 1 or groups != 1):
            self._escape(lineage, f"{consumer} (units not its input channels, or grouped)")
        else:
            entry = (consumer, kind, lineage.block)
            flow = self.flows[lineage.producer]
            if entry not in flow.consumers:
                flow.consumers.append(entry)


def _scalars_only(args: Iterable[Any], kwargs: dict[str, Any]) -> bool:
    return all(isinstance(a, (int, float)) for a in [*args, *kwargs.values()])


def _reshaped(
    lineage: _Lineage, before: tuple[int, ...], after: tuple[int, ...]
) -> _Lineage | None:
    """The unit axis after a flatten/view, when the leading axes are kept and the unit axis
    is merged with the axes after it (``(N, C, H, W) -> (N, C*H*W)``); None otherwise."""
    dim = lineage.dim
    if after[:dim] != before[:dim] or len(after) <= dim:
        return None
    tail = math.prod(before[dim:])
    if after[dim] == before[dim] and math.prod(after[dim:]) == tail:
        return lineage  # the axes after the unit axis were reshaped among themselves
    if after[dim] == tail and len(after) == dim + 1:
        return _Lineage(lineage.producer, dim, lineage.block * math.prod(before[dim + 1 :]))
    return None


def trace_unit_flow(
    model: nn.Module, example: Any, producers: Iterable[str]
) -> dict[str, UnitFlow]:
    """Trace one forward of ``example`` (in eval mode, without gradients) and say, for each
    producing layer named in ``producers``, which layers consume its units."""
    producers = list(producers)
    modules = dict(model.named_modules())
    weights = {id(m.weight): n for n, m in modules.items() if isinstance(m, WEIGHTED_LAYERS)}
    tracer = _FlowTracer(weights)
    handles = []
    for name in producers:
        unit_dim = 1 if isinstance(modules[name], CONV_LAYERS) else None

        def tag(
            module: nn.Module, inputs: Any, out: Any, name: str = name, unit_dim=unit_dim
        ) -> None:  # type: ignore[no-untyped-def]
            if isinstance(out, torch.Tensor):
                dim = unit_dim if unit_dim is not None else out.dim() - 1
                tracer.tag(out, _Lineage(name, dim, 1))
                flow = tracer.flows[name]
                if flow.producer_input is None and inputs and isinstance(inputs[0], torch.Tensor):
                    flow.producer_input = inputs[0]

        handles.append(modules[name].register_forward_hook(tag))
    training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), tracer:
            out = model(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
    for value in out if isinstance(out, (tuple, list)) else [out]:
        tracer._escape(tracer.of(value), "the model's output")
    return {
        name: tracer.flows.get(name, UnitFlow(name, escapes=["never ran"])) for name in producers
    }


def revive_units(
    model: nn.Module,
    source: Report | UnitSource,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    example: Any = None,
    dormant: bool = False,
    max_units: int | None = None,
) -> RemedyRecord:
    """Recycle the dead units (with ``dormant``, the dormant ones too) that ``source`` found:
    fresh He-normal incoming weights (scaled to a unit-std pre-activation on the example)
    and zero bias, zero outgoing weights, and the optimizer's
    state for those rows and columns reset. The network's outputs are unchanged.

    ``source`` is a :class:`~reludoctor.Report` (then pass ``example``, one input batch, to
    trace where the units go) or a watching :class:`~reludoctor.Monitor` (it keeps rows of the
    first input). ``max_units`` caps how many units are revived (the deadest layers first).
    """
    if isinstance(source, Report):
        report = source
    elif isinstance(source, UnitSource):
        # a Monitor: its layer summaries are all revival needs, the rules need not run
        report = Report(layers=source.layer_reports(), windows=[], findings=[])
        example = example if example is not None else source.example_input
    else:
        raise RemedyError(
            f"revive_units needs a reludoctor Report or Monitor, not {type(source).__name__}"
        )
    if max_units is not None and max_units < 0:
        raise RemedyError(f"revive_units: max_units must be >= 0, not {max_units}")
    targets = _targets(model, report, dormant)
    record = RemedyRecord("revive_units", details={"revived": {}})
    if not targets:
        record.skipped.append("no dead units with a Linear/Conv layer feeding them directly")
        return record
    if example is None:
        raise RemedyError(
            "revive_units: pass example= (one input batch) so the layers that read the dead "
            "units can be found"
        )
    modules = dict(model.named_modules())
    params = (
        {id(p) for group in optimizer.param_groups for p in group["params"]} if optimizer else set()
    )
    for layer, producer_name, _ in targets:
        producer = modules[producer_name]
        if not producer.weight.requires_grad:
            raise RemedyError(
                f"revive_units: {producer_name}.weight (feeding {layer.name}) is frozen "
                "(requires_grad=False); revived units could not learn - unfreeze it first"
            )
        if optimizer is not None and id(producer.weight) not in params:
            raise RemedyError(
                f"revive_units: the optimizer does not own {producer_name}.weight; pass the "
                "optimizer that trains this model"
            )
    try:
        flows = trace_unit_flow(model, example, {t[1] for t in targets})
    except (RuntimeError, TypeError, ValueError) as error:
        raise RemedyError(
            f"revive_units: one forward of the example failed ({error}); pass an input batch "
            "the model accepts, on the model's device"
        ) from None
    budget = math.inf if max_units is None else max_units
    chosen: list[tuple[LayerReport, str, list[int], UnitFlow]] = []
    for layer, producer_name, units in targets:
        flow = flows[producer_name]
        if flow.escapes or not flow.consumers:
            where = ", ".join(flow.escapes) or "no layer reads them"
            record.skipped.append(
                f"{layer.name}: its units also flow to {where}; reviving them would change "
                "the network's outputs"
            )
            continue
        units = units[: int(min(len(units), budget))]
        if not units:
            record.skipped.append(f"{layer.name}: over the cap of {max_units} units")
            continue
        budget -= len(units)
        chosen.append((layer, producer_name, units, flow))
    with applying(record), torch.no_grad():
        # every row first, then every column: a layer that both feeds and reads revived
        # units ends with zero weights from them
        for _, producer_name, units, flow in chosen:
            _reinitialise_rows(
                modules[producer_name], units, optimizer, record, flow.producer_input
            )
        for layer, producer_name, units, flow in chosen:
            for consumer, _kind, block in flow.consumers:
                _zero_columns(modules[consumer], units, block, optimizer, record)
            record.details["revived"][layer.name] = units
            readers = ", ".join(c for c, _, _ in flow.consumers)
            record.changed.append(
                f"{layer.name}: {len(units)} units revived ({producer_name} rows re-initialised, "
                f"columns zeroed in {readers})"
            )
    return record


def _targets(
    model: nn.Module, report: Report, dormant: bool
) -> list[tuple[LayerReport, str, list[int]]]:
    modules = dict(model.named_modules())
    targets = []
    for layer in sorted(report.layers, key=lambda lay: -lay.dead_fraction):
        units = sorted(set(layer.dead_units) | (set(layer.dormant_units) if dormant else set()))
        if not units or not layer.can_die or layer.producer is None:
            continue
        if not isinstance(modules.get(layer.producer), WEIGHTED_LAYERS):
            raise RemedyError(
                f"revive_units: the report names {layer.producer!r} as the layer feeding "
                f"{layer.name}, but the model has no such Linear/Conv layer: was the report "
                "made on this model?"
            )
        targets.append((layer, layer.producer, units))
    return targets


def _optimizer_buffers(
    optimizer: torch.optim.Optimizer | None, param: torch.Tensor
) -> list[torch.Tensor]:
    """The optimizer's per-element state for ``param`` (moments, momentum): same shape."""
    if optimizer is None:
        return []
    state = optimizer.state.get(param, {})
    return [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == param.shape]


def _fresh_weights(layer: nn.Module, inputs: torch.Tensor | None) -> torch.Tensor:
    """He-normal weights for ``layer``; rows whose pre-activation on ``inputs`` (what the layer
    received in the traced forward) has a std above 1 are scaled down to 1 - what He
    initialisation gives on unit-scale inputs. In a network whose activations grew far beyond
    unit scale this keeps a revived unit's first updates from blowing up."""
    fresh = torch.empty_like(layer.weight)
    nn.init.kaiming_normal_(fresh, nonlinearity="relu")
    if inputs is None:
        return fresh
    if isinstance(layer, nn.Linear):
        pre = torch.nn.functional.linear(inputs, fresh).flatten(0, -2)
        std = pre.std(0) if pre.shape[0] > 1 else None
    else:
        pre = layer._conv_forward(inputs, fresh, None)  # type: ignore[operator]
        std = pre.transpose(0, 1).flatten(1).std(1) if pre[:, 0].numel() > 1 else None
    if std is None or not torch.isfinite(std).all():
        return fresh
    # only ever shrink: amplifying rows fed by a vanishing signal would blow up its noise
    scale = torch.where(std > 1, 1.0 / std, torch.ones_like(std))
    return fresh * scale.view(-1, *([1] * (fresh.dim() - 1)))


def _reinitialise_rows(
    layer: nn.Module,
    units: list[int],
    optimizer: torch.optim.Optimizer | None,
    record: RemedyRecord,
    inputs: torch.Tensor | None = None,
) -> None:
    index = torch.tensor(units, device=layer.weight.device)
    fresh = _fresh_weights(layer, inputs)
    for tensor in [layer.weight, *_optimizer_buffers(optimizer, layer.weight)]:
        record.save_tensor(tensor)
    layer.weight.index_copy_(0, index, fresh.index_select(0, index))
    for buffer in _optimizer_buffers(optimizer, layer.weight):
        buffer.index_fill_(0, index, 0.0)
    if layer.bias is not None:
        for tensor in [layer.bias, *_optimizer_buffers(optimizer, layer.bias)]:
            record.save_tensor(tensor)
            tensor.index_fill_(0, index, 0.0)


def _zero_columns(
    layer: nn.Module,
    units: list[int],
    block: int,
    optimizer: torch.optim.Optimizer | None,
    record: RemedyRecord,
) -> None:
    columns = [u * block + offset for u in units for offset in range(block)]
    index = torch.tensor(columns, device=layer.weight.device)
    for tensor in [layer.weight, *_optimizer_buffers(optimizer, layer.weight)]:
        record.save_tensor(tensor)
        tensor.index_fill_(1, index, 0.0)
