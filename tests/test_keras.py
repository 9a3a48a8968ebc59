"""Keras 3 on TensorFlow: the same exact dead units, findings and report as on PyTorch."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import reludoctor as rd
from reludoctor.errors import InputError
from reludoctor.keras import DoctorCallback
from reludoctor.keras.watch import KerasProbe, keras_module, watched_layers

DEAD = {"conv": [2, 5], "fc": [1, 4, 9], "act": [0, 7]}


def planted_model() -> keras.Model:
    """Conv2D and Dense with fused ReLU, and a Dense followed by a ReLU layer, with bias -1e4
    on the planted units."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(6, 3, activation="relu", name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu", name="fc"),
            keras.layers.Dense(16, name="lin"),
            keras.layers.ReLU(name="act"),
            keras.layers.Dense(3, name="out"),
        ]
    )
    for layer, units in (("conv", DEAD["conv"]), ("fc", DEAD["fc"]), ("lin", DEAD["act"])):
        bias = model.get_layer(layer).bias.numpy()
        bias[units] = -1e4
        model.get_layer(layer).bias.assign(bias)
    return model


def data(n: int = 512) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 8, 8, 1), dtype=np.float32), rng.integers(0, 3, n)


def truly_dead(model: keras.Model, x: np.ndarray) -> dict[str, list[int]]:
    """The oracle: units whose ReLU output is 0 for every sample, from the model's own layers."""
    names = ["conv", "fc", "act"]
    outputs = keras.Model(model.inputs[0], [model.get_layer(n).output for n in names])(x)
    return {
        name: np.flatnonzero(np.asarray(out).reshape(-1, out.shape[-1]).max(0) <= 0).tolist()
        for name, out in zip(names, outputs, strict=True)
    }


def test_scan_reports_the_planted_units_exactly():
    x, _ = data()
    model = planted_model()
    report = rd.scan(model, x, batch_size=128)
    dead = {layer.name: layer.dead_units for layer in report.layers}
    assert dead == truly_dead(model, x)
    assert all(set(DEAD[name]) <= set(units) for name, units in dead.items())
    assert [layer.units for layer in report.layers] == [6, 16, 16]
    assert report.meta["framework"] == "keras" and report.meta["source"] == "scan"
    assert {f.layer for f in report.findings if f.code == "dead_units"} == set(DEAD)
    assert report.windows[-1].output_spread > 0.01  # the outputs differ across inputs


def test_identical_outputs_are_seen_in_keras_too():
    x, _ = data(256)
    model = planted_model()
    model.get_layer("out").kernel.assign(np.zeros((16, 3), "float32"))  # output = its bias
    report = rd.scan(model, x)
    assert report.windows[-1].output_spread == 0.0
    assert "identical_outputs" in {f.code for f in report.findings}


def test_the_callback_watches_a_real_fit():
    x, y = data()
    model = planted_model()
    model.compile(keras.optimizers.SGD(1e-3), "sparse_categorical_crossentropy")
    doctor = DoctorCallback(x[:128], y[:128], every=2, window=4)
    model.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[doctor])
    report = doctor.report()
    dead = {layer.name: layer.dead_units for layer in report.layers}
    assert dead == truly_dead(model, x[:128])
    assert all(set(DEAD[name]) <= set(units) for name, units in dead.items())
    assert report.meta["steps"] == 32
    assert [w.end_step for w in report.windows if w.complete] == [4, 8, 12, 16, 20, 24, 28, 32]
    assert all(w.loss_mean is not None for w in report.windows if w.complete)
    assert report.windows[0].learning_rate == pytest.approx(1e-3)
    for layer in report.layers:  # dead units get no gradient; the others do
        assert layer.grad_norm is not None and layer.grad_norm > 0
        assert set(DEAD[layer.name]) <= set(layer.zero_grad_units or [])
        assert len(layer.zero_grad_units or []) < layer.units
    assert {f.layer for f in report.findings if f.code == "dead_units"} == set(DEAD)


def test_every_relu_family_activation_is_found_with_its_kind():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(4, activation="selu", name="a"),
            keras.layers.Dense(4, activation="tanh", name="not_watched"),
            keras.layers.LeakyReLU(name="b"),
            keras.layers.PReLU(name="c"),
            keras.layers.ELU(name="d"),
            keras.layers.Activation("relu", name="e"),
            keras.layers.ReLU(max_value=6, name="f"),
        ]
    )
    found = {w.layer.name: (w.kind, w.fused) for w in watched_layers(model)}
    assert found == {
        "a": ("selu", True),
        "b": ("leaky_relu", False),
        "c": ("prelu", False),
        "d": ("elu", False),
        "e": ("relu", False),
        "f": ("relu6", False),
    }


