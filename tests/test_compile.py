"""torch.compile: a watched model counts exactly as uncompiled, whichever order the user takes
and with each backend; it trains exactly as compiled without reludoctor; the compiler's own
counters show no graph break from reludoctor once the first forward has run; and what cannot
be counted is said (never a crash, never a silent empty report)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import plant_dead, train
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

import reludoctor as rd
from reludoctor.probe import probes
from reludoctor.report.html import render_html


class Net(nn.Module):
    """One module ReLU and one functional relu, with planted dead units."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)
        plant_dead(self.fc1, [1, 3], alive_bias=0.5, scale=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc2(self.act(self.fc1(x)))))


class ConvNet(nn.Module):
    """Conv -> BatchNorm -> ReLU(inplace), then conv -> F.relu with two dead channels
    (optionally inside ``torch.utils.checkpoint``)."""

    def __init__(self, checkpointed: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.checkpointed = checkpointed
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)
        plant_dead(self.conv2, [2, 5])

    def block(self, h: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.conv1(x)))
        h = checkpoint(self.block, h, use_reentrant=False) if self.checkpointed else self.block(h)
        return self.head(h.mean((2, 3)))


ORDERS = (
    "watch, then torch.compile",
    "watch, then model.compile()",
    "torch.compile, then watch the wrapper",
    "torch.compile and train, then watch the module",
)


def watched(
    order: str, model: nn.Module, batches: list[torch.Tensor], **compile_args
) -> tuple[Callable, rd.Monitor]:
    """(what the training loop calls, its monitor), set up in the user's ``order``."""
    if order.startswith("uncompiled"):
        if order.endswith("after two steps"):
            train(model, None, 2, lambda step: batches[step], lr=0.1)
        return model, rd.watch(model, window=3, sample_every=2)
    if order.startswith("watch"):
        doc = rd.watch(model, window=3, sample_every=2)
        if order.endswith("model.compile()"):
            model.compile(**compile_args)
            return model, doc
        return torch.compile(model, **compile_args), doc
    call = torch.compile(model, **compile_args)
    if order.endswith("the wrapper"):
        return call, rd.watch(call, window=3, sample_every=2)
    train(call, None, 2, lambda step: batches[step], lr=0.1)  # compiled and run unwatched
    return call, rd.watch(model, window=3, sample_every=2)


def run(order: str, make: Callable[[], nn.Module], batches: list[torch.Tensor], **compile_args):
    """Train on ``batches`` watched in ``order``: (losses, report, unwatched twin's losses)."""
    model = make()
    call, doc = watched(order, model, batches, **compile_args)
    start = 2 if order.endswith(("then watch the module", "after two steps")) else 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing to warn of
        losses = train(call, doc, len(batches) - start, lambda s: batches[start + s], lr=0.1)
    doc.close()
    twin = make()
    if not order.startswith("uncompiled"):
        twin = torch.compile(twin, **compile_args)
    twin_losses = train(twin, None, len(batches), lambda s: batches[s], lr=0.1)[start:]
    return losses, doc.report(), twin_losses


def assert_same_counts(report: rd.Report, expected: rd.Report) -> None:
    """Every layer named as uncompiled, with the same units, samples and per-unit counts."""
    assert [layer.name for layer in report.layers] == [layer.name for layer in expected.layers]
    for layer, twin in zip(report.layers, expected.layers, strict=True):
        assert (layer.dead_units, layer.samples, layer.inputs) == (
            twin.dead_units,
            twin.samples,
            twin.inputs,
        ), layer.name
        assert layer.max_preactivation == pytest.approx(twin.max_preactivation, rel=1e-4, abs=1e-5)
        assert layer.fire_rate == pytest.approx(twin.fire_rate, abs=1e-6)
        assert layer.dormancy == pytest.approx(twin.dormancy, rel=1e-3, abs=1e-5)
    for window, twin in zip(report.windows, expected.windows, strict=True):
        if twin.output_spread is None:  # a window without a sampled step
            assert window.output_spread is None
        else:
            assert window.output_spread == pytest.approx(twin.output_spread, rel=1e-4)


