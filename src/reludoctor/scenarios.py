"""The experiments of the brief, as small reusable objects (demo, study and tests share them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import reludoctor
from reludoctor.report.model import Report


class OneLayerReLU(nn.Module):
    """A single dense unit (or layer) followed by a ReLU, as in "Is ReLU Dead?"."""

    def __init__(self, in_features: int = 4, out_features: int = 1) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.dense(x))


@dataclass
class RunResult:
    """What a scenario run produced: per-epoch losses and, when watched, the report."""

    model: nn.Module
    train_loss: list[float]
    val_loss: list[float]
    report: Report | None = None


@dataclass
class IsReluDead:
    """E1, after seed 001: inputs uniform in (-1, 0), one dense layer with a ReLU.

    The article shows its code only as images and never states the target; here the target
    is a fixed linear function of x that a live ReLU could fit, ``y = -x @ [1, 2, 3, 4] +
    noise`` (positive, because x is negative). The weights start random but positive,
    uniform in (0, 1), the bias at zero - so every pre-activation ``w @ x`` is negative,
    the unit outputs 0 for every input, gets no gradient, and train and validation loss stay
    flat for all epochs, as the article observed.
    """

    samples: int = 200_000
    epochs: int = 25
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    train_fraction: float = 0.7
    name: str = "E1 Is ReLU Dead? (inputs uniform in (-1, 0), one ReLU layer)"
    data: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def make_data(self) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        x = -torch.rand(self.samples, 4, generator=generator)
        true_weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
        y = -(x @ true_weights) + 0.1 * torch.randn(self.samples, generator=generator)
        split = int(self.samples * self.train_fraction)
        return {
            "x_train": x[:split],
            "y_train": y[:split, None],
            "x_val": x[split:],
            "y_val": y[split:, None],
        }

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        model = OneLayerReLU()
        with torch.no_grad():
            model.dense.weight.uniform_(0.0, 1.0)
            model.dense.bias.zero_()
        return model

    def run(
        self,
        *,
        watch: bool = True,
        window: int = 100,
        on_epoch: Callable[[int, float, float], None] | None = None,
    ) -> RunResult:
        """Train for ``epochs``; with ``watch`` the monitor is on and a report comes back."""
        data = self.data or self.make_data()
        model = self.build_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr)
        doc = reludoctor.watch(model, window=window) if watch else None
        generator = torch.Generator().manual_seed(self.seed + 1)
        train_losses, val_losses = [], []
        try:
            for epoch in range(self.epochs):
                order = torch.randperm(len(data["x_train"]), generator=generator)
                total, count = 0.0, 0
                for batch in order.split(self.batch_size):
                    x, y = data["x_train"][batch], data["y_train"][batch]
                    loss = F.mse_loss(model(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    if doc is not None:
                        doc.step(loss=loss)
                    total += float(loss.detach()) * len(batch)
                    count += len(batch)
                model.eval()
                with torch.no_grad():
                    val = float(F.mse_loss(model(data["x_val"]), data["y_val"]))
                model.train()
                train_losses.append(total / count)
                val_losses.append(val)
                if on_epoch is not None:
                    on_epoch(epoch, total / count, val)
            report = doc.report() if doc is not None else None
        finally:
            if doc is not None:
                doc.close()
        if report is not None:
            report.meta.update(
                {"scenario": self.name, "train_loss": train_losses, "val_loss": val_losses}
            )
        return RunResult(model, train_losses, val_losses, report)
