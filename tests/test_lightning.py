"""reludoctor.lightning.DoctorCallback in a real Trainer.fit on CPU, alone and under ddp."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")

from reludoctor.lightning import DoctorCallback  # noqa: E402

DEAD = [1, 6]


class FunctionalNet(L.LightningModule):
    """The network runs through ``self.body`` and F.relu, never ``self(x)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 10), nn.ReLU())
        self.hidden = nn.Linear(10, 8)
        self.head = nn.Linear(8, 1)
        with torch.no_grad():
            for layer in (self.body[0], self.hidden):
                layer.weight.abs_()
                layer.bias.fill_(0.1)
            self.body[0].bias[DEAD] = -1e4
            self.hidden.bias[DEAD] = -1e4

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.head(nn.functional.relu(self.hidden(self.body(x))))
        return {"loss": (out - y).pow(2).mean()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-4)


def loader(n: int = 320, batch: int = 32):
    x = torch.rand(n, 5)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, True)), batch)


def test_a_real_fit_is_watched_and_logged_through_the_trainers_logger(tmp_path):
    doctor = DoctorCallback(window=5, report_dir=tmp_path / "report")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        callbacks=[doctor],
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(FunctionalNet(), loader())
    report = doctor.report()
    assert {layer.name: layer.dead_units for layer in report.layers} == {
        "body.1": DEAD,
        "hidden:relu": DEAD,
    }
    assert report.meta["steps"] == 20
    assert [w.end_step for w in report.windows] == [5, 10, 15, 20]
    assert all(w.loss_mean is not None for w in report.windows)
    assert report.facts["optimizer"]["type"] == "SGD"
    assert report.facts["inputs"]["features"] == 5  # the batches' inputs were read
    with open(next((tmp_path / "logs").rglob("metrics.csv"))) as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("reludoctor/dead_fraction/all")]
    assert [int(row["step"]) for row in rows] == [5, 10, 15, 20]  # global_step at each window
    assert float(rows[-1]["reludoctor/dead_fraction/body.1"]) == pytest.approx(0.2)
    assert float(rows[-1]["reludoctor/alive_units/hidden_relu"]) == 6
    assert any(row.get("reludoctor/grad_norm/body.1") for row in rows)  # as TensorBoard has
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["layers"][0]["dead_units"] == DEAD
    assert doctor.doc.closed  # hooks removed when fitting ended


def test_an_exception_in_training_removes_the_hooks(tmp_path):
    class Failing(FunctionalNet):
        def training_step(self, batch, batch_idx):
            if batch_idx == 3:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    doctor = DoctorCallback(window=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        callbacks=[doctor],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, loader())
    assert doctor.doc.closed
    assert doctor.report().meta["steps"] == 3
    assert "forward" not in vars(model)  # the watched forward is gone


def test_the_ddp_strategy_with_2_processes_combines_the_ranks(tmp_path):
    script = Path(__file__).parent / "lightning_ddp_script.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    [fc] = [layer for layer in report["layers"] if layer["name"] == "net.1"]
    assert fc["dead_units"] == [3]  # unit 0 fires on rank 1 only: alive; unit 3 is planted
    assert report["meta"]["ranks"]["world_size"] == 2
    assert report["windows"][-1]["layers"][0]["samples"] == 2 * 16 * 5
