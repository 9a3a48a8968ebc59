"""The HTML view of a Report: one self-contained file (inline CSS and SVG, no script, nothing
fetched from the network) that answers which layers, since when, why, and what to do.

Every value that comes from the run - layer names, messages, evidence, meta, numbers - goes
through :func:`_e`: control and bidi-override characters shown as ``?``, then HTML-escaped
(text and attributes alike). The figures' text is escaped by matplotlib's SVG writer.

    >>> from reludoctor.report.report import Report
    >>> page = render_html(Report(layers=[], windows=[], findings=[]))
    >>> "<h1>" in page and "no ReLU-family activation" in page
    True
"""

from __future__ import annotations

import json
import os
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from reludoctor.catalogue.remedies import REMEDY_CATALOGUE, describe
from reludoctor.diagnose.findings import Finding
from reludoctor.files import atomic_write_text
from reludoctor.report import plots
from reludoctor.text import counted, printable

if TYPE_CHECKING:
    from reludoctor.report.report import Report

#: Rows of the worst-layers table.
TABLE_LAYERS = 10
#: Layer names listed in the line of a folded group of findings.
GROUP_NAMES = 12

NO_WINDOWS = (
    "this run recorded no window of steps: watch at least one training step (call doc.step() "
    "after each) before making the report"
)

CSS = """
:root { --ink: #212529; --muted: #6c757d; --line: #dee2e6; --bad: #c2255c; --warn: #e67700;
        --good: #2b8a3e; --info: #1971c2; --code: #f8f9fa; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       margin: 0 auto; padding: 24px 28px 48px; max-width: 1080px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 8px; padding-top: 8px; border-top: 1px solid var(--line); }
h3 { font-size: 15px; margin: 16px 0 6px; }
p.lead, .muted { color: var(--muted); }
p.lead { margin: 0 0 16px; }
.status { padding: 12px 16px; border-radius: 6px; font-weight: 600; margin: 12px 0; }
.status.bad { background: #fff0f6; border-left: 5px solid var(--bad); }
.status.good { background: #ebfbee; border-left: 5px solid var(--good); }
table { border-collapse: collapse; width: 100%; font-size: 14px; margin: 8px 0; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line);
         vertical-align: top; }
th { font-weight: 600; background: #f1f3f5; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.name { word-break: break-all; }
tr.bad td { color: var(--bad); }
tr.warn td { color: var(--warn); }
.finding { margin: 8px 0; padding: 8px 12px; border-left: 4px solid var(--line);
           background: #fcfcfd; }
.finding.error { border-color: var(--bad); }
.finding.warning { border-color: var(--warn); }
p.warning { color: var(--warn); font-weight: 600; }
.finding.info { border-color: var(--info); }
.tag { display: inline-block; font-size: 12px; font-weight: 600; text-transform: uppercase;
       margin-right: 6px; }
.error .tag { color: var(--bad); } .warning .tag { color: var(--warn); }
.info .tag { color: var(--info); }
code, pre { font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
pre { background: var(--code); border: 1px solid var(--line); border-radius: 4px;
      padding: 8px 10px; white-space: pre-wrap; word-break: break-word; margin: 4px 0 12px; }
ol.remedies > li { margin-bottom: 6px; }
figure { margin: 8px 0 16px; }
figure svg { width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 13px; }
details { margin: 8px 0; }
details.more { margin: -4px 0 12px 16px; }
summary { cursor: pointer; font-weight: 600; }
.empty { color: var(--muted); font-style: italic; }
@media print {
  body { font-size: 11pt; max-width: none; padding: 0; }
  h2 { break-after: avoid; }
  figure, .finding, tr, pre { break-inside: avoid; }
  details { display: block; }
  details > * { display: block; }
}
"""


