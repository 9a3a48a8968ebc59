"""Lightning: :class:`DoctorCallback` for ``L.Trainer(callbacks=[...])``.

The callback puts ``rd.watch`` on the LightningModule when fitting starts and counts each
training batch's whole ``training_step`` (so activations are seen however the step reaches
the network: ``self(x)``, ``self.net(x)`` or functional calls). A batch is a step; windows
close every ``window`` batches. At each window's end the scalars ``rd.watch`` writes to
TensorBoard (dead fraction, alive units and gradient norm of every layer, the dead fraction
over all layers whose units can die) are logged through the trainer's loggers (rank 0 only,
as Lightning logs), under ``reludoctor/``. Under the ``ddp`` strategies the ranks' counts
are combined as ``rd.watch`` does (see :mod:`reludoctor.probe.distributed`).

Needs the ``lightning`` package (``pip install reludoctor[lightning]``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from reludoctor.api.monitor import DEFAULT_SAMPLE_EVERY, DEFAULT_WINDOW, Monitor, watch
from reludoctor.diagnose.findings import Finding
from reludoctor.diagnose.summaries import Window
from reludoctor.diagnose.thresholds import Thresholds
from reludoctor.errors import InputError
from reludoctor.report.report import Report
from reludoctor.report.tensorboard import LayerTags, window_scalars

try:
    import lightning as L
except ImportError as error:  # pragma: no cover - the message is the point
    raise InputError(
        "reludoctor.lightning needs the lightning package: pip install reludoctor[lightning]"
    ) from error


class DoctorCallback(L.Callback):
    """Watch a ``Trainer.fit``; ``callback.report()`` gives the
    :class:`~reludoctor.report.report.Report`, and with ``report_dir`` rank 0 writes
    ``report.json`` and ``report.html`` there when fitting ends.

    Example:
        >>> import lightning as L, torch
        >>> from reludoctor.lightning import DoctorCallback
        >>> class Net(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                                        torch.nn.Linear(8, 1))
        ...     def training_step(self, batch, batch_idx):
        ...         return self.net(batch[0]).pow(2).mean()
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.01)
        >>> data = torch.utils.data.TensorDataset(torch.randn(64, 4))
        >>> doctor = DoctorCallback(window=2)
        >>> trainer = L.Trainer(max_epochs=1, callbacks=[doctor], logger=False,
        ...                     enable_progress_bar=False, enable_model_summary=False,
        ...                     enable_checkpointing=False, accelerator="cpu")
        >>> trainer.fit(Net(), torch.utils.data.DataLoader(data, batch_size=16))
        >>> doctor.report().layers[0].name
        'net.1'
    """

    def __init__(
        self,
        *,
        window: int = DEFAULT_WINDOW,
        sample_every: int = DEFAULT_SAMPLE_EVERY,
        thresholds: Thresholds | None = None,
        report_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        self.window = window
        self.sample_every = sample_every
        self.thresholds = thresholds
        self.report_dir = report_dir
        self.doc: Monitor | None = None
        self._tags = LayerTags()

    # -- fitting -----------------------------------------------------------------------------
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.doc = watch(
            pl_module,
            window=self.window,
            sample_every=self.sample_every,
            thresholds=self.thresholds,
            optimizer=optimizer,
        )
        if trainer.is_global_zero and trainer.loggers:  # only rank 0 logs
            self.doc.add_log(TrainerLoggers(trainer, self._tags))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        if self.doc is not None:  # the whole training step counts, however it runs the network
            self.doc.begin_counted_step(_first_tensor(batch))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.doc is None:
            return
        self.doc.end_counted_step()
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self.doc.step(loss=loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()
        if self.report_dir is not None and trainer.is_global_zero and self.doc is not None:
            report = self.report()
            os.makedirs(self.report_dir, exist_ok=True)
            report.save_json(os.path.join(self.report_dir, "report.json"))
            report.save_html(os.path.join(self.report_dir, "report.html"))

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.doc is not None and not self.doc.closed:
            self.doc.close()

    # -- results -----------------------------------------------------------------------------
    def report(self) -> Report:
        """The report so far (the last window and the open one, and the history)."""
        if self.doc is None:
            raise RuntimeError("DoctorCallback.report(): the trainer has not started fitting")
        return self.doc.report()


def _first_tensor(batch: Any) -> torch.Tensor | None:
    """The batch's inputs: the batch itself, its first element, or its first tensor value."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return _first_tensor(batch[0])
    if isinstance(batch, Mapping):
        return next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
    return None


class TrainerLoggers:
    """The trainer's loggers (TensorBoard, CSV, W&B ... as Lightning configures them) as a
    :class:`~reludoctor.report.sinks.RunLog`: each closed window's scalars under
    ``reludoctor/``, at the trainer's global step."""

    def __init__(self, trainer: Any, tags: LayerTags) -> None:
        self.trainer = trainer
        self.tags = tags

    def write_window(self, window: Window) -> None:
        scalars = window_scalars(window, self.tags)
        metrics = {f"reludoctor/{tag}": value for tag, value in scalars.items()}
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)

    def write_findings(self, findings: Sequence[Finding], step: int) -> None:
        """Lightning's loggers take numbers only: findings reach the console's log."""

    def close(self, report: Report | None = None) -> None:
        """The trainer closes its loggers itself."""
