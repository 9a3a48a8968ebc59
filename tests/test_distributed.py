"""torch.distributed: counters summed across ranks when a window closes (2 CPU processes,
gloo), rank 0 alone writes, and a rank that dies is named by the others."""

from __future__ import annotations

import json

import pytest
import torch.multiprocessing as mp
from distributed_worker import BATCH, ONLY_ON_RANK_1, PLANTED_DEAD, STEPS, free_port, train

from reludoctor.run import MANIFEST

pytestmark = pytest.mark.skipif(
    not __import__("torch").distributed.is_available(), reason="no torch.distributed"
)


def run(tmp_path, *, die_rank: int = -1, ddp: bool = True, compiled: bool = False) -> list[dict]:
    mp.start_processes(
        train,
        args=(2, free_port(), str(tmp_path), die_rank, ddp, compiled),
        nprocs=2,
        start_method="spawn",
        join=True,
    )
    ranks = [0, 1] if die_rank < 0 else [r for r in (0, 1) if r != die_rank]
    return [json.loads((tmp_path / f"report{r}.json").read_text()) for r in ranks]


def fc(report_or_window: dict) -> dict:
    [layer] = [lay for lay in report_or_window["layers"] if lay["name"].endswith("1")]
    return layer


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_unit_alive_on_any_rank_is_alive_and_only_rank_0_writes(tmp_path, compiled):
    rank0, rank1 = run(tmp_path, compiled=compiled)
    for report in (rank0, rank1):  # both ranks hold the combined counts
        assert report["meta"]["compiled"] is compiled
        assert "unwatched_activations" not in {f["code"] for f in report["findings"]}
        assert fc(report)["dead_units"] == [PLANTED_DEAD]
        assert fc(report)["name"] == "module.1"
        assert report["meta"]["ranks"] == {"world_size": 2, "rank": report["meta"]["ranks"]["rank"]}
        for window in report["windows"]:
            assert fc(window)["samples"] == 2 * BATCH * 5  # both ranks' samples
    assert ONLY_ON_RANK_1 not in fc(rank0)["dead_units"]
    assert [rank0["meta"]["ranks"]["rank"], rank1["meta"]["ranks"]["rank"]] == [0, 1]
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert len(events) == 1  # rank 1 wrote nothing


def test_a_rank_that_dies_is_named_and_the_others_finish(tmp_path, caplog):
    [rank0] = run(tmp_path, die_rank=1, ddp=False)
    ranks = rank0["meta"]["ranks"]
    assert ranks["missing"] == [1]
    assert ranks["missing_since_step"] == 10
    first, second = rank0["windows"]
    assert fc(first)["dead"] == 1  # combined: unit 0 fired on rank 1
    assert fc(second)["dead"] == 2  # rank 0's own: unit 0 never fires there
    assert fc(second)["samples"] == BATCH * 5
    assert rank0["meta"]["steps"] == STEPS


def test_the_missing_rank_is_said_in_the_console_and_the_html(tmp_path):
    from rich.console import Console

    from reludoctor.report.console import summary
    from reludoctor.report.report import Report

    ranks = {"world_size": 4, "rank": 0, "missing": [2, 3], "missing_since_step": 300}
    report = Report(layers=[], windows=[], findings=[], meta={"ranks": ranks})
    note = "the counts of rank(s) 2, 3 of 4 are missing from step 300 on"
    assert note in report.missing_ranks_note
    console = Console(record=True, width=200)
    console.print(summary(report))
    assert note in console.export_text()
    assert note in report.save_html(tmp_path / "r.html").read_text()
    report.meta["ranks"] = {"world_size": 4, "rank": 0}
    assert report.missing_ranks_note is None


DDP_SCRIPT = """
import torch, torch.distributed as dist
from torch import nn
from distributed_worker import BATCH, data, model

dist.init_process_group("gloo")
rank = dist.get_rank()
net = nn.parallel.DistributedDataParallel(model())
optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
for step in range(10):
    loss = net(data(rank, step)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
dist.destroy_process_group()
"""


def test_reludoctor_run_under_torchrun_combines_ranks_and_rank_0_writes(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        "-m",
        "reludoctor",
        "run",
        "--window",
        "5",
        "-q",
        "--out",
        str(tmp_path / "out"),
        str(script),
    ]
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == [MANIFEST, "Sequential.html", "Sequential.json"]  # by rank 0 alone
    report = json.loads((tmp_path / "out" / "Sequential.json").read_text())
    assert report["meta"]["wrapper"] == "DistributedDataParallel"
    assert fc(report)["dead_units"] == [PLANTED_DEAD]
    assert report["meta"]["ranks"]["world_size"] == 2
    assert fc(report["windows"][-1])["samples"] == 2 * BATCH * 5
