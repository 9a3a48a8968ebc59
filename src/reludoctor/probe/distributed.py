"""Counts combined across the processes of a ``torch.distributed`` run.

Under DDP each rank sees its own share of the data, so a unit that fires only on rank 1's
samples is alive although rank 0 never saw it fire. When a window closes, every rank's
counters are combined by each counter's own reduction (sums added, maxima taken) with two
``all_reduce`` calls over a gloo group of reludoctor's own (any backend trains the model; the
counters are on the host by then). A unit alive on any rank is then alive on all.

Before reducing, each rank checks in at the rendezvous store and waits at most ``timeout``
seconds for the others. A rank that does not come (it died, or hangs) is named: the
survivors warn, keep their own counts from then on, and the report says which ranks' counts
are missing and from which step (``report.meta["ranks"]``).
"""

from __future__ import annotations

import datetime
import itertools
import logging
from typing import Any

import torch
import torch.distributed as dist

from reludoctor.probe import counters
from reludoctor.probe.counters import Snapshot
from reludoctor.probe.ranks import DEFAULT_RANK_TIMEOUT, world

logger = logging.getLogger("reludoctor")

#: The all_reduce op of each way counters combine (``counters.REDUCTIONS``).
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_instances = itertools.count()


class RankCombiner:
    """Combines a window's layer snapshots across ranks (made by every rank, in step)."""

    def __init__(self, timeout: float = DEFAULT_RANK_TIMEOUT) -> None:
        if not timeout > 0:
            raise ValueError(f"rank_timeout must be a number of seconds > 0, got {timeout!r}")
        self.rank, self.world_size = world()
        self.timeout = datetime.timedelta(seconds=timeout)
        # same number on every rank: ranks make their monitors in the same order
        self._prefix = f"reludoctor/{next(_instances)}"
        self._store = dist.distributed_c10d._get_default_store()
        self._group = dist.new_group(backend="gloo", timeout=self.timeout)
        self._windows = 0
        self._mismatch_told = False
        #: Ranks whose counts stopped arriving, and the step from which they are missing.
        self.missing: list[int] = []
        self.missing_since_step: int | None = None

    def meta(self) -> dict[str, Any]:
        """What the report says about the ranks."""
        meta: dict[str, Any] = {"world_size": self.world_size, "rank": self.rank}
        if self.missing_since_step is not None:
            meta["missing"] = self.missing
            meta["missing_since_step"] = self.missing_since_step
        return meta

    def combine(self, snapshots: list[Snapshot], step: int) -> list[Snapshot]:
        """``snapshots`` with every rank's counts combined; this rank's own once a rank is
        missing."""
        if self.missing_since_step is not None:
            return snapshots
        self._windows += 1
        absent = self._check_in()
        if absent is None:
            try:
                return self._reduce(snapshots)
            except _Mismatch as error:  # every rank sees the same shapes, and stops here
                if not self._mismatch_told:
                    logger.warning("reludoctor on rank %d: %s", self.rank, error)
                    self._mismatch_told = True
                return snapshots
            except RuntimeError as error:  # a rank left during the reduction
                logger.debug("reludoctor: all_reduce failed: %s", error)
                absent = self._absent() or []
        self._lose(absent, step)
        return snapshots

    # -- presence ----------------------------------------------------------------------------
    def _key(self, rank: int, window: int | None = None) -> str:
        return f"{self._prefix}/{window or self._windows}/{rank}"

    def _check_in(self) -> list[int] | None:
        """None when every rank checked in for this window, else the ranks that did not."""
        try:
            self._store.set(self._key(self.rank), "1")
            if self._windows > 2:  # no longer read by anyone
                self._store.delete_key(self._key(self.rank, self._windows - 2))
            self._store.wait([self._key(r) for r in range(self.world_size)], self.timeout)
            return None
        except RuntimeError:  # timed out, or the store is gone
            return self._absent() or []

    def _absent(self) -> list[int] | None:
        """Ranks that have not checked in for this window (None: the store is unreachable,
        which means rank 0, that holds it, is gone)."""
        try:
            return [r for r in range(self.world_size) if not self._store.check([self._key(r)])]
        except RuntimeError:
            return [0] if self.rank != 0 else None

    def _lose(self, absent: list[int], step: int) -> None:
        self.missing = sorted(absent)
        self.missing_since_step = step
        named = ", ".join(map(str, self.missing)) if self.missing else "unknown"
        logger.warning(
            "reludoctor on rank %d: the counts of rank(s) %s are missing from step %d on (no "
            "answer within %.0f s); from here on this rank reports its own counts only",
            self.rank,
            named,
            step,
            self.timeout.total_seconds(),
        )

    # -- reduction ---------------------------------------------------------------------------
    def _reduce(self, snapshots: list[Snapshot]) -> list[Snapshot]:
        # one tensor per reduction, packed in the same order on every rank
        packed = {reduce: counters.pack(snapshots, reduce) for reduce in counters.REDUCTIONS}
        sums = packed["sum"]
        shape = torch.tensor([len(snapshots), sums.numel(), -len(snapshots), -sums.numel()])
        dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=self._group)
        if shape[0] != -shape[2] or shape[1] != -shape[3]:
            raise _Mismatch(
                "the ranks watch different activation layers (not the same model?): "
                f"{len(snapshots)} here; counting this rank's own"
            )
        for reduce, values in packed.items():
            dist.all_reduce(values, op=_OPS[reduce], group=self._group)
        return counters.unpack(snapshots, packed)


class _Mismatch(RuntimeError):
    pass
