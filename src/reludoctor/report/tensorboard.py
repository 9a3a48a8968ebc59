"""TensorBoard logging for a watched run (``rd.watch(model, log_dir=...)``).

At each window's end :class:`TensorBoardLog` writes, at global step ``window.end_step``:

- scalars ``dead_fraction/<layer>``, ``alive_units/<layer>``, ``grad_norm/<layer>`` (when
  measured), ``dead_fraction/all`` (over the layers whose units can die) and ``loss`` (the
  window's mean, when recorded and finite);
- histograms ``preactivation/<layer>`` and ``unit_gradient/<layer>`` (when sampled);
- text ``findings``: the warnings and errors first announced at that window's end.

On :meth:`TensorBoardLog.close` the full diagnosis goes to the text tag ``diagnosis``.
Nothing runs in the per-step path: the log is one of the tracker's ``on_window`` callbacks.
"""

from __future__ import annotations

import html
import math
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from reludoctor.catalogue.activations import can_die
from reludoctor.catalogue.remedies import describe
from reludoctor.diagnose.findings import Finding
from reludoctor.diagnose.summaries import Window
from reludoctor.errors import InputError
from reludoctor.report.report import Report

#: Characters kept in a layer's tag; any other becomes ``_``.
_UNSAFE_TAG_CHARACTERS = re.compile(r"[^A-Za-z0-9_.\-/]")
#: The layer part of ``dead_fraction/all``: no layer's tag may take it.
ALL_LAYERS = "all"


def layer_tag(name: str) -> str:
    """``name`` as a TensorBoard tag: characters outside ``[A-Za-z0-9_.-/]`` become ``_``.

    Example:
        >>> layer_tag("encoder/block 1:relu<x>")
        'encoder/block_1_relu_x_'
    """
    tag = _UNSAFE_TAG_CHARACTERS.sub("_", name).strip("/")
    return tag or "_"


class LayerTags:
    """Each layer's tag part: :func:`layer_tag`, made distinct per layer and never
    ``ALL_LAYERS`` (``_2``, ``_3`` ... appended)."""

    def __init__(self) -> None:
        #: Each layer's name and its tag part.
        self.tags: dict[str, str] = {}

    def __call__(self, layer: str) -> str:
        if layer not in self.tags:
            taken = {*self.tags.values(), ALL_LAYERS}
            base = tag = layer_tag(layer)
            suffix = 1
            while tag in taken:
                suffix += 1
                tag = f"{base}_{suffix}"
            self.tags[layer] = tag
        return self.tags[layer]


def window_scalars(window: Window, tags: LayerTags) -> dict[str, float]:
    """A closed window's scalars by tag: per layer ``dead_fraction/<tag>``,
    ``alive_units/<tag>`` and ``grad_norm/<tag>`` (when measured), and ``dead_fraction/all``
    over the layers whose units can die. Shared by TensorBoard and Lightning's loggers."""
    scalars: dict[str, float] = {}
    can_die_units = can_die_dead = 0
    for layer in window.layers:
        tag = tags(layer.name)
        scalars[f"dead_fraction/{tag}"] = layer.dead_fraction
        scalars[f"alive_units/{tag}"] = float(layer.units - layer.dead)
        if layer.grad_norm is not None:
            scalars[f"grad_norm/{tag}"] = layer.grad_norm
        if can_die(layer.kind):
            can_die_units += layer.units
            can_die_dead += layer.dead
    if can_die_units:
        scalars[f"dead_fraction/{ALL_LAYERS}"] = can_die_dead / can_die_units
    return scalars


def findings_markdown(findings: Iterable[Finding]) -> str:
    """Findings as a Markdown list: severity, code, layer, message and remedies of each.

    Example:
        >>> f = Finding("symptom", "dead_units", "error", "fc1", "60% dead", remedies=("elu",))
        >>> print(findings_markdown([f]))
        - **error** `dead_units` in layer `fc1`: 60% dead
          Remedies: use ELU (`elu`).
    """
    items = []
    for finding in findings:
        where = f" in layer {_code(finding.layer)}" if finding.layer is not None else ""
        item = f"- **{finding.severity}** {_code(finding.code)}{where}: {_text(finding.message)}"
        if finding.remedies:
            remedies = "; ".join(
                f"{_text(describe(code))} ({_code(code)})" for code in finding.remedies
            )
            item += f"\n  Remedies: {remedies}."
        items.append(item)
    return "\n".join(items)


def diagnosis_markdown(report: Report) -> str:
    """The report's diagnosis in Markdown: a verdict line, then every finding, worst first."""
    findings = report.sorted_findings()
    counts = [
        f"{n} {severity}{'s' if n > 1 else ''}"
        for severity in ("error", "warning", "info")
        if (n := sum(f.severity == severity for f in findings))
    ]
    verdict = "healthy" if report.healthy else "unhealthy"
    head = f"**Diagnosis: {verdict}** ({', '.join(counts) or 'no findings'})"
    text = f"{head}\n\n{findings_markdown(findings)}" if findings else head
    autopilot = report.autopilot_lines()
    if autopilot:
        text += "\n\n**Autopilot**\n\n" + "\n".join(f"- {_text(line)}" for line in autopilot)
    return text


