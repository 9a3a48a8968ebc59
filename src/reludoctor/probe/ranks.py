"""Which process of a ``torch.distributed`` run this is: rank 0 alone writes reports and logs.
Light on purpose: combining the ranks' counts lives in :mod:`reludoctor.probe.distributed`,
imported only when a run has more than one process."""

from __future__ import annotations

import os

import torch.distributed as dist

#: Seconds a rank waits for the others at a window's end before it counts without them.
DEFAULT_RANK_TIMEOUT = 300.0


def world() -> tuple[int, int]:
    """(rank, world size) of the ``torch.distributed`` run this process is in; (0, 1) alone.

    Example:
        >>> world()
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_rank_zero() -> bool:
    """Whether this process is the one that writes reports and logs: rank 0 of the
    ``torch.distributed`` run it is in, or, before the run starts or after it ended, of the
    launcher that started it (``torchrun`` sets ``RANK``); True for a process alone.

    Example:
        >>> is_rank_zero()
        True
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True
