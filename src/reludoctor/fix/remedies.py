"""In-place fixes for dead units: initialisation, activations, batch norm, learning rate.

Every remedy changes the user's model (or optimizer) in place and returns a
:class:`RemedyRecord` saying what it changed and what it could not, with ``undo()`` to put
everything back. A remedy that fails part-way undoes what it had done before raising, so a
failed remedy leaves model and optimizer as they were.

    >>> import torch
    >>> from torch import nn
    >>> from reludoctor.fix.remedies import swap_activation
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> record = swap_activation(model, "leaky_relu", negative_slope=0.1)
    >>> model[1]
    LeakyReLU(negative_slope=0.1)
    >>> record.undo(); model[1]
    ReLU()
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from reludoctor.catalogue.activations import INIT_NAMES, SWAP_KINDS, can_die
from reludoctor.diagnose.summarize import Summarizer
from reludoctor.errors import InputError
from reludoctor.probe.probes import Probes
from reludoctor.probe.targets import ACTIVATION_MODULES, UNWATCHED_ACTIVATION_MODULES
from reludoctor.probe.tracker import Tracker

CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Layers whose rows are units (Linear, Conv): what remedies and revival act on.
WEIGHTED_LAYERS = (nn.Linear, *CONV_LAYERS)

#: Activation modules by their kind (:mod:`reludoctor.catalogue.activations`), watched or not.
_MODULE_KINDS: dict[type[nn.Module], str] = {**ACTIVATION_MODULES, **UNWATCHED_ACTIVATION_MODULES}
_KIND_MODULES: dict[str, type[nn.Module]] = {kind: cls for cls, kind in _MODULE_KINDS.items()}

#: Activations a ReLU can be swapped for (the catalogue's swap targets), with PyTorch's defaults.
SWAP_TARGETS: dict[str, Callable[..., nn.Module]] = {
    kind: _KIND_MODULES[kind] for kind in SWAP_KINDS
}

#: The activations ``swap_activation`` replaces: the ones whose units can die.
CAN_DIE_MODULES: tuple[type[nn.Module], ...] = tuple(
    cls for cls, kind in ACTIVATION_MODULES.items() if can_die(kind)
)

#: Activation modules and the ``nonlinearity`` name ``nn.init`` knows them by.
_GAIN_NAMES: dict[type[nn.Module], str] = {
    cls: INIT_NAMES[kind] for cls, kind in _MODULE_KINDS.items() if kind in INIT_NAMES
}


class RemedyError(InputError):
    """A remedy that does not apply to this model, or was given something it cannot use."""


@dataclass
class RemedyRecord:
    """What a remedy changed (``changed``), what it could not (``skipped``, with why), and
    how to put it back (``undo``)."""

    remedy: str
    changed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def undo(self) -> None:
        """Restore the model and optimizer as they were before the remedy."""
        while self._undo:
            self._undo.pop()()

    def to_dict(self) -> dict[str, Any]:
        return {
            "remedy": self.remedy,
            "changed": list(self.changed),
            "skipped": list(self.skipped),
            "details": dict(self.details),
        }

    # -- building blocks that remember how to undo themselves --------------------------------
    def on_undo(self, action: Callable[[], None], *, last: bool = False) -> None:
        """Run ``action`` at :meth:`undo` (undo runs actions newest first; ``last``: after
        every other one)."""
        if last:
            self._undo.insert(0, action)
        else:
            self._undo.append(action)

    def save_tensor(self, tensor: torch.Tensor) -> None:
        """Remember ``tensor``'s values (a parameter or an optimizer buffer)."""
        saved = tensor.detach().clone()

        def restore() -> None:
            with torch.no_grad():
                tensor.copy_(saved)

        self._undo.append(restore)

    def set_child(self, parent: nn.Module, name: str, module: nn.Module) -> None:
        old = parent._modules[name]
        parent._modules[name] = module
        self._undo.append(lambda: parent._modules.__setitem__(name, old))

    def replace_children(self, parent: nn.Module, children: OrderedDict[str, nn.Module]) -> None:
        old = OrderedDict(parent._modules)

        def restore() -> None:
            parent._modules.clear()
            parent._modules.update(old)

        parent._modules.clear()
        parent._modules.update(children)
        self._undo.append(restore)

    def set_group(self, group: dict[str, Any], key: str, value: Any) -> None:
        old = group[key]
        group[key] = value
        self._undo.append(lambda: group.__setitem__(key, old))

    def add_param_group(self, optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
        optimizer.add_param_group({"params": params})
        group = optimizer.param_groups[-1]

        def restore() -> None:
            # by identity: list.remove would compare groups (and their tensors) with ==
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if g is not group]
            for p in params:
                optimizer.state.pop(p, None)

        self._undo.append(restore)