@pytest.mark.parametrize(
    ("order", "backend"),
    [
        (ORDERS[0], "inductor"),
        (ORDERS[1], "inductor"),
        (ORDERS[2], "inductor"),
        (ORDERS[3], "inductor"),
        (ORDERS[0], "aot_eager"),
        (ORDERS[2], "eager"),
    ],
)
def test_a_compiled_model_counts_exactly_as_uncompiled_and_trains_untouched(order, backend):
    batches = [torch.randn(16, 4) for _ in range(9)]
    trained_first = order.startswith("torch.compile and train")
    expected = run("uncompiled after two steps" if trained_first else "uncompiled", Net, batches)[1]
    losses, report, twin_losses = run(order, Net, batches, backend=backend)
    # Training itself is untouched; the first forward runs uncompiled, which inductor's
    # generated kernels round differently.
    if backend == "inductor":
        assert losses == pytest.approx(twin_losses, rel=1e-5)
    else:
        assert losses == twin_losses
    assert report.meta["compiled"] is True and report.meta["model"] == "Net"
    assert_same_counts(report, expected)
    assert report.layer("act").dead_units == [1, 3]
    assert "unwatched_activations" not in {f.code for f in report.findings}
    patcher = probes._patcher()
    assert (patcher.functional.count, patcher.tensor.count) == (0, len(probes._WATCHED))
    assert F.relu is probes._patcher().functional.originals[F]["relu"]


def test_a_conv_net_with_batch_norm_counts_exactly_with_dynamic_shapes():
    batches = [torch.randn(4 + step % 3, 3, 8, 8) for step in range(7)]
    expected = run("uncompiled", ConvNet, batches)[1]
    losses, report, twin_losses = run(ORDERS[0], ConvNet, batches, dynamic=True)
    # the first forward ran uncompiled: inductor's fused batch norm rounds differently
    assert losses == pytest.approx(twin_losses, rel=1e-5)
    assert_same_counts(report, expected)
    assert report.layer("conv2:relu").dead_units == [2, 5]
    assert "ran under torch.compile" in render_html(report)
    assert "ran under torch.compile" not in render_html(expected)


def test_reduce_overhead_mode_counts_exactly_as_uncompiled():
    batches = [torch.randn(16, 4) for _ in range(6)]
    expected = run("uncompiled", Net, batches)[1]
    losses, report, twin_losses = run(ORDERS[1], Net, batches, mode="reduce-overhead")
    assert losses == pytest.approx(twin_losses, rel=1e-5)
    assert_same_counts(report, expected)


def test_autocast_bfloat16_counts_exactly_as_uncompiled():
    batches = [torch.randn(4, 3, 8, 8) for _ in range(5)]

    def bf16(order: str) -> rd.Report:
        model = ConvNet()
        call, doc = watched(order, model, batches)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x in batches:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = call(x).float().square().mean()
            loss.backward()
            opt.step()
            doc.step(loss)
        doc.close()
        return doc.report()

    report, expected = bf16(ORDERS[0]), bf16("uncompiled")
    assert_same_counts(report, expected)
    assert report.layer("conv2:relu").dead_units == [2, 5]


def train_mixed(
    scaler: torch.amp.GradScaler | None,
    compiled: bool,
    loss_factor: float = 1.0,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "aot_eager",
) -> rd.Report:
    """ConvNet trained 6 steps on ``device`` under autocast to ``dtype``, with ``scaler``
    (given to the monitor), the loss multiplied by ``loss_factor``; compiled with
    ``backend`` when ``compiled``."""
    model = ConvNet().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    doc = rd.watch(model, window=4, sample_every=1, optimizer=optimizer, scaler=scaler)
    call = torch.compile(model, backend=backend) if compiled else model
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        optimizer.zero_grad()
        with torch.autocast(device, dtype=dtype):
            out = call(torch.randn(4, 3, 8, 8, generator=generator).to(device))
            loss = out.float().square().mean() * loss_factor
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        doc.step(loss)
    doc.close()
    return doc.report()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_grad_scaler_s_gradients_are_measured_unscaled(compiled):
    plain = train_mixed(None, compiled=False)
    scaled = train_mixed(torch.amp.GradScaler("cpu", init_scale=2.0**16), compiled)
    assert_same_counts(scaled, plain)
    for layer, twin in zip(scaled.layers, plain.layers, strict=True):
        assert layer.grad_norm == pytest.approx(twin.grad_norm, rel=1e-3)


