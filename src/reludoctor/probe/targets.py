"""Which torch modules, functions, tensor methods and ATen operators are which activation
kind. What is known of each kind (its gain, whether its units can die ...) is in
:mod:`reludoctor.catalogue.activations`; a new kind is an entry there and its torch names here.

Example:
    >>> activation_kind(torch.nn.ReLU6), activation_kind(torch.nn.Linear)
    ('relu6', None)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Activation modules, and the name of their function (their kind in
#: :mod:`reludoctor.catalogue.activations`, which holds what is known of each kind).
ACTIVATION_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky_relu",
    nn.PReLU: "prelu",
    nn.RReLU: "rrelu",
    nn.ELU: "elu",
    nn.CELU: "celu",
    nn.SELU: "selu",
    nn.GELU: "gelu",
    nn.SiLU: "silu",
    nn.Mish: "mish",
    nn.Hardswish: "hardswish",
}
#: Activation modules reludoctor knows of (for their initialisation gain) but does not watch.
UNWATCHED_ACTIVATION_MODULES: dict[type[nn.Module], str] = {
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
}

_F_NAMES = (
    "relu",
    "relu_",
    "relu6",
    "leaky_relu",
    "leaky_relu_",
    "rrelu",
    "rrelu_",
    "elu",
    "elu_",
    "celu",
    "celu_",
    "selu",
    "selu_",
    "gelu",
    "silu",
    "mish",
    "hardswish",
    "prelu",
)
_TORCH_NAMES = ("relu", "relu_", "selu", "selu_", "celu", "celu_", "rrelu", "rrelu_", "prelu")

#: Functional activations swapped per forward: (namespace, attribute) -> activation name.
#: ``hardtanh`` is watched only as the body of ``nn.ReLU6``.
FUNCTIONAL_TARGETS: dict[tuple[Any, str], str] = {
    **{(F, name): name.rstrip("_") for name in _F_NAMES},
    **{(torch, name): name.rstrip("_") for name in _TORCH_NAMES},
    (F, "hardtanh"): "hardtanh",
}
#: Tensor methods, swapped while any model is watched.
TENSOR_TARGETS: dict[tuple[Any, str], str] = {
    (torch.Tensor, "relu"): "relu",
    (torch.Tensor, "relu_"): "relu",
}

#: Additions counted during the first forward: two same-shaped activations added are a
#: residual (skip) path.
ADD_TARGETS: dict[tuple[Any, str], str] = {
    (torch, "add"): "add",
    (torch.Tensor, "add"): "add",
    (torch.Tensor, "add_"): "add",
    (torch.Tensor, "__add__"): "add",
    (torch.Tensor, "__iadd__"): "add",
    (torch.Tensor, "__radd__"): "add",
}

#: ATen operators seen in graphs from ``torch.export`` -> activation name.
_ATEN = torch.ops.aten
ATEN_TARGETS: dict[Any, str] = {
    _ATEN.relu.default: "relu",
    _ATEN.relu_.default: "relu",
    _ATEN.leaky_relu.default: "leaky_relu",
    _ATEN.leaky_relu_.default: "leaky_relu",
    _ATEN.elu.default: "elu",
    _ATEN.elu_.default: "elu",
    _ATEN.celu.default: "celu",
    _ATEN.selu.default: "selu",
    _ATEN.gelu.default: "gelu",
    _ATEN.silu.default: "silu",
    _ATEN.silu_.default: "silu",
    _ATEN.mish.default: "mish",
    _ATEN.hardswish.default: "hardswish",
    _ATEN.prelu.default: "prelu",
    _ATEN._prelu_kernel.default: "prelu",
}

#: Modules through which a unit keeps its identity (same features in, same features out).
PASS_THROUGH = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
)
#: Modules whose output features sit in dim 1 (channels) rather than the last dim.
CHANNEL_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
)


def activation_kind(module_type: type) -> str | None:
    for cls in module_type.__mro__:
        kind = ACTIVATION_MODULES.get(cls)
        if kind is not None:
            return kind
    return None


#: The names of the ATen operators of :data:`ATEN_TARGETS` (as a TorchScript graph shows them).
ATEN_NAMES = frozenset(op.name() for op in ATEN_TARGETS)


def is_activation_type(module_type: Any) -> bool:
    if isinstance(module_type, str):
        return any(module_type.endswith(cls.__name__) for cls in ACTIVATION_MODULES)
    return isinstance(module_type, type) and activation_kind(module_type) is not None
