"""Overhead of ``rd.watch`` on training steps, as a ratio against unwatched steps.

Two identical copies of each workload train side by side in one process; blocks of steps
alternate between the watched and the plain copy, so machine noise hits both alike. For each
workload it prints the median ratio (watched / plain) and its spread (interquartile range),
and the same for two plain copies (the control: what the set-up alone shows).

Each workload runs uncompiled and under ``torch.compile`` (inductor): the compiled rows compare
a compiled watched copy (watched, then compiled) with a compiled plain one.

    python benchmarks/overhead.py [--rounds 30] [--block 20] [--threads 2] [--device cpu]
                                  [--only W1 ...] [--sample-every N] [--modes eager compiled]
                                  [--autocast bf16] [--no-control]

W1-W3 run by default; W4 (ResNet-50) and W5 (a transformer) are sized for an accelerator and
run when named with --only.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch._dynamo.utils import counters

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


class Bottleneck(nn.Module):
    """ResNet's bottleneck block: 1x1, 3x3, 1x1 convolutions, each followed by batch norm,
    one ReLU module applied three times, and a projected skip where the shape changes."""

    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        outputs = width * 4
        self.conv1 = nn.Conv2d(inputs, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, outputs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outputs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        return self.relu(self.bn3(self.conv3(h)) + skip)


def resnet50(width: int = 64, classes: int = 10) -> nn.Module:
    """ResNet-50's layout (stages of 3, 4, 6, 3 bottlenecks; 25.5 M parameters at width 64)."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 7, 2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, padding=1),
    ]
    inputs = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        stage_width = width * 2**stage
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(Bottleneck(inputs, stage_width, stride))
            inputs = stage_width * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(inputs, classes)]
    return nn.Sequential(*layers)


