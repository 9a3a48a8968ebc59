"""The console view of a Report: worst layers first, then the findings.

Text that came from outside (layer names, activation kinds, finding codes and messages) is
passed as :class:`~rich.text.Text` of :func:`~reludoctor.text.printable` text: no escape
sequence reaches the terminal and no markup is read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from reludoctor.catalogue.remedies import REMEDY_CATALOGUE, describe
from reludoctor.report.report import Report
from reludoctor.text import markup_safe, printable

if TYPE_CHECKING:
    from reludoctor.api.treat import Treatment
    from reludoctor.study import StudyResult

#: Consoles at least this wide get the study table's R^2 and diagnosis columns.
STUDY_WIDE = 110

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _percent(value: float) -> str:
    return f"{value:.0%}" if value else "0%"


def summary(report: Report, max_layers: int = 10) -> Group:
    """A renderable summary: a table of the worst layers and the findings, worst first."""
    parts: list[object] = []
    verdict = (
        Text("healthy: no finding at error level", style="bold green")
        if report.healthy
        else Text(
            f"unhealthy: {printable(', '.join(report.error_codes()))} at error level",
            style="bold red",
        )
    )
    parts.append(verdict)
    if report.missing_ranks_note:
        parts.append(Text(printable(report.missing_ranks_note), style="bold yellow"))
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
    stuck_shown = False
    for layer in report.worst_layers(max_layers):
        error = layer.dead_fraction >= report.dead_error_fraction
        style = "red" if error else ("yellow" if layer.dead else "")
        dead = str(layer.dead)
        if not layer.can_die:
            style, dead = "", f"{layer.dead}*" if layer.dead else dead
            stuck_shown = stuck_shown or bool(layer.dead)
        table.add_row(
            Text(printable(layer.name)),
            Text(printable(layer.kind)),
            str(layer.units),
            dead,
            _percent(layer.dead_fraction),
            str(layer.dormant) if layer.fire_rate is not None else "-",
            f"{layer.grad_norm:.3g}" if layer.grad_norm is not None else "-",
            style=style,
        )
    parts.append(table)
    if stuck_shown:
        parts.append(
            Text(
                "* never positive, but this activation still passes a gradient below 0: "
                "stuck, not dead",
                style="dim",
            )
        )
    hidden = len(report.layers) - max_layers
    if hidden > 0:
        parts.append(Text(f"... and {hidden} more layers (see the JSON report)", style="dim"))
    autopilot = report.autopilot_lines()
    if autopilot:
        parts.append(Text("Autopilot", style="bold"))
        parts += [Text(f"  {line}") for line in autopilot]
    findings = report.sorted_findings()
    if findings:
        parts.append(Text("Findings", style="bold"))
        for finding in findings:
            line = Text("  ")
            line.append(f"{finding.severity:7s} ", style=SEVERITY_STYLE[finding.severity])
            line.append(f"{printable(finding.code)}: ")
            line.append(printable(finding.message))
            parts.append(line)
        remedies = [code for code in findings[0].remedies if code in REMEDY_CATALOGUE]
        if remedies:
            parts.append(Text("What to try", style="bold"))
            for code in remedies:
                parts.append(Text(f"  - {describe(code)} ({code})"))
    return Group(*parts)


def print_summary(report: Report, console: Console | None = None, max_layers: int = 10) -> None:
    """Print :func:`summary` to ``console`` (standard output by default)."""
    (console or Console()).print(summary(report, max_layers=max_layers))


def study_table(result: StudyResult, wide: bool = True) -> Table:
    """The study's grid as a table: measurements, reludoctor's diagnosis (``wide`` only, with
    R^2), the verdict (``*`` where it contradicts the article) and the article's claim."""
    table = Table(
        title=f"Is ReLU Dead? on its data: {result.samples} samples, {result.epochs} epochs, "
        f"{result.seeds} seed(s) per variant",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    columns = ["train", "val", "R^2", "dead", "grad L1", "diagnosis", "verdict", "article"]
    if result.treat_steps:
        columns.append("treatment")
    if not wide:
        columns = [c for c in columns if c not in ("R^2", "diagnosis")]
    table.add_column("variant")
    for column in columns:
        numeric = column in ("train", "val", "R^2", "dead", "grad L1")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=numeric)
    for o in result.outcomes:
        cells = {
            "train": f"{o.train_loss:.3g}",
            "val": f"{o.val_loss:.3g}",
            "R^2": f"{o.r2:.2f}",
            "dead": _percent(o.dead_fraction) if o.dead_fraction is not None else "-",
            "grad L1": f"{o.first_layer_grad:.2g}",
            "diagnosis": " ".join(code.replace("_", " ") for code in o.causes) or "-",
            "verdict": o.verdict + (" *" if o.agrees is False else ""),
            "article": o.article or "-",
            "treatment": o.treatment["verdict"] if o.treatment else "-",
        }
        table.add_row(Text(o.label), *(cells[c] for c in columns))
    return table


def print_study(result: StudyResult, console: Console | None = None, quiet: bool = False) -> None:
    """Print the study's table and, unless ``quiet``, where it disagrees with the article."""
    console = console or Console()
    console.print(study_table(result, wide=console.width >= STUDY_WIDE))
    if quiet:
        return
    console.print(Text(result.legend(), style="dim"))
    disagreements = result.disagreements()
    if disagreements:
        console.print(Text("* Where the measurement disagrees with the article", style="bold"))
        for line in disagreements:
            console.print(Text(f"  - {line}"))


def treatment_table(treatment: Treatment) -> Table:
    """Each remedy tried against the untreated copy: loss reached, alive share, worst layer."""
    table = Table(
        title=f"Treatment: each remedy on a copy, {treatment.steps} steps",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in ("remedy", "loss", "change", "alive", "worst layer dead"):
        table.add_column(column, justify="left" if column == "remedy" else "right")

    def share(value: float | None) -> str:
        return "-" if value is None else _percent(value)

    table.add_row(
        "untreated",
        f"{treatment.untreated_loss:.4g}",
        "",
        share(treatment.untreated_alive_fraction),
        "",
    )
    winner = treatment.winner
    for trial in treatment.trials:
        name = trial.label
        if trial.error is not None:
            table.add_row(
                Text(printable(name)), "-", Text(printable(trial.error)), "", "", style="dim"
            )
            continue
        loss = "nan" if trial.loss is None else f"{trial.loss:.4g}"
        change = "-" if trial.improvement is None else f"{-trial.improvement:+.0%}"
        table.add_row(
            Text(printable(name) + (" *" if trial is winner else "")),
            loss,
            change,
            share(trial.alive_fraction),
            share(trial.worst_dead_fraction),
            style="bold green" if trial is winner else "",
        )
    return table


def print_treatment(treatment: Treatment, console: Console | None = None) -> None:
    """Print the treatment table and which remedy won (or that none did)."""
    console = console or Console()
    console.print(treatment_table(treatment))
    winner = treatment.winner
    if winner is None:
        console.print("no remedy lowered the loss: nothing to recommend")
    else:
        console.print(
            f"* recommended: {markup_safe(winner.remedy)} - "
            f"{markup_safe(describe(winner.remedy))} "
            f"(loss {-(winner.improvement or 0):+.0%} against the untreated copy)"
        )
    if treatment.not_tried:
        console.print(
            Text(
                "not tried (they need changes to your data or code): "
                + printable(", ".join(treatment.not_tried)),
                style="dim",
            )
        )