def test_steps_a_grad_scaler_skips_for_overflow_leave_the_gradients_finite():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    report = train_mixed(scaler, compiled=False, loss_factor=1e3)
    assert scaler.get_scale() < 2.0**127  # it did skip steps
    assert all(layer.grad_norm is not None for layer in report.layers)
    assert report.layer("conv2:relu").dead_units == [2, 5]


def dynamo_counts(watch: bool, steps: int, after: int) -> tuple[int, int, int]:
    """(graphs compiled in all, graph breaks in all, graph breaks after ``after`` steps) of a
    compiled Net trained ``steps`` steps, watched with sampled steps every 3, or not."""
    torch._dynamo.reset()
    counters.clear()
    model = Net()
    doc = rd.watch(model, window=4, sample_every=3) if watch else None
    call = torch.compile(model, backend="aot_eager")
    train(call, doc, after, lambda _: torch.randn(16, 4), lr=0.1)
    early = sum(counters["graph_break"].values())
    train(call, doc, steps - after, lambda _: torch.randn(16, 4), lr=0.1)
    breaks = sum(counters["graph_break"].values())
    if doc is not None:
        doc.close()
    return counters["stats"]["unique_graphs"], breaks, breaks - early


def test_reludoctor_breaks_no_graph_once_the_first_forward_has_run():
    plain = dynamo_counts(watch=False, steps=12, after=1)
    watched_counts = dynamo_counts(watch=True, steps=12, after=1)
    assert plain == (1, 0, 0)
    graphs, _, later_breaks = watched_counts
    assert later_breaks == 0
    # the first forward's frame, then a counting and a sampled-step variant: nothing per step
    assert graphs <= plain[0] + 2


def test_closing_the_monitor_restores_the_users_compiled_graph():
    torch._dynamo.reset()
    model = Net()
    call = torch.compile(model, backend="aot_eager")
    train(call, None, 2, lambda _: torch.randn(16, 4))
    with rd.watch(call, window=3) as doc:
        train(call, doc, 4, lambda _: torch.randn(16, 4))
    counters.clear()
    train(call, None, 3, lambda _: torch.randn(16, 4))
    assert counters["stats"]["unique_graphs"] == 0  # its first graph again, not recompiled
    assert doc.report().layer("act").dead_units == [1, 3]


