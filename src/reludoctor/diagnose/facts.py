"""Facts about a model, its optimizer and its inputs, read once and cheaply.

The rules weigh what the monitor saw against these: the initial weight scale of each layer
against the He value, constant weights, bias signs, normalisation layers and residual
additions, the optimizer and its learning rates, and statistics of the first input batches.
Reading them syncs with the device a handful of times when watching starts, never per step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from reludoctor.catalogue.activations import he_gain
from reludoctor.probe.inputs import InputFacts

_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),  # torch >= 2.4
)
#: A weight's mean and spread are read from at most this many of its values (evenly spaced
#: rows): the scale of an initialisation shows in a sample, and a big model is read fast.
STAT_ELEMENTS = 1 << 16


@dataclass
class LayerFacts:
    """A Linear or Conv layer's weights and bias when watching started."""

    name: str
    type: str
    fan_in: int
    out_features: int
    weight_std: float
    weight_mean: float
    constant: bool  # every weight equal (all zero included)
    all_zero: bool
    bias_negative_share: float | None = None
    bias_mean: float | None = None
    bias_min: float | None = None
    #: ``bias_mean`` in units of the std of the pre-activation it feeds (first batch seen):
    #: -1 means the average bias alone shifts a typical unit one std below 0.
    bias_mean_in_preact_std: float | None = None

    def he_ratio(self, activation: str = "relu") -> float | None:
        """``weight_std`` over the He value ``gain / sqrt(fan_in)`` for ``activation``."""
        if self.fan_in <= 0:
            return None
        he = he_gain(activation) / math.sqrt(self.fan_in)
        return self.weight_std / he


@dataclass
class OptimizerFacts:
    """The optimizer's type and the learning rate of each parameter group."""

    type: str
    learning_rates: list[float]
    groups: int
    adaptive: bool


@dataclass
class ModelFacts:
    """Everything the rules may know about the model besides what the monitor measured.

    Example:
        >>> import torch
        >>> facts = read_model_facts(torch.nn.Sequential(torch.nn.Linear(4, 2)))
        >>> facts.layers[0].fan_in, facts.norm_layers
        (4, 0)
    """

    layers: list[LayerFacts] = field(default_factory=list)
    norm_layers: int = 0
    residual_adds: int | None = None  # None until a forward has been seen
    optimizer: OptimizerFacts | None = None
    inputs: InputFacts | None = None

    def layer(self, name: str | None) -> LayerFacts | None:
        for layer in self.layers:
            if layer.name == name:
                return layer
        return None

    def with_preactivation_scale(self, stds: dict[str, float]) -> ModelFacts:
        """A copy whose layers' bias means are also given in units of ``stds[layer name]``
        (the std of the pre-activation each layer feeds)."""
        layers = [
            replace(lay, bias_mean_in_preact_std=lay.bias_mean / stds[lay.name])
            if lay.bias_mean is not None and stds.get(lay.name)
            else lay
            for lay in self.layers
        ]
        return replace(self, layers=layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ModelFacts:
        data = data or {}
        optimizer = data.get("optimizer")
        inputs = data.get("inputs")
        return cls(
            layers=[LayerFacts(**layer) for layer in data.get("layers") or []],
            norm_layers=int(data.get("norm_layers") or 0),
            residual_adds=data.get("residual_adds"),
            optimizer=OptimizerFacts(**optimizer) if optimizer else None,
            inputs=InputFacts(**inputs) if inputs else None,
        )


def read_model_facts(model: nn.Module) -> ModelFacts:
    """Weight and bias statistics of every Linear/Conv layer, and the normalisation layers."""
    layers = []
    norm_layers = 0
    for name, module in model.named_modules():
        if isinstance(module, _NORM_LAYERS):
            norm_layers += 1
        weight = getattr(module, "weight", None)
        if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2 or weight.numel() == 0:
            continue
        layers.append(_layer_facts(name or type(model).__name__, module, weight))
    return ModelFacts(layers=layers, norm_layers=norm_layers)


def _layer_facts(name: str, module: nn.Module, weight: torch.Tensor) -> LayerFacts:
    transposed = getattr(module, "transposed", False)
    units_first = weight.detach().transpose(0, 1) if transposed else weight.detach()
    bias = getattr(module, "bias", None)
    return weight_facts(
        name, type(module).__name__, units_first, bias if isinstance(bias, torch.Tensor) else None
    )


def weight_facts(
    name: str, type_name: str, weight: torch.Tensor, bias: torch.Tensor | None
) -> LayerFacts:
    """A layer's facts from its weight, laid out one unit per row (``out x fan_in...``), and
    its bias. Framework-neutral: the Keras side passes its kernels moved to this layout."""
    with torch.no_grad():
        w = weight.detach()
        # One pass over the whole weight (its extremes: zero or constant weights are exact),
        # the spread from at most STAT_ELEMENTS of it, evenly spaced rows; reductions only,
        # so no weight-sized temporary, and one read back.
        low, high = torch.aminmax(w.float() if not w.is_floating_point() else w)
        rows = w.reshape(w.shape[0], -1)
        rows = rows[:: max(1, math.ceil(rows.numel() / STAT_ELEMENTS))].float()
        stats = torch.stack([rows.sum(), torch.linalg.vector_norm(rows), low.float(), high.float()])
        total, norm, low, high = stats.cpu().double().tolist()
        count = rows.numel()
        mean = total / count
        std = 0.0 if low == high else math.sqrt(max(norm * norm / count - mean * mean, 0.0))
        absmax = max(-low, high)
        facts = LayerFacts(
            name=name,
            type=type_name,
            fan_in=int(w[0].numel()),
            out_features=int(w.shape[0]),
            weight_std=std,
            weight_mean=mean,
            constant=low == high,
            all_zero=absmax == 0,
        )
        if bias is not None and bias.numel():
            b = bias.detach().float()
            negative, b_mean, b_min = torch.stack([(b < 0).float().mean(), b.mean(), b.min()])
            facts.bias_negative_share = float(negative)
            facts.bias_mean = float(b_mean)
            facts.bias_min = float(b_min)
    return facts


def read_optimizer_facts(optimizer: Any) -> OptimizerFacts | None:
    """Type and learning rates of a ``torch.optim`` optimizer (None for anything else)."""
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not groups:
        return None
    rates = [float(g["lr"]) for g in groups if isinstance(g.get("lr"), (int, float, torch.Tensor))]
    name = type(optimizer).__name__
    adaptive = any("betas" in g or "alpha" in g or "lr_decay" in g for g in groups)
    return OptimizerFacts(type=name, learning_rates=rates, groups=len(groups), adaptive=adaptive)
