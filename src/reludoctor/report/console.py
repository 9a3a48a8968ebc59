"""The console view of a Report: worst layers first, then the findings."""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from reludoctor.findings import REMEDIES
from reludoctor.report.model import Report

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _percent(value: float) -> str:
    return f"{value:.0%}" if value else "0%"


def summary(report: Report, max_layers: int = 10) -> Group:
    """A renderable summary: a table of the worst layers and the findings, worst first."""
    parts: list[object] = []
    verdict = (
        Text("healthy: no layer has dead units at error level", style="bold green")
        if report.healthy
        else Text("unhealthy: dead units at error level", style="bold red")
    )
    parts.append(verdict)
    if not report.layers:
        parts.append(Text("no ReLU-family activation was seen"))
        return Group(*parts)
    table = Table(title=f"Layers, worst first ({len(report.layers)} in all)", title_justify="left")
    table.add_column("layer", overflow="fold")
    table.add_column("kind")
    table.add_column("units", justify="right")
    table.add_column("dead", justify="right")
    table.add_column("dead %", justify="right")
    table.add_column("dormant", justify="right")
    table.add_column("grad norm", justify="right")
    for layer in report.worst_layers(max_layers):
        style = "red" if layer.dead_fraction >= 0.4 else ("yellow" if layer.dead else "")
        table.add_row(
            Text(layer.name),
            layer.kind,
            str(layer.units),
            str(layer.dead),
            _percent(layer.dead_fraction),
            str(len(layer.dormant_units)) if layer.fire_rate is not None else "-",
            f"{layer.grad_norm:.3g}" if layer.grad_norm is not None else "-",
            style=style,
        )
    parts.append(table)
    hidden = len(report.layers) - max_layers
    if hidden > 0:
        parts.append(Text(f"... and {hidden} more layers (see the JSON report)", style="dim"))
    findings = report.sorted_findings()
    if findings:
        parts.append(Text("Findings", style="bold"))
        for finding in findings:
            line = Text("  ")
            line.append(f"{finding.severity:7s} ", style=SEVERITY_STYLE[finding.severity])
            line.append(f"{finding.code}: ")
            line.append(finding.message)
            parts.append(line)
        remedies = [code for code in findings[0].remedies if code in REMEDIES]
        if remedies:
            parts.append(Text("What to try", style="bold"))
            for code in remedies:
                parts.append(Text(f"  - {REMEDIES[code]} ({code})"))
    return Group(*parts)


def print_summary(report: Report, console: Console | None = None, max_layers: int = 10) -> None:
    """Print :func:`summary` to ``console`` (standard output by default)."""
    (console or Console()).print(summary(report, max_layers=max_layers))