def _e(text: object) -> str:
    """``text`` safe inside HTML text or a quoted attribute, with nothing hidden in it."""
    return escape(printable(text, keep_newlines=True), quote=True)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def render_html(report: Report) -> str:
    """The whole report as one HTML document (a string)."""
    meta = report.meta
    title = f"reludoctor report: {meta.get('model', 'model')}"
    sections = [
        _header(report),
        _summary(report),
        _section(
            "dead-heatmap",
            "Dead units by layer over time",
            plots.dead_heatmap(report),
            "Each row a layer in model order, each column a window of steps; the darker, the "
            "larger the share of units that never fired in that window.",
            NO_WINDOWS,
        ),
        _section(
            "loss",
            "Loss, and when units died",
            plots.loss_curve(report),
            "Shaded: windows in which more units were dead than in the window before.",
            "no loss was recorded: pass loss= to doc.step()" if report.windows else NO_WINDOWS,
        ),
        _section(
            "units",
            "Units of the worst layers",
            plots.unit_grids(report.worst_layers(plots.PANELS)),
            "One cell per unit: alive, dormant (mean |output| at most "
            f"{meta.get('dormancy_threshold', 0.025)} of its layer's mean), or dead (never "
            "positive in the last window). Dormant counts include the dead units, here as in "
            "the layer table (ReDo's definition).",
            "no activation layer was seen",
        ),
        _section(
            "histograms",
            "Pre-activations of the worst layers",
            plots.preactivation_histograms(report.worst_layers(plots.PANELS)),
            "Share of values per bin on the first batch (grey) and at the latest sampled step "
            "(blue); the dashed line is 0: a unit whose values all lie left of it is dead.",
            "no pre-activation values were kept (no sampled step)",
        ),
        _section(
            "gradients",
            "Gradient norms by layer over time",
            plots.gradient_norms(report),
            "Norm of each layer's weight gradient, averaged over the sampled steps of a window.",
            "no gradient was measured (a scan, or no backward pass on sampled steps)"
            if report.windows
            else NO_WINDOWS,
        ),
        _details(report),
    ]
    body = "\n".join(section for section in sections if section)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n"
        "</body>\n</html>\n"
    )


def save_html(report: Report, path: str | os.PathLike[str]) -> Path:
    """Write :func:`render_html` to ``path`` atomically (a temporary file renamed into place)."""
    return atomic_write_text(path, render_html(report))


# -- sections -------------------------------------------------------------------------------
def _header(report: Report) -> str:
    meta = report.meta
    facts = [
        f"model {_e(meta.get('model', '?'))}",
        "ran under torch.compile" if meta.get("compiled") is True else None,
        _e(counted(meta["steps"], "step")) if isinstance(meta.get("steps"), int) else None,
        f"{counted(len(report.windows), 'window')} of {_e(counted(meta['window'], 'step'))}"
        if isinstance(meta.get("window"), int)
        else None,
        counted(len(report.layers), "activation layer"),
        f"created {_e(meta['created'])}" if "created" in meta else None,
    ]
    return (
        '<header id="top">\n<h1>reludoctor report</h1>\n'
        f'<p class="lead">{" · ".join(f for f in facts if f)}</p>\n</header>'
    )


def _summary(report: Report) -> str:
    parts = ['<section id="summary">', "<h2>Summary</h2>", _status(report)]
    if report.missing_ranks_note:
        parts.append(f'<p class="warning">{_e(report.missing_ranks_note)}</p>')
    if report.layers:
        parts.append(_worst_table(report))
    autopilot = report.autopilot_lines()
    if autopilot:
        parts.append("<h3>What the autopilot did</h3>")
        parts.append(
            '<ul class="autopilot">'
            + "".join(f"<li>{_e(line)}</li>" for line in autopilot)
            + "</ul>"
        )
    findings = report.sorted_findings()
    if findings:
        parts.append("<h3>Diagnosis</h3>")
        parts += [_finding_group(group) for group in _grouped(findings)]
    remedies = report.remedies() if not report.healthy else []
    if remedies:
        parts.append("<h3>What to do, best first</h3>")
        parts.append('<ol class="remedies">')
        for code in remedies:
            text = describe(code)
            remedy = REMEDY_CATALOGUE.get(code)
            snippet = remedy.code_change if remedy else None
            parts.append(
                f"<li><strong>{_e(text)}</strong> <code>{_e(code)}</code>"
                + (f"<pre><code>{_e(snippet)}</code></pre>" if snippet else "")
                + "</li>"
            )
        parts.append("</ol>")
    parts.append("</section>")
    return "\n".join(parts)


def _status(report: Report) -> str:
    errors = _e(", ".join(code.replace("_", " ") for code in report.error_codes()))
    if not report.layers and not report.healthy:
        return f'<p class="status bad">Unhealthy: {errors}; no layer could be watched.</p>'
    if not report.layers:
        return (
            '<p class="status good">no ReLU-family activation was seen: nothing to judge. '
            "Did the model run a forward pass while watched?</p>"
        )
    can_die = [layer for layer in report.layers if layer.can_die]
    dead = sum(layer.dead for layer in can_die)
    units = sum(layer.units for layer in can_die)
    hit = sum(1 for layer in can_die if layer.dead)
    counts = _e(
        f"{dead} of {units} units dead in {hit} of {len(can_die)} layers whose units can die"
    )
    if report.healthy:
        return f'<p class="status good">Healthy: no finding at error level ({counts}).</p>'
    causes = report.causes()
    why = f" Likely cause: {_e(causes[0].code.replace('_', ' '))}." if causes else ""
    return f'<p class="status bad">Unhealthy ({errors}): {counts}.{why}</p>'


