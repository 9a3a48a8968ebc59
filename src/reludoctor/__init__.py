"""reludoctor: find, explain and fix dead ReLU units.

Example:
    >>> import reludoctor as rd
    >>> sorted(rd.__all__)[:3]
    ['Finding', 'LayerReport', 'Monitor']
"""

from reludoctor.findings import Finding
from reludoctor.monitor import Monitor, watch
from reludoctor.report.model import LayerReport, Report, Window, WindowLayer
from reludoctor.rules import Thresholds
from reludoctor.scan import scan
from reludoctor.treat import Treatment, treat

__version__ = "0.1.0"

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
