"""Remedies for a PyTorch model, each undoable (the public path; they live in
:mod:`reludoctor.fix.remedies`).

Example:
    >>> import torch.nn as nn
    >>> from reludoctor.remedies import kaiming_init
    >>> kaiming_init(nn.Sequential(nn.Linear(4, 3), nn.ReLU())).undo()
"""

from reludoctor.fix.remedies import (
    SWAP_TARGETS,
    RemedyError,
    RemedyRecord,
    add_batch_norm,
    kaiming_init,
    lecun_init,
    lower_learning_rate,
    reset_norm_shift,
    swap_activation,
)

__all__ = [
    "SWAP_TARGETS",
    "RemedyError",
    "RemedyRecord",
    "add_batch_norm",
    "kaiming_init",
    "lecun_init",
    "lower_learning_rate",
    "reset_norm_shift",
    "swap_activation",
]