def _worst_table(report: Report) -> str:
    rows = [
        "<table>",
        "<thead><tr><th>layer</th><th>kind</th><th class=num>units</th><th class=num>dead</th>"
        "<th class=num>dead %</th><th class=num>dead on first batch</th>"
        "<th class=num>dormant</th><th class=num>grad norm</th></tr></thead><tbody>",
    ]
    for layer in report.worst_layers(TABLE_LAYERS):
        css = ""
        if layer.can_die and layer.dead_fraction >= report.dead_error_fraction:
            css = ' class="bad"'
        elif layer.can_die and layer.dead:
            css = ' class="warn"'
        dormant = str(layer.dormant) if layer.fire_rate is not None else "-"
        dead = _e(layer.dead) + ("*" if layer.dead and not layer.can_die else "")
        rows.append(
            f"<tr{css}><td class=name>{_e(layer.name)}</td><td>{_e(layer.kind)}</td>"
            f"<td class=num>{_e(layer.units)}</td><td class=num>{dead}</td>"
            f"<td class=num>{_pct(layer.dead_fraction)}</td>"
            f"<td class=num>{_pct(layer.start_dead_fraction)}</td>"
            f"<td class=num>{dormant}</td><td class=num>{_num(layer.grad_norm)}</td></tr>"
        )
    rows.append("</tbody></table>")
    hidden = len(report.layers) - TABLE_LAYERS
    notes = []
    if hidden > 0:
        notes.append(
            f"{counted(hidden, 'more layer')} in the heatmap below and in the JSON report."
        )
    if any(layer.dead and not layer.can_die for layer in report.layers):
        notes.append(
            "* never positive, but this activation still passes a gradient below 0: stuck, "
            "not dead."
        )
    rows += [f'<p class="muted">{note}</p>' for note in notes]
    return "\n".join(rows)


def _grouped(findings: list[Finding]) -> list[list[Finding]]:
    """Findings of the same severity, kind and code, in order: one group each."""
    groups: dict[tuple[str, str, str], list[Finding]] = {}
    for finding in findings:
        groups.setdefault((finding.severity, finding.kind, finding.code), []).append(finding)
    return list(groups.values())


def _finding_group(group: list[Finding]) -> str:
    """The first finding in full; the others of its code folded beneath it."""
    first = _finding(group[0])
    if len(group) == 1:
        return first
    names = [f.layer for f in group[1:] if f.layer]
    layers = ", ".join(_e(name) for name in names[:GROUP_NAMES])
    if len(names) > GROUP_NAMES:
        layers += f" and {len(names) - GROUP_NAMES} more"
    rest = "\n".join(_finding(f) for f in group[1:])
    more = counted(len(group) - 1, f"more {group[0].code.replace('_', ' ')} finding")
    return f"{first}<details class=more><summary>{_e(more)}: {layers}</summary>{rest}</details>"


def _finding(finding: Finding) -> str:
    where = f" in <code>{_e(finding.layer)}</code>" if finding.layer else ""
    evidence = ""
    if finding.evidence:
        text = json.dumps(finding.evidence, indent=1, default=str)
        evidence = f"<details><summary>evidence</summary><pre>{_e(text)}</pre></details>"
    return (
        f'<div class="finding {_e(finding.severity)}"><span class="tag">{_e(finding.severity)} '
        f"{_e(finding.kind)}</span><strong>{_e(finding.code.replace('_', ' '))}</strong>{where}"
        f"<div>{_e(finding.message)}</div>{evidence}</div>"
    )


def _section(
    anchor: str,
    title: str,
    svg: str | None,
    caption: str,
    empty: str,
) -> str:
    body = (
        f"<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>"
        if svg
        else f'<p class="empty">{_e(empty)}</p>'
    )
    return f'<section id="{anchor}">\n<h2>{_e(title)}</h2>\n{body}\n</section>'


def _details(report: Report) -> str:
    parts = ['<section id="details">', "<h2>Details</h2>"]
    if report.unjudged:
        parts.append("<h3>Rules that could not decide</h3><ul>")
        parts += [f"<li><code>{_e(u.get('code'))}</code>: {_e(u.get('reason'))}</li>"
                  for u in report.unjudged]  # fmt: skip
        parts.append("</ul>")
    for title, data in (("Run", report.meta), ("What was read from model and data", report.facts)):
        if data:
            text = json.dumps(data, indent=1, default=str)
            parts.append(f"<details><summary>{_e(title)}</summary><pre>{_e(text)}</pre></details>")
    parts.append("</section>")
    return "\n".join(parts)
