"""Worker processes for tests/test_distributed.py (spawned: importable by module name)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import reludoctor as rd

STEPS, WINDOW, BATCH = 10, 5, 16
#: fc unit 0 fires only on inputs whose feature 0 exceeds 0.5: only rank 1's data have them.
ONLY_ON_RANK_1, PLANTED_DEAD = 0, 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        weight = torch.zeros(8, 4)
        weight[torch.arange(4), torch.arange(4)] = 1.0
        weight[4:] = 1.0
        bias = torch.tensor([-0.5, -0.5, -0.5, -1e4, 0.1, 0.1, 0.1, 0.1])
        bias[1:3] = -0.1  # units 1 and 2 fire on both ranks' data
        net[0].weight.copy_(weight)
        net[0].bias.copy_(bias)
    return net


def data(rank: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * rank + step)
    x = torch.rand(BATCH, 4, generator=generator) * 0.4  # feature 0 below 0.5 ...
    if rank == 1:
        x[:, 0] += 0.4  # ... except on rank 1, where it reaches 0.8
    return x


def train(
    rank: int, world_size: int, port: int, out: str, die_rank: int, ddp: bool, compiled: bool
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    net = model()
    trained: nn.Module = nn.parallel.DistributedDataParallel(net) if ddp else net
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.0)  # the weights stay as planted
    out_dir = Path(out)
    # rank 0 alone imports tensorboard (seconds on a loaded machine) in rd.watch: the ranks
    # start training together, and the timeout leaves a margin for the rest of the skew
    timeout = 10.0
    with rd.watch(trained, window=WINDOW, log_dir=out_dir / "tb", rank_timeout=timeout) as doc:
        call = torch.compile(trained, backend="aot_eager") if compiled else trained
        dist.barrier()
        for step in range(STEPS):
            if rank == die_rank and step == WINDOW + 2:
                os._exit(0)  # dies mid-run, after the first window
            loss = call(data(rank, step)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            doc.step(loss=loss)
    report = doc.report().to_dict()
    (out_dir / f"report{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()