@contextlib.contextmanager
def applying(record: RemedyRecord) -> Iterator[RemedyRecord]:
    """Run a remedy's body; on any error undo what it had done, then re-raise."""
    try:
        yield record
    except BaseException:
        record.undo()
        raise


def _require_trainable(name: str, module: nn.Module, remedy: str) -> None:
    frozen = [n for n, p in module.named_parameters(recurse=False) if not p.requires_grad]
    if frozen:
        raise RemedyError(
            f"{remedy} would change {name}.{frozen[0]}, which is frozen (requires_grad=False): "
            "its units could not learn afterwards; unfreeze it with requires_grad_(True) first"
        )


def _weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHTED_LAYERS)]


def following_activations(model: nn.Module) -> dict[str, nn.Module | None]:
    """For each Linear/Conv layer, the activation module registered after it and before the
    next Linear/Conv (registration order, which is forward order in nn.Sequential stacks)."""
    result: dict[str, nn.Module | None] = {}
    current: str | None = None
    for name, module in model.named_modules():
        if isinstance(module, WEIGHTED_LAYERS):
            current = name
            result[name] = None
        elif current is not None and result[current] is None and type(module) in _GAIN_NAMES:
            result[current] = module
    return result


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def reset_norm_shift(model: nn.Module) -> RemedyRecord:
    """Set each negative shift (bias, beta) of the model's batch, group and layer norms to 0:
    a normalisation layer before a ReLU whose beta went negative holds its units below 0.
    Running statistics are left alone (re-estimate them by running training-mode forwards).

        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        >>> _ = nn.init.constant_(model[1].bias, -5.0)
        >>> reset_norm_shift(model).changed
        ['1: 8 negative shifts set to 0 (mean -5)']
    """
    norms = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, _NORMS) and isinstance(getattr(module, "bias", None), nn.Parameter)
    ]
    if not norms:
        raise RemedyError(
            f"reset_norm_shift: {type(model).__name__} has no batch, group or layer norm with a "
            "learned shift"
        )
    record = RemedyRecord("reset_norm_shift")
    with applying(record), torch.no_grad():
        for name, module in norms:
            negative = module.bias < 0
            count = int(negative.sum())
            if not count:
                record.skipped.append(f"{name}: no negative shift")
                continue
            _require_trainable(name, module, "reset_norm_shift")
            mean = float(module.bias[negative].mean())
            record.save_tensor(module.bias)
            module.bias.clamp_(min=0.0)
            record.changed.append(f"{name}: {count} negative shifts set to 0 (mean {mean:.3g})")
    return record


def _init_weights(
    model: nn.Module,
    remedy: str,
    initialise: Callable[[str, nn.Module, nn.Module], str | None],
) -> RemedyRecord:
    layers = _weighted_layers(model)
    if not layers:
        raise RemedyError(f"{remedy}: {type(model).__name__} has no Linear or Conv layer")
    record = RemedyRecord(remedy)
    after = following_activations(model)
    with applying(record), torch.no_grad():
        for name, layer in layers:
            activation = after[name]
            if activation is None:
                record.skipped.append(f"{name}: no activation follows it (an output layer)")
                continue
            _require_trainable(name, layer, remedy)
            record.save_tensor(layer.weight)
            if layer.bias is not None:
                record.save_tensor(layer.bias)
                nn.init.zeros_(layer.bias)
            record.changed.append(f"{name}: {initialise(name, layer, activation)}")
    if not record.changed:
        raise RemedyError(
            f"{remedy}: no Linear/Conv layer of the model is followed by an activation"
        )
    return record


def kaiming_init(
    model: nn.Module, *, mode: str = "fan_in", distribution: str = "normal"
) -> RemedyRecord:
    """He (Kaiming) initialisation of every Linear/Conv layer followed by an activation, with
    the gain of that activation (the slope for LeakyReLU/PReLU); biases set to 0.

    ``mode`` is ``"fan_in"`` (preserves the forward signal) or ``"fan_out"`` (the backward one).
    Output layers (no activation after them) are left alone and listed in ``skipped``.

        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
        >>> record = kaiming_init(model)
        >>> record.changed
        ['0: He normal, fan_in, leaky_relu slope 0.2']
    """
    if mode not in ("fan_in", "fan_out") or distribution not in ("normal", "uniform"):
        raise RemedyError(
            f"kaiming_init: mode must be 'fan_in' or 'fan_out' and distribution 'normal' or "
            f"'uniform' (got {mode!r}, {distribution!r})"
        )
    init = nn.init.kaiming_normal_ if distribution == "normal" else nn.init.kaiming_uniform_

    def initialise(name: str, layer: nn.Module, activation: nn.Module) -> str:
        nonlinearity = _GAIN_NAMES[type(activation)]
        slope = _negative_slope(activation)
        init(layer.weight, a=slope, mode=mode, nonlinearity=nonlinearity)
        described = f"leaky_relu slope {slope:g}" if nonlinearity == "leaky_relu" else nonlinearity
        return f"He {distribution}, {mode}, {described}"

    record = _init_weights(model, "kaiming_init", initialise)
    record.details = {"mode": mode, "distribution": distribution}
    return record


