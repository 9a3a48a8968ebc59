"""PyTorch's own transformer layers, and any module that keeps a reference to an activation
function (``self.activation = F.relu``), are watched like any other: in training, compiled,
and in ``scan`` (where the fused inference path runs no Python activation and is turned off
while a forward is counted)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import leftovers, train
from torch import nn

import reludoctor as rd
from reludoctor.probe import probes

DEAD = [0, 3, 5, 30]


def encoder(activation: str = "relu", layers: int = 2) -> nn.TransformerEncoder:
    """A small encoder whose feed-forward blocks have the units in ``DEAD`` planted dead."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.0, activation=activation, batch_first=True
    )
    model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
    with torch.no_grad():
        for block in model.layers:
            block.linear1.bias[DEAD] = -1e4
    return model


def tokens(_step: int = 0) -> torch.Tensor:
    return torch.randn(8, 5, 16)


def test_transformer_encoder_layers_are_watched_in_training():
    model = encoder()
    with rd.watch(model, window=3) as doc:
        train(model, doc, 4, tokens, lr=0.01)
    report = doc.report()
    names = ["layers.0.linear1:relu", "layers.1.linear1:relu"]
    assert [layer.name for layer in report.layers] == names
    for name in names:
        assert report.layer(name).dead_units == DEAD
    assert "dead_units" in {finding.code for finding in report.findings}


def test_the_held_reference_is_given_back_when_watching_ends():
    model = encoder()
    with rd.watch(model) as doc:
        assert model.layers[0].activation is not F.relu  # swapped while watched
        train(model, doc, 1, tokens)
    assert all(block.activation is F.relu for block in model.layers)
    assert not leftovers(model), leftovers(model)


def test_scan_sees_through_the_fused_inference_path_and_restores_it():
    model = encoder().eval()
    assert torch.backends.mha.get_fastpath_enabled()
    report = rd.scan(model, torch.randn(640, 5, 16), batch_size=64)
    layer = report.layer("layers.1.linear1:relu")
    assert layer.dead_units == DEAD
    assert layer.inputs == 640  # every batch, not only the first (which finds the layers)
    assert torch.backends.mha.get_fastpath_enabled()  # the user's setting again
    with torch.no_grad():  # and the model still takes it, with the same outputs
        x = torch.randn(4, 5, 16)
        assert torch.allclose(model(x), model(x))


def test_a_gelu_transformer_is_listed_as_gelu():
    model = encoder("gelu")
    with rd.watch(model) as doc:
        train(model, doc, 2, tokens)
    assert [layer.kind for layer in doc.report().layers] == ["gelu", "gelu"]


class KeptActivation(nn.Module):
    """A user block that stores its activation function, given as a default argument."""

    def __init__(self, activation=F.relu, second=torch.relu) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.out = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.act, self.second = activation, second
        with torch.no_grad():
            self.fc1.bias[[2, 6]] = -1e4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.second(self.fc2(self.act(self.fc1(x)))))


def test_a_module_that_keeps_its_activation_function_is_watched():
    model = KeptActivation()
    with rd.watch(model) as doc:
        train(model, doc, 3, lambda _: torch.randn(16, 4))
    report = doc.report()
    assert [layer.name for layer in report.layers] == ["fc1:relu", "fc2:relu"]
    assert report.layer("fc1:relu").dead_units == [2, 6]
    assert model.act is F.relu and model.second is torch.relu


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_compiled_transformer_encoder_counts_as_uncompiled(backend):
    batches = [torch.randn(8, 5, 16) for _ in range(5)]

    def report(compiled: bool) -> rd.Report:
        torch._dynamo.reset()
        model = encoder()
        doc = rd.watch(model, window=3, sample_every=2)
        call = torch.compile(model, backend=backend) if compiled else model
        train(call, doc, len(batches), lambda step: batches[step], lr=0.01)
        doc.close()
        return doc.report()

    compiled, eager = report(True), report(False)
    assert compiled.meta["compiled"] is True
    for layer, twin in zip(compiled.layers, eager.layers, strict=True):
        assert (layer.name, layer.dead_units, layer.samples) == (
            twin.name,
            twin.dead_units,
            twin.samples,
        )
        assert layer.max_preactivation == pytest.approx(twin.max_preactivation, rel=1e-4)
    assert "unwatched_activations" not in {f.code for f in compiled.findings}


class DefaultActivation(nn.Module):
    """A user block whose forward takes its activation as a default argument."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.out = nn.Linear(4, 8), nn.Linear(8, 2)
        with torch.no_grad():
            self.fc1.bias[[0, 5]] = -1e4

    def forward(self, x: torch.Tensor, act=F.relu, *, last=torch.relu) -> torch.Tensor:
        return last(self.out(act(self.fc1(x))))


def test_an_activation_given_as_a_default_argument_is_watched_and_given_back():
    first, second = DefaultActivation(), DefaultActivation()
    with rd.watch(first) as doc, rd.watch(second) as other:  # two monitors share the swap
        train(first, doc, 2, lambda _: torch.randn(16, 4))
        train(second, other, 2, lambda _: torch.randn(16, 4))
        original = probes._patcher().functional.originals[F]["relu"]
        assert DefaultActivation.forward.__defaults__[0] is not original
    assert [layer.name for layer in doc.report().layers] == ["fc1:relu", "out:relu"]
    assert doc.report().layer("fc1:relu").dead_units == [0, 5]
    assert other.report().layer("fc1:relu").dead_units == [0, 5]
    assert DefaultActivation.forward.__defaults__ == (F.relu,)
    assert DefaultActivation.forward.__kwdefaults__ == {"last": torch.relu}
