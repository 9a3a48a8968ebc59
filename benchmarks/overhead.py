"""Overhead of ``rd.watch`` on training steps, as a ratio against unwatched steps.

Two identical copies of each workload train side by side in one process; blocks of steps
alternate between the watched and the plain copy, so machine noise hits both alike. For each
workload it prints the median ratio (watched / plain) and its spread (interquartile range),
and the same for two plain copies (the control: what the set-up alone shows).

Each workload runs uncompiled and under ``torch.compile`` (inductor): the compiled rows compare
a compiled watched copy (watched, then compiled) with a compiled plain one.

    python benchmarks/overhead.py [--rounds 30] [--block 20] [--threads 2] [--device cpu]
                                  [--only W1 ...] [--sample-every N] [--modes eager compiled]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import reludoctor as rd


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 5 * 5, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def deep_mlp() -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(256, 256), nn.ReLU()]
    for _ in range(19):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10))


WORKLOADS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "W1 mlp 784-128-64-10, batch 128": (mlp, (1, 28, 28), 128),
    "W2 cnn conv32-conv64-fc128, batch 64": (cnn, (1, 28, 28), 64),
    "W3 mlp 20x256, batch 256": (deep_mlp, (256,), 256),
}


def run_block(model, opt, x, y, steps, doc=None) -> float:  # type: ignore[no-untyped-def]
    loss_fn = nn.functional.cross_entropy
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if doc is not None:
            doc.step(loss=loss)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(
    build: Callable[[], nn.Module],
    shape: tuple[int, ...],
    batch: int,
    rounds: int,
    block: int,
    device: str,
    watch: dict[str, int] | None,
    compiled: bool = False,
) -> tuple[list[float], float]:
    """Ratios of watched to plain block times (plain to plain when ``watch`` is None), and
    the plain step's median time in milliseconds; with ``compiled``, both copies run under
    ``torch.compile``."""
    torch.manual_seed(0)
    plain = build().to(device)
    watched = copy.deepcopy(plain)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=1e-3)
    opt_watched = torch.optim.Adam(watched.parameters(), lr=1e-3)
    ratios, plain_steps = [], []
    doc = rd.watch(watched, **watch) if watch is not None else None
    call_plain, call_watched = plain, watched
    if compiled:
        call_plain, call_watched = torch.compile(plain), torch.compile(watched)
    try:
        for _ in range(3):  # warm-up: the discovery forward, compilation and its variants
            run_block(call_plain, opt_plain, x, y, block)
            run_block(call_watched, opt_watched, x, y, block, doc)
        for i in range(rounds):
            if i % 2:
                t_plain = run_block(call_plain, opt_plain, x, y, block)
                t_watched = run_block(call_watched, opt_watched, x, y, block, doc)
            else:
                t_watched = run_block(call_watched, opt_watched, x, y, block, doc)
                t_plain = run_block(call_plain, opt_plain, x, y, block)
            ratios.append(t_watched / t_plain)
            plain_steps.append(t_plain / block * 1e3)
        if doc is not None:
            doc.report()
    finally:
        if doc is not None:
            doc.close()
    return ratios, statistics.median(plain_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", help="workload labels to run, e.g. W1 W3")
    parser.add_argument("--sample-every", type=int, help="rd.watch's sample_every")
    parser.add_argument("--modes", nargs="*", default=["eager", "compiled"])
    args = parser.parse_args()
    settings = {} if args.sample_every is None else {"sample_every": args.sample_every}
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")
    print(f"{'workload':72s} {'median':>8s} {'q1':>7s} {'q3':>7s} {'plain ms/step':>14s}")
    for name, (build, shape, batch) in WORKLOADS.items():
        if args.only and not any(name.startswith(label) for label in args.only):
            continue
        for mode in args.modes:
            for label, watch in (("watched", settings), ("control, both plain", None)):
                ratios, step_ms = measure(
                    build,
                    shape,
                    batch,
                    args.rounds,
                    args.block,
                    args.device,
                    watch,
                    compiled=mode == "compiled",
                )
                q1, _, q3 = statistics.quantiles(ratios, n=4)
                row = f"{name} ({mode}) [{label}]"
                print(
                    f"{row:72s} {statistics.median(ratios):8.3f} {q1:7.3f} {q3:7.3f} "
                    f"{step_ms:14.3f}"
                )


if __name__ == "__main__":
    main()