def _code(text: str) -> str:
    """``text`` as a Markdown code span, whatever backticks it holds."""
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if "`" in text else f"{fence}{text}{fence}"


def _text(text: str) -> str:
    """Plain text kept literal in TensorBoard's Markdown (which drops HTML tags)."""
    return html.escape(text, quote=False)


def _writable_directory(log_dir: str | os.PathLike[str]) -> Path:
    """``log_dir`` as a directory this process can write to (made if missing)."""
    if not isinstance(log_dir, (str, os.PathLike)):
        raise TypeError(f"log_dir must be a path (str or os.PathLike), got {log_dir!r}")
    path = Path(log_dir)
    if path.exists() and not path.is_dir():
        raise InputError(
            f"log_dir {str(path)!r} is a file, not a directory: pass the path of a directory "
            "for the TensorBoard logs (it is created if missing)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise InputError(
            f"cannot write TensorBoard logs to log_dir {str(path)!r} "
            f"({error.strerror or error}): pass a directory you can write to"
        ) from error
    return path


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError(
            "rd.watch(log_dir=...) writes TensorBoard logs and needs the tensorboard package: "
            f"pip install tensorboard ({error})"
        ) from error
    return SummaryWriter


def _text_summary(tag: str, markdown: str) -> Any:
    from tensorboard.plugins.text.summary_v2 import text_pb

    return text_pb(tag, markdown)


class TensorBoardLog:
    """Writes a watched run to a TensorBoard log directory, at each window's end.

    Call it with each closed window (``rd.watch(log_dir=...)`` does): it reads the window
    only, histograms included. Then ``tensorboard --logdir <log_dir>`` shows it.

    Example:
        >>> import tempfile, torch, reludoctor as rd
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> with tempfile.TemporaryDirectory() as log_dir:
        ...     with rd.watch(model, window=2, log_dir=log_dir) as doc:
        ...         for _ in range(4):
        ...             loss = model(torch.randn(16, 4)).sum()
        ...             loss.backward()
        ...             _ = doc.step(loss=loss)
        ...     doc.tensorboard.tags
        {'1': '1'}
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        summary_writer = _summary_writer_class()
        self.log_dir = _writable_directory(log_dir)
        self.tag = LayerTags()  # the tag part each layer is written under
        self._writer: Any = summary_writer(log_dir=str(self.log_dir))

    @property
    def closed(self) -> bool:
        return self._writer is None

    @property
    def tags(self) -> dict[str, str]:
        """Each layer's name and the tag part it is written under (distinct per layer)."""
        return self.tag.tags

    def write_window(self, window: Window) -> None:
        """Write one closed window's scalars and histograms at step ``window.end_step``."""
        if self._writer is None:
            return
        writer, step = self._writer, window.end_step
        for tag, value in window_scalars(window, self.tag).items():
            writer.add_scalar(tag, value, step)
        for layer in window.layers:
            tag = self.tag(layer.name)
            self._histogram(f"preactivation/{tag}", layer.preactivation_values, step)
            self._histogram(f"unit_gradient/{tag}", layer.unit_gradients, step)
        if window.loss_mean is not None and math.isfinite(window.loss_mean):
            writer.add_scalar("loss", window.loss_mean, step)
        writer.flush()

    def _histogram(self, tag: str, values: np.ndarray | None, step: int) -> None:
        if values is None:
            return
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        values = values[np.isfinite(values)]
        if values.size:
            self._writer.add_histogram(tag, values, step)

    def write_text(self, tag: str, markdown: str, step: int) -> None:
        """Write Markdown text under ``tag`` (TensorBoard's Text tab) at ``step``."""
        if self._writer is None:
            return
        self._writer.file_writer.add_summary(_text_summary(tag, markdown), step)
        self._writer.flush()

    def write_findings(self, findings: Iterable[Finding], step: int) -> None:
        """Write findings (see :func:`findings_markdown`) to the ``findings`` tag at ``step``."""
        findings = list(findings)
        if findings:
            self.write_text("findings", findings_markdown(findings), step)

    def close(self, report: Report | None = None) -> None:
        """Write ``report``'s diagnosis to the ``diagnosis`` tag, then flush and close.

        The diagnosis goes at the report's last step. Closing again does nothing.
        """
        if self._writer is None:
            return
        if report is not None:
            step = report.windows[-1].end_step if report.windows else 0
            self.write_text("diagnosis", diagnosis_markdown(report), step)
        writer, self._writer = self._writer, None
        writer.close()