def test_bad_input_gets_a_clear_error():
    unbuilt = keras.Sequential([keras.layers.Dense(3, activation="relu")])
    with pytest.raises(InputError, match="not built yet"):
        KerasProbe(unbuilt)
    with pytest.raises(InputError, match="does not fit"):
        rd.scan(planted_model(), np.zeros((4, 5), "float32"))
    with pytest.raises(ValueError, match="every must be a whole number"):
        DoctorCallback(probe_data=np.zeros((2, 8, 8, 1)), every=0)


def test_a_subclassed_model_is_watched_through_its_layers_calls():
    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.fc = keras.layers.Dense(8, activation="relu")
            self.act = keras.layers.ReLU()
            self.lin = keras.layers.Dense(6)
            self.unused = keras.layers.Dense(3, activation="relu")
            self.out = keras.layers.Dense(1)

        def call(self, x):
            return self.out(self.act(self.lin(self.fc(x))))

    keras.utils.set_random_seed(0)
    model = Sub()
    x = np.random.default_rng(0).random((64, 3), dtype=np.float32)
    model(x[:2])
    bias = model.fc.bias.numpy()
    bias[[1, 5]] = -1e4
    model.fc.bias.assign(bias)
    with pytest.warns(RuntimeWarning, match="did not run in a forward"):
        report = rd.scan(model, x)
    fc = report.layer(model.fc.name)
    expected = np.flatnonzero((x @ model.fc.kernel.numpy() + bias).max(0) <= 0).tolist()
    assert fc.dead_units == expected and {1, 5} <= set(expected)
    assert [layer.units for layer in report.layers] == [8, 6]
    assert model.unused.name in report.meta["not_watched"]
    assert "call" not in vars(model.fc)  # the layers' own call is back


def test_another_backend_is_refused_with_what_is_supported(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(InputError, match=r"TensorFlow backend only.*KERAS_BACKEND=tensorflow"):
        keras_module()


def test_the_log_goes_beside_keras_own_tensorboard_log(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = data(256)
    model = planted_model()
    model.compile(keras.optimizers.SGD(1e-3), "sparse_categorical_crossentropy")
    doctor = DoctorCallback(x[:64], y[:64], every=1, window=4, log_dir=tmp_path)
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path))
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[board, doctor])
    assert (tmp_path / "train").is_dir()  # Keras's own run
    ours = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "tensors": 0})
    ours.Reload()
    report = doctor.report()
    fc = report.layer("fc")
    steps = [e.step for e in ours.Scalars("dead_fraction/fc")]
    values = [e.value for e in ours.Scalars("dead_fraction/fc")]
    assert steps == [4, 8]
    assert values[-1] == pytest.approx(fc.dead_fraction)
    assert "diagnosis" in ours.Tags()["tensors"]


def test_weight_rules_are_judged_on_keras_as_on_pytorch():
    from reludoctor.scenarios import ZeroInit

    # E3's Keras twin: 10 inputs, 5 ReLU units with all-zero weights and bias
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 10)).astype("float32")
    y = np.abs(x[:, :3].sum(1, keepdims=True))
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(5, "relu", kernel_initializer="zeros"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.SGD(1e-2), "mse")
    doctor = DoctorCallback(every=10, window=50)
    model.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=[doctor])
    report = doctor.report()
    assert [f.code for f in report.causes()] == list(ZeroInit.expected_causes)
    expected = set(ZeroInit.expected_causes) | set(ZeroInit.expected_symptoms)
    assert {f.code for f in report.findings} == expected
    assert not {u["code"] for u in report.unjudged} & {"zero_init", "poor_init_scale"}


def test_planted_units_are_found_held_by_their_bias():
    x, _ = data()
    report = rd.scan(planted_model(), x)
    held = {f.layer: f.evidence["held_units"] for f in report.findings if f.code == "negative_bias"}
    assert held == DEAD
    facts = {layer["name"]: layer for layer in report.facts["layers"]}
    assert facts["conv"]["fan_in"] == 9 and facts["conv"]["out_features"] == 6
    assert facts["fc"]["bias_min"] == -1e4
    [layer] = [lay for lay in report.layers if lay.name == "act"]
    assert layer.producer == "lin"  # the Dense that feeds the ReLU layer


def test_a_tiny_init_scale_is_judged_on_keras():
    x = np.random.default_rng(0).normal(size=(512, 10)).astype("float32")
    small = keras.initializers.RandomNormal(stddev=0.01, seed=0)
    model = keras.Sequential(
        [
            keras.Input((10,)),
            keras.layers.Dense(64, "relu", kernel_initializer=small),
            keras.layers.Dense(1),
        ]
    )
    [cause] = [f for f in rd.scan(model, x).causes() if f.code == "poor_init_scale"]
    assert cause.evidence["he_ratio"] == pytest.approx(0.01 / (2 / 10) ** 0.5, rel=0.15)
