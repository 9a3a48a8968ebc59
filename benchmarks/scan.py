"""Throughput and peak memory of ``rd.scan`` on a big model, against plain inference.

The model is a residual MLP of ``--blocks`` blocks, each Linear(width, hidden) -> ReLU ->
Linear(hidden, width) with a skip: by default 256 ReLU layers and 1,048,576 units (537M
parameters). Rounds alternate plain inference (eval mode, ``no_grad``) over the same batches
and ``rd.scan`` over them (report included), so machine noise hits both alike. Prints the
median throughput ratio (plain time / scan time; target >= 0.9) with its interquartile range;
the scan's fixed cost (reading the weights' facts, building the report: a scan of one batch
less plain inference of it) and the ratio per batch once that is paid; and the extra peak
memory the scan needs beyond plain inference (host RSS on the CPU, allocated bytes on a GPU)
against the size of reludoctor's per-unit counters and of the report's Python objects.

Whole-scan rounds last seconds, and on a shared machine the speed drifts between one round and
the next. So the per-batch cost is also measured interleaved: the model watched as ``rd.scan``
watches it (eval forwards counted, every batch sampled), each batch run by it and then by an
unwatched shallow copy sharing its parameters. With the fixed cost, that gives a second
estimate of the scan's throughput ratio, less exposed to the drift.

    python benchmarks/scan.py [--blocks 256] [--width 256] [--hidden 4096] [--batch 64]
                              [--batches 32] [--rounds 5] [--threads N] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
import tracemalloc

import torch
from torch import nn

import reludoctor as rd
from reludoctor.probe.counters import COUNTERS


class Block(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.act = nn.ReLU()
        self.down = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(x)))


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain(model: nn.Module, batches: list[torch.Tensor]) -> float:
    sync(batches[0].device)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    sync(batches[0].device)
    return time.perf_counter() - start


def scanned(model: nn.Module, batches: list[torch.Tensor]) -> tuple[float, rd.Report]:
    sync(batches[0].device)
    start = time.perf_counter()
    report = rd.scan(model, batches)
    sync(batches[0].device)
    return time.perf_counter() - start, report


def interleaved(
    model: nn.Module, batches: list[torch.Tensor], rounds: int
) -> tuple[list[float], float]:
    """Per-round ratios of plain to watched time, each batch run by an unwatched shallow
    copy of ``model`` (same parameters) and by ``model`` watched as ``rd.scan`` does; and
    plain inference's seconds per batch."""
    twin = copy.copy(model)  # made before watching: its forward stays the plain one
    ratios, plain_seconds = [], []
    with torch.no_grad(), rd.watch(model, window=sys.maxsize, sample_every=1, count_eval=True):
        model(batches[0])  # the first call sets each layer up: part of the fixed cost
        for _ in range(rounds):
            base = watched = 0.0
            for batch in batches:
                sync(batch.device)
                start = time.perf_counter()
                twin(batch)
                sync(batch.device)
                middle = time.perf_counter()
                model(batch)
                sync(batch.device)
                base += middle - start
                watched += time.perf_counter() - middle
            ratios.append(base / watched)
            plain_seconds.append(base / len(batches))
    return ratios, statistics.median(plain_seconds)


def report_bytes(model: nn.Module, batch: torch.Tensor) -> int:
    """Bytes of Python objects a scan's report keeps (its per-unit lists)."""
    tracemalloc.start()
    try:
        report = rd.scan(model, [batch])
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del report
    return kept


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return median, q1, q3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    with torch.device(device):
        model = nn.Sequential(*(Block(args.width, args.hidden) for _ in range(args.blocks)))
    model.eval()
    batches = [torch.randn(args.batch, args.width, device=device) for _ in range(args.batches)]
    units = args.blocks * args.hidden
    params = sum(p.numel() for p in model.parameters())

    plain(model, batches[:1])  # warm up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    plain(model, batches)
    plain_peak = peak_bytes(device)
    _, report = scanned(model, batches)
    scan_peak = peak_bytes(device)
    ratios, fixed, per_batch = [], [], []
    for _ in range(args.rounds):
        base = plain(model, batches)
        seconds, report = scanned(model, batches)
        ratios.append(base / seconds)
        one = scanned(model, batches[:1])[0] - plain(model, batches[:1])
        fixed.append(one)
        per_batch.append(base / max(seconds - one, 1e-9))
    counter_bytes = units * sum(c.dtype.itemsize for c in COUNTERS if c.per_unit)
    paired, plain_batch = interleaved(model, batches, args.rounds)
    fixed_cost = statistics.median(fixed)
    plain_run = plain_batch * len(batches)
    estimates = [plain_run / (plain_run / r + fixed_cost) for r in paired]
    kept = report_bytes(model, batches[0])

    layers = len(report.layers)
    print(
        f"residual MLP on {device}: {args.blocks} blocks {args.width}-{args.hidden}-{args.width},"
        f" {layers} ReLU layers, {units:,} units, {params / 1e6:.0f}M parameters; "
        f"{args.batches} batches of {args.batch}; {args.rounds} rounds; "
        f"{torch.get_num_threads()} CPU thread(s)"
    )
    print("                              median    q1      q3")
    print("throughput scan / plain       {:.3f}   {:.3f}   {:.3f}".format(*quartiles(ratios)))
    print("  per batch, fixed cost paid  {:.3f}   {:.3f}   {:.3f}".format(*quartiles(per_batch)))
    print("  fixed cost (s)              {:.3f}   {:.3f}   {:.3f}".format(*quartiles(fixed)))
    print("per batch, interleaved        {:.3f}   {:.3f}   {:.3f}".format(*quartiles(paired)))
    print("  with the fixed cost         {:.3f}   {:.3f}   {:.3f}".format(*quartiles(estimates)))
    print(f"plain inference {base:.2f} s, scan {seconds:.2f} s (last round)")
    extra = max(scan_peak - plain_peak, 0)
    print(
        f"peak memory: plain {plain_peak / 2**20:.0f} MiB, with scan {scan_peak / 2**20:.0f} MiB "
        f"(+{extra / 2**20:.0f} MiB, {extra / units:.0f} bytes a unit; per-unit counters "
        f"{counter_bytes / 2**20:.0f} MiB, the report's Python objects {kept / 2**20:.0f} MiB)"
    )
    for name, values in (("whole scans", ratios), ("interleaved", estimates)):
        verdict = "met" if statistics.median(values) >= 0.9 else "NOT met"
        print(f"target scan / plain >= 0.9 ({name}): {verdict}")


if __name__ == "__main__":
    main()
