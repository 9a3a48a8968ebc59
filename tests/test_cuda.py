"""On a CUDA device (skipped without one): counts equal the CPU's, uncompiled and under
torch.compile; non-finite values are dated and ignored on the device path, which never reads
a value back per call; float16 autocast with a GradScaler measures unscaled gradients."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from conftest import train
from test_compile import ORDERS, ConvNet, Net, assert_same_counts, train_mixed, watched
from torch import nn

import reludoctor as rd

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _full_float32():
    """float32 matrix products and convolutions without TF32, so devices can be compared."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def trained(
    make: Callable[[], nn.Module],
    batches: list[torch.Tensor],
    device: str,
    order: str = "uncompiled",
    **compile_args,
) -> rd.Report:
    """The report of ``make()`` on ``device``, trained on ``batches`` watched in ``order``."""
    torch._dynamo.reset()
    on_device = [batch.to(device) for batch in batches]
    model = make().to(device)
    call, doc = watched(order, model, on_device, **compile_args)
    train(call, doc, len(on_device), lambda step: on_device[step], lr=0.1)
    doc.close()
    assert {layer.max_pre.device.type for layer in doc.tracker.layers} == {device}
    return doc.report()


def net_batches() -> list[torch.Tensor]:
    return [torch.randn(16, 4, generator=torch.Generator().manual_seed(s)) for s in range(7)]


def conv_batches() -> list[torch.Tensor]:
    return [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in range(5)]


@pytest.mark.parametrize(
    ("make", "batches"), [(Net, net_batches), (ConvNet, conv_batches)], ids=["mlp", "conv"]
)
def test_counts_on_the_device_equal_the_cpus(make, batches):
    expected = trained(make, batches(), "cpu")
    report = trained(make, batches(), "cuda")
    assert_same_counts(report, expected)


@pytest.mark.parametrize("order", [ORDERS[0], ORDERS[2]])
@pytest.mark.parametrize(
    ("make", "batches"), [(Net, net_batches), (ConvNet, conv_batches)], ids=["mlp", "conv"]
)
def test_compiled_counts_on_the_device_equal_uncompiled(make, batches, order):
    expected = trained(make, batches(), "cuda")
    report = trained(make, batches(), "cuda", order)
    assert report.meta["compiled"] is True
    assert_same_counts(report, expected)
    assert "unwatched_activations" not in {finding.code for finding in report.findings}


@pytest.mark.parametrize("order", ["uncompiled", ORDERS[0]])
def test_a_nan_on_the_device_hides_no_dead_unit_and_names_its_step(order):
    batches = net_batches()
    batches[4][3, 1] = math.nan  # the fifth step
    batches[5][0, 0] = math.inf
    report = trained(Net, batches, "cuda", order)
    layer = report.layer("act")
    assert layer.dead_units == [1, 3]
    assert layer.nonfinite_first_step == 5
    finding = next(f for f in report.findings if f.code == "nonfinite_values")
    assert finding.severity == "error" and "first in step 5" in finding.message


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_float16_autocast_with_a_grad_scaler_measures_unscaled_gradients(compiled):
    def mixed(scaler: torch.amp.GradScaler | None) -> rd.Report:
        torch._dynamo.reset()
        return train_mixed(scaler, compiled, device="cuda", dtype=torch.float16, backend="inductor")

    plain, scaled = mixed(None), mixed(torch.amp.GradScaler("cuda", init_scale=2.0**16))
    assert scaled.layer("conv2:relu").dead_units == [2, 5]
    assert [layer.dead_units for layer in scaled.layers] == [
        layer.dead_units for layer in plain.layers
    ]
    for layer, twin in zip(scaled.layers, plain.layers, strict=True):
        assert layer.grad_norm == pytest.approx(twin.grad_norm, rel=1e-2)
