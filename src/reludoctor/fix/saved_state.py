"""A copy of a model's and optimizer's state, kept on the CPU: what a rewind goes back to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def cpu_copy(value: Any) -> Any:
    """``value`` (a state dict, nested) with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: cpu_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(cpu_copy(item) for item in value)
    return value


@dataclass(frozen=True)
class SavedState:
    """The model's and optimizer's state at ``step``, copied to the CPU.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> saved = SavedState.take(model, optimizer, step=0)
        >>> _ = torch.nn.init.zeros_(model.weight)
        >>> replaced = saved.restore(model, optimizer)
        >>> bool(model.weight.abs().sum() > 0), bool(replaced.model["weight"].abs().sum() == 0)
        (True, True)
    """

    step: int
    model: dict[str, Any]
    optimizer: dict[str, Any]

    @classmethod
    def take(cls, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> SavedState:
        """The state of ``model`` and ``optimizer`` now."""
        return cls(step, cpu_copy(model.state_dict()), cpu_copy(optimizer.state_dict()))

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> SavedState:
        """Load this state back into ``model`` and ``optimizer``; the state it replaced comes
        back (to undo with). A state that no longer fits them (a layer added since) raises,
        with the state before put back."""
        replaced = SavedState.take(model, optimizer, self.step)
        try:
            model.load_state_dict(self.model)
            optimizer.load_state_dict(self.optimizer)
        except (RuntimeError, ValueError, KeyError):
            model.load_state_dict(replaced.model)
            optimizer.load_state_dict(replaced.optimizer)
            raise
        return replaced