def test_a_graph_break_in_the_users_forward_still_counts_exactly():
    class Broken(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.act(self.fc1(x))
            torch._dynamo.graph_break()
            return self.out(F.relu(self.fc2(h)))

    batches = [torch.randn(16, 4) for _ in range(7)]
    expected = run("uncompiled", Broken, batches)[1]
    losses, report, twin_losses = run(ORDERS[0], Broken, batches, backend="aot_eager")
    assert losses == twin_losses
    assert_same_counts(report, expected)


def test_activation_checkpointing_is_counted_once_uncompiled():
    batches = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    plain = run("uncompiled", ConvNet, batches)[1]
    report = run("uncompiled", lambda: ConvNet(checkpointed=True), batches)[1]
    assert_same_counts(report, plain)  # the forward recomputed in backward is not counted


def test_activation_checkpointing_under_compile_counts_exactly_and_never_twice():
    batches = [torch.randn(4, 3, 8, 8) for _ in range(5)]
    plain = run("uncompiled", ConvNet, batches)[1]
    losses, report, twin_losses = run(ORDERS[0], lambda: ConvNet(checkpointed=True), batches)
    assert losses == pytest.approx(twin_losses, rel=1e-5)
    assert_same_counts(report, plain)


def test_a_model_compiled_with_fullgraph_before_watching_is_left_untouched_and_said():
    model = Net()
    call = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.warns(RuntimeWarning, match="fullgraph=True"):
        doc = rd.watch(call, window=3)
    losses = train(call, doc, 3, lambda _: torch.ones(16, 4), lr=0.1)
    twin = torch.compile(Net(), fullgraph=True, backend="aot_eager")
    assert losses == train(twin, None, 3, lambda _: torch.ones(16, 4), lr=0.1)
    report = doc.report()
    assert not report.healthy
    assert "fullgraph=True" in next(
        f.message for f in report.findings if f.code == "unwatched_activations"
    )


def test_fullgraph_after_watching_needs_one_step_first_and_then_counts():
    model = Net()
    doc = rd.watch(model, window=3)
    call = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="run one training step before"):
        call(torch.randn(16, 4))  # said before training starts: what to do
    doc.close()
    model, batches = Net(), [torch.randn(16, 4) for _ in range(5)]
    doc = rd.watch(model, window=3, sample_every=2)
    train(model, doc, 1, lambda s: batches[s], lr=0.1)  # one step uncompiled, as the message says
    call = torch.compile(model, fullgraph=True, backend="aot_eager")
    train(call, doc, 4, lambda s: batches[1 + s], lr=0.1)
    doc.close()
    expected = run("uncompiled", Net, batches)[1]
    assert_same_counts(doc.report(), expected)


def cloning_backend(graph, example_inputs):  # runs the graph on copies of its inputs
    return lambda *args: graph(*[a.clone() if torch.is_tensor(a) else a for a in args])


@pytest.mark.parametrize("order", [ORDERS[0], ORDERS[2]])
def test_a_backend_that_drops_the_counts_is_said_at_once_and_reported(order):
    model = Net()
    if order == ORDERS[0]:
        doc = rd.watch(model, window=3, sample_every=2)
        call = torch.compile(model, backend=cloning_backend)
    else:
        call = torch.compile(model, backend=cloning_backend)
        doc = rd.watch(call, window=3, sample_every=2)
    with pytest.warns(RuntimeWarning, match="dropped the counts") as said:
        train(call, doc, 4, lambda _: torch.randn(16, 4), lr=0.1)  # a window closes at 3
    assert len(said) == 1
    named = "(cloning_backend)" in str(said[0].message)
    assert named is (order == ORDERS[2])  # the backend is named where it can be found
    doc.close()
    finding = next(f for f in doc.report().findings if f.code == "unwatched_activations")
    assert "backend" in finding.message and "dropped the counts" in finding.message


def test_reludoctor_run_counts_a_script_that_compiles_its_model(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
            with torch.no_grad():
                model[0].bias[[2, 6]] = -100.0
            compiled = torch.compile(model, backend="aot_eager")
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            for _ in range(6):
                opt.zero_grad()
                compiled(torch.randn(16, 4)).square().mean().backward()
                opt.step()
            print("trained")
            """
        )
    )
    command = [sys.executable, "-m", "reludoctor", "run", "-q", "--out", str(tmp_path / "out")]
    result = subprocess.run(
        [*command, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr  # the script's own exit code
    assert result.stdout == "trained\n"
    assert "Warning" not in result.stderr  # nor torch's warning about reludoctor's hooks
    report = rd.Report.load_json(tmp_path / "out" / "Sequential.json")
    assert report.meta["compiled"] is True
    assert report.layer("1").dead_units == [2, 6]
    assert "unwatched_activations" not in {finding.code for finding in report.findings}


def test_importing_reludoctor_leaves_the_compiler_unloaded():
    # torch._dynamo takes seconds to import: only watching a model loads it
    code = "import sys, reludoctor; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
