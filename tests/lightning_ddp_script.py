"""A Lightning fit under the ddp strategy, 2 CPU processes, for tests/test_lightning.py.

Run as ``python lightning_ddp_script.py OUT``: Lightning starts rank 1 by running it again.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from distributed_worker import BATCH, data, model

from reludoctor.lightning import DoctorCallback


class Planted(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = model()

    def training_step(self, batch, batch_idx):
        x = data(self.global_rank, batch_idx)  # each rank its own data
        return self.net(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


if __name__ == "__main__":
    out = sys.argv[1]
    doctor = DoctorCallback(window=5, report_dir=out)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=10,
        callbacks=[doctor],
        logger=L.pytorch.loggers.CSVLogger(out, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    steps = torch.utils.data.TensorDataset(torch.zeros(10 * BATCH, 1))
    trainer.fit(Planted(), torch.utils.data.DataLoader(steps, batch_size=BATCH))
