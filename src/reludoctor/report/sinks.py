"""Where a watched run is logged while it trains: the interface every such log implements
(TensorBoard's :class:`~reludoctor.report.tensorboard.TensorBoardLog`, Lightning's loggers).

A log reads only what the monitor hands it: each closed window (histogram values included),
the findings announced at that window's end, and the final report when the monitor closes.
Under ``torch.distributed`` only rank 0 is given logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from reludoctor.diagnose.findings import Finding
    from reludoctor.diagnose.summaries import Window
    from reludoctor.report.report import Report


@runtime_checkable
class RunLog(Protocol):
    """A destination for a watched run, written at each window's end.

    Example:
        >>> class Printed:
        ...     def write_window(self, window): print("window", window.index)
        ...     def write_findings(self, findings, step): pass
        ...     def close(self, report=None): pass
        >>> isinstance(Printed(), RunLog)
        True
    """

    def write_window(self, window: Window) -> None:
        """A window just closed: write its numbers at step ``window.end_step``."""

    def write_findings(self, findings: Sequence[Finding], step: int) -> None:
        """Findings first announced at the end of the window that ended at ``step``."""

    def close(self, report: Report | None = None) -> None:
        """The run is over: write ``report``'s diagnosis (if given) and release the log.
        Closing twice does nothing."""