def _negative_slope(activation: nn.Module) -> float:
    if isinstance(activation, nn.LeakyReLU):
        return float(activation.negative_slope)
    if isinstance(activation, nn.PReLU):
        return float(activation.weight.detach().mean())
    if isinstance(activation, nn.RReLU):
        return (activation.lower + activation.upper) / 2
    return 0.0


def lecun_init(model: nn.Module, *, distribution: str = "normal") -> RemedyRecord:
    """LeCun initialisation (std ``1/sqrt(fan_in)``) of every Linear/Conv layer followed by an
    activation, biases 0 - what SELU needs to self-normalise."""
    if distribution not in ("normal", "uniform"):
        raise RemedyError(
            f"lecun_init: distribution must be 'normal' or 'uniform', not {distribution!r}"
        )

    def initialise(name: str, layer: nn.Module, activation: nn.Module) -> str:
        fan_in = nn.init._calculate_fan_in_and_fan_out(layer.weight)[0]
        if distribution == "normal":
            _lecun_normal_(layer.weight)
        else:
            limit = math.sqrt(3.0 / fan_in)
            nn.init.uniform_(layer.weight, -limit, limit)
        return f"LeCun {distribution}"

    return _init_weights(model, "lecun_init", initialise)


def _lecun_normal_(weight: torch.Tensor) -> None:
    """Normal weights with std ``1/sqrt(fan_in)`` (what SELU needs), in place."""
    fan_in = nn.init._calculate_fan_in_and_fan_out(weight)[0]
    nn.init.normal_(weight, 0.0, 1.0 / math.sqrt(fan_in))


def swap_activation(
    model: nn.Module,
    to: str = "leaky_relu",
    *,
    example: torch.Tensor | None = None,
    **kwargs: Any,
) -> RemedyRecord:
    """Replace every ``nn.ReLU``/``nn.ReLU6`` module with ``to`` (a key of
    :data:`SWAP_TARGETS`; ``kwargs`` go to its constructor, e.g. ``negative_slope=0.1``).

    ``to="selu"`` also re-initialises the layers with LeCun normal and turns every
    ``nn.Dropout`` into ``nn.AlphaDropout`` with the same rate, as SELU requires. Functional
    calls (``F.relu(x)`` in a ``forward``) live in the model's code and cannot be swapped in
    place: pass ``example`` (one input batch) to have them found and listed in ``skipped``.
    """
    if to not in SWAP_TARGETS:
        raise RemedyError(
            f"swap_activation: unknown activation {to!r}; choose from {', '.join(SWAP_TARGETS)}"
        )
    try:
        SWAP_TARGETS[to](**kwargs)
    except (TypeError, ValueError, RuntimeError) as error:
        raise RemedyError(f"swap_activation: {to} does not take {kwargs}: {error}") from None
    targets = [
        (parent, child_name, child, f"{parent_name}.{child_name}".lstrip("."))
        for parent_name, parent in model.named_modules()
        for child_name, child in parent.named_children()
        if type(child) in CAN_DIE_MODULES
    ]
    functional = _functional_calls(model, example) if example is not None else None
    if not targets and not functional:
        raise RemedyError(
            f"swap_activation: {type(model).__name__} has no nn.ReLU/nn.ReLU6 module to swap"
            + ("" if example is not None else " (pass example= to look for functional calls)")
        )
    record = RemedyRecord("swap_activation", details={"to": to, **kwargs})
    with applying(record):
        for parent, child_name, child, name in targets:
            new = SWAP_TARGETS[to](**kwargs)
            _match_device(new, model)
            record.set_child(parent, child_name, new)
            record.changed.append(f"{name}: {type(child).__name__} -> {type(new).__name__}")
        if functional:
            for site in functional:
                record.skipped.append(
                    f"{site}: a functional call in the model's forward; edit the code to call "
                    f"the {to} function (or an nn module) instead"
                )
        elif functional is None:
            record.skipped.append(
                "functional activations not looked for: pass example= to find them"
            )
        if to == "selu" and targets:
            _selu_companions(model, record)
    return record


def _match_device(module: nn.Module, model: nn.Module) -> None:
    reference = next(model.parameters(), None)
    if reference is not None:
        module.to(device=reference.device, dtype=reference.dtype)


