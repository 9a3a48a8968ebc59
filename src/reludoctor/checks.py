"""Checks of arguments that the entry points share, each failing with one clear message."""

from __future__ import annotations

from typing import Any

from torch import nn


def positive_int(value: Any, name: str) -> int:
    """``value`` when it is a whole number >= 1, else a ``ValueError`` naming ``name``.

    Example:
        >>> positive_int(3, "window")
        3
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def require_module(model: Any, caller: str) -> nn.Module:
    """``model`` when it is a ``torch.nn.Module``, else a ``TypeError`` saying what to pass.

    Example:
        >>> require_module(nn.ReLU(), "rd.watch")
        ReLU()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"{caller} expects a torch.nn.Module, got {type(model).__module__}."
            f"{type(model).__qualname__}; pass the model itself (for a torch.export program, "
            "its .module())"
        )
    return model