class TokenClassifier(nn.Module):
    """Token embedding, PyTorch's own pre-norm transformer encoder layers with a ReLU
    feed-forward block, mean-pooled into a classifier."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        block = nn.TransformerEncoderLayer(
            d, heads, 4 * d, dropout=0.0, activation=nn.ReLU(), batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def transformer(vocab: int = 8192, d: int = 512, layers: int = 6, heads: int = 8) -> nn.Module:
    return TokenClassifier(vocab, d, layers, heads)


def images(*shape: int) -> Callable[[int, str], torch.Tensor]:
    return lambda batch, device: torch.randn(batch, *shape, device=device)


def tokens(vocab: int, length: int) -> Callable[[int, str], torch.Tensor]:
    return lambda batch, device: torch.randint(0, vocab, (batch, length), device=device)


# name: (build the model, make a batch of inputs (batch size, device), batch size)
Workload = tuple[Callable[[], nn.Module], Callable[[int, str], torch.Tensor], int]
WORKLOADS: dict[str, Workload] = {
    "W1 mlp 784-128-64-10, batch 128": (mlp, images(1, 28, 28), 128),
    "W2 cnn conv32-conv64-fc128, batch 64": (cnn, images(1, 28, 28), 64),
    "W3 mlp 20x256, batch 256": (deep_mlp, images(256), 256),
}
# sized for an accelerator: run only when named (--only W4 W5)
LARGE_WORKLOADS: dict[str, Workload] = {
    "W4 resnet-50 224x224, batch 64": (resnet50, images(3, 224, 224), 64),
    "W5 transformer 6x512 relu ffn, seq 256, batch 32": (transformer, tokens(8192, 256), 32),
}


def run_block(model, opt, x, y, steps, doc=None, autocast=None) -> float:  # type: ignore[no-untyped-def]
    loss_fn = nn.functional.cross_entropy
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            loss = loss_fn(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if doc is not None:
            doc.step(loss=loss)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(
    workload: Workload,
    rounds: int,
    block: int,
    device: str,
    watch: dict[str, int] | None,
    compiled: bool = False,
    autocast: torch.dtype | None = None,
) -> tuple[list[float], float]:
    """Ratios of watched to plain block times (plain to plain when ``watch`` is None), and
    the plain step's median time in milliseconds; with ``compiled``, both copies run under
    ``torch.compile``; with ``autocast``, forwards run under ``torch.autocast`` of that type."""
    build, make_input, batch = workload
    torch.manual_seed(0)
    plain = build().to(device)
    watched = copy.deepcopy(plain)
    x = make_input(batch, device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=1e-3)
    opt_watched = torch.optim.Adam(watched.parameters(), lr=1e-3)
    ratios, plain_steps = [], []
    doc = rd.watch(watched, **watch) if watch is not None else None
    call_plain, call_watched = plain, watched
    if compiled:
        call_plain, call_watched = torch.compile(plain), torch.compile(watched)
    counters.clear()
    try:
        for warm_up in range(3):  # the discovery forward, compilation and its variants
            run_block(call_plain, opt_plain, x, y, block, autocast=autocast)
            if warm_up == 0:
                plain_counts = dynamo_counts()
            run_block(call_watched, opt_watched, x, y, block, doc, autocast)
        warm_counts = dynamo_counts()
        for i in range(rounds):
            if i % 2:
                t_plain = run_block(call_plain, opt_plain, x, y, block, autocast=autocast)
                t_watched = run_block(call_watched, opt_watched, x, y, block, doc, autocast)
            else:
                t_watched = run_block(call_watched, opt_watched, x, y, block, doc, autocast)
                t_plain = run_block(call_plain, opt_plain, x, y, block, autocast=autocast)
            ratios.append(t_watched / t_plain)
            plain_steps.append(t_plain / block * 1e3)
        if doc is not None:
            doc.report()
    finally:
        if doc is not None:
            doc.close()
    if compiled:
        second = [b - a for a, b in zip(plain_counts, warm_counts, strict=True)]
        after = [b - a for a, b in zip(warm_counts, dynamo_counts(), strict=True)]
        print(
            f"  dynamo (graphs, graph breaks): plain copy {plain_counts}, "
            f"{'watched' if watch is not None else 'second plain'} copy {tuple(second)}, "
            f"after the warm-up {tuple(after)}"
        )
    return ratios, statistics.median(plain_steps)


def dynamo_counts() -> tuple[int, int]:
    """Graphs compiled (recompilations included) and graph breaks so far: dynamo's counters."""
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", help="workload labels to run, e.g. W1 W3")
    parser.add_argument("--sample-every", type=int, help="rd.watch's sample_every")
    parser.add_argument("--modes", nargs="*", default=["eager", "compiled"])
    parser.add_argument("--autocast", choices=["bf16"], help="forwards under bfloat16 autocast")
    parser.add_argument("--no-control", action="store_true", help="skip the plain-vs-plain rows")
    args = parser.parse_args()
    settings = {} if args.sample_every is None else {"sample_every": args.sample_every}
    autocast = torch.bfloat16 if args.autocast else None
    torch.set_num_threads(args.threads)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"torch {torch.__version__}, device {args.device} ({card}), "
        f"{torch.get_num_threads()} threads, autocast {args.autocast or 'off'}"
    )
    print(f"{'workload':72s} {'median':>8s} {'q1':>7s} {'q3':>7s} {'plain ms/step':>14s}")
    if args.only:
        chosen = {
            name: workload
            for name, workload in {**WORKLOADS, **LARGE_WORKLOADS}.items()
            if any(name.startswith(label) for label in args.only)
        }
    else:
        chosen = WORKLOADS
    rows = [("watched", settings)] + ([] if args.no_control else [("control, both plain", None)])
    for name, workload in chosen.items():
        for mode in args.modes:
            for label, watch in rows:
                ratios, step_ms = measure(
                    workload,
                    args.rounds,
                    args.block,
                    args.device,
                    watch,
                    compiled=mode == "compiled",
                    autocast=autocast,
                )
                q1, _, q3 = statistics.quantiles(ratios, n=4)
                row = f"{name} ({mode}) [{label}]"
                print(
                    f"{row:72s} {statistics.median(ratios):8.3f} {q1:7.3f} {q3:7.3f} "
                    f"{step_ms:14.3f}"
                )


if __name__ == "__main__":
    main()
