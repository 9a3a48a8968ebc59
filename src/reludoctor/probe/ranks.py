"""Which process of a ``torch.distributed`` run this is: rank 0 alone writes reports and logs.
Light on purpose: combining the ranks' counts lives in :mod:`reludoctor.probe.distributed`,
imported only when a run has more than one process."""

from __future__ import annotations

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
