"""reludoctor: find, explain and fix dead ReLU units.

The names below are imported on first use, so ``import reludoctor`` stays light: it loads
neither TensorFlow/Keras nor TensorBoard nor the ``torch.distributed`` machinery.

Example:
    >>> import reludoctor as rd
    >>> sorted(rd.__all__)[:3]
    ['Finding', 'LayerReport', 'Monitor']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "Finding": "reludoctor.diagnose.findings",
    "LayerReport": "reludoctor.diagnose.summaries",
    "Monitor": "reludoctor.api.monitor",
    "Report": "reludoctor.report.report",
    "Thresholds": "reludoctor.diagnose.thresholds",
    "Treatment": "reludoctor.api.treat",
    "Window": "reludoctor.diagnose.summaries",
    "WindowLayer": "reludoctor.diagnose.summaries",
    "scan": "reludoctor.api.scan",
    "treat": "reludoctor.api.treat",
    "watch": "reludoctor.api.monitor",
}

__all__ = [
    "Finding",
    "LayerReport",
    "Monitor",
    "Report",
    "Thresholds",
    "Treatment",
    "Window",
    "WindowLayer",
    "__version__",
    "scan",
    "treat",
    "watch",
]

if TYPE_CHECKING:
    from reludoctor.api.monitor import Monitor, watch
    from reludoctor.api.scan import scan
    from reludoctor.api.treat import Treatment, treat
    from reludoctor.diagnose.findings import Finding
    from reludoctor.diagnose.summaries import LayerReport, Window, WindowLayer
    from reludoctor.diagnose.thresholds import Thresholds
    from reludoctor.report.report import Report


#: Public submodules, importable as attributes too (``rd.remedies.kaiming_init``).
_SUBMODULES = frozenset({"keras", "lightning", "remedies", "revive", "scenarios"})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"reludoctor.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reludoctor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
