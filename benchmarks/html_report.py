"""Time to write the HTML report of a big run: 100 activation layers x 100 windows.

The report is built from a real watched run of a 100-layer MLP (so every field is filled as
in use), then written as HTML and, for scale, as JSON, several times each. Prints the median
seconds of each and the ratio HTML / JSON. Target: HTML under 5 s.

    python benchmarks/html_report.py [--layers 100] [--windows 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import reludoctor as rd
from reludoctor.api.monitor import silenced_live_findings
from reludoctor.report.report import Report


def watched_run(layers: int, windows: int) -> Report:
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(32, 32), nn.ReLU()]
    model = nn.Sequential(*blocks, nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(64, 32)
    with silenced_live_findings(), rd.watch(model, optimizer=opt, window=2, sample_every=1) as doc:
        for _ in range(2 * windows):
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            doc.step(loss=loss)
    return doc.report()


def median_seconds(write, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        write()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--windows", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    report = watched_run(args.layers, args.windows)
    print(f"report: {len(report.layers)} layers, {len(report.windows)} windows")
    with tempfile.TemporaryDirectory() as folder:
        html = Path(folder) / "report.html"
        first = median_seconds(lambda: report.save_html(html), 1)  # imports matplotlib
        html_s = median_seconds(lambda: report.save_html(html), args.repeats)
        json_s = median_seconds(lambda: report.save_json(Path(folder) / "r.json"), args.repeats)
        size = html.stat().st_size
    print(
        f"html: first write {first:.2f} s (with imports), then median {html_s:.2f} s, "
        f"{size / 1e6:.2f} MB"
    )
    print(f"json: median {json_s:.3f} s; html / json = {html_s / json_s:.1f}x")
    print(f"target html < 5 s: {'met' if first < 5 else 'NOT met'}")


if __name__ == "__main__":
    main()