def _selu_companions(model: nn.Module, record: RemedyRecord) -> None:
    """LeCun normal weights and AlphaDropout, without which SELU does not self-normalise."""
    for name, layer in _weighted_layers(model):
        _require_trainable(name, layer, "swap_activation(to='selu')")
        with torch.no_grad():
            record.save_tensor(layer.weight)
            _lecun_normal_(layer.weight)
            if layer.bias is not None:
                record.save_tensor(layer.bias)
                nn.init.zeros_(layer.bias)
        record.changed.append(f"{name}: LeCun normal initialisation")
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                record.set_child(parent, child_name, nn.AlphaDropout(child.p))
                name = f"{parent_name}.{child_name}".lstrip(".")
                record.changed.append(f"{name}: Dropout({child.p}) -> AlphaDropout({child.p})")


def _functional_calls(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the activation call sites that are functional (not modules), from one forward
    in eval mode without gradients."""
    tracker = Tracker(window=sys.maxsize, sample_every=1, summarize=Summarizer().window)
    probes = Probes(model, tracker, count_eval=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        probes.remove()
        tracker.disarm()
        model.train(was_training)
    sites = [layer.site for layer in tracker.layers]
    return [
        f"{site.name} ({site.source})" if site.source else site.name
        for site in sites
        if site.via == "functional" and can_die(site.kind)
    ]


def add_batch_norm(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> RemedyRecord:
    """Insert batch norm between each Linear/Conv and the ReLU-family module right after it,
    inside ``nn.Sequential`` containers (names of existing layers are kept, so their state
    dict keys do not change). With ``optimizer`` the new parameters join it as a new group.

    Layers applied in a custom ``forward`` cannot be rewritten from outside: a model with
    no such pair inside an ``nn.Sequential`` gets a :class:`RemedyError` saying so.
    """
    record = RemedyRecord("batch_norm")
    new_params: list[nn.Parameter] = []
    with applying(record):
        for parent_name, parent in list(model.named_modules()):
            if not isinstance(parent, nn.Sequential):
                continue
            items = list(parent._modules.items())
            rebuilt: OrderedDict[str, nn.Module] = OrderedDict()
            inserted = False
            for i, (name, module) in enumerate(items):
                rebuilt[name] = module  # type: ignore[assignment]
                following = items[i + 1][1] if i + 1 < len(items) else None
                if isinstance(module, WEIGHTED_LAYERS) and type(following) in _GAIN_NAMES:
                    norm = _batch_norm_for(module)
                    norm.to(device=module.weight.device, dtype=module.weight.dtype)
                    norm.train(module.training)
                    taken = set(parent._modules) | set(rebuilt)
                    norm_name = f"{name}_batch_norm"
                    suffix = 2
                    while norm_name in taken:
                        norm_name, suffix = f"{name}_batch_norm{suffix}", suffix + 1
                    rebuilt[norm_name] = norm
                    new_params.extend(norm.parameters())
                    full = f"{parent_name}.{name}".lstrip(".")
                    record.changed.append(
                        f"{full}: {type(norm).__name__} inserted after it as {norm_name}"
                    )
                    inserted = True
            if inserted:
                record.replace_children(parent, rebuilt)
        if not record.changed:
            raise RemedyError(
                f"add_batch_norm: {type(model).__name__} has no Linear/Conv followed directly by "
                "a ReLU-family module inside an nn.Sequential; layers applied in a custom "
                "forward cannot be rewritten from outside - add nn.BatchNorm1d/2d there"
            )
        if optimizer is not None:
            record.add_param_group(optimizer, new_params)
            record.changed.append(f"optimizer: new parameter group with {len(new_params)} tensors")
        else:
            record.skipped.append(
                "optimizer: not given; add the new parameters to yours "
                "(optimizer.add_param_group) or build it again"
            )
    return record


def _batch_norm_for(layer: nn.Module) -> nn.Module:
    if isinstance(layer, nn.Linear):
        return nn.BatchNorm1d(layer.out_features)
    norms = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
    return norms[type(layer)](layer.out_channels)  # type: ignore[index]


def lower_learning_rate(optimizer: torch.optim.Optimizer, factor: float = 10.0) -> RemedyRecord:
    """Divide the learning rate of every parameter group by ``factor`` (> 1)."""
    if not (isinstance(factor, (int, float)) and factor > 1 and math.isfinite(factor)):
        raise RemedyError(
            f"lower_learning_rate: factor must be a finite number > 1, not {factor!r}"
        )
    groups = getattr(optimizer, "param_groups", None)
    if not groups or any("lr" not in g for g in groups):
        raise RemedyError(
            f"lower_learning_rate: {type(optimizer).__name__} has no learning rate in its "
            "param_groups"
        )
    record = RemedyRecord("lower_learning_rate", details={"factor": factor})
    for i, group in enumerate(groups):
        old = group["lr"]
        record.set_group(group, "lr", old / factor)
        record.changed.append(f"param group {i}: lr {float(old):g} -> {float(old / factor):g}")
    return record
