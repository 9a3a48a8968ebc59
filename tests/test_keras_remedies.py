"""Remedies on Keras models: each on a model that needs it, undoable, and the model still fits."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import reludoctor as rd
from reludoctor.fix.remedies import RemedyError
from reludoctor.keras.remedies import (
    add_batch_norm,
    kaiming_init,
    selu_sequential,
    swap_activation,
)


def model_and_data():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(64, activation="relu", name="a"),
            keras.layers.Dropout(0.2, name="drop"),
            keras.layers.Dense(32, name="b"),
            keras.layers.ReLU(name="r"),
            keras.layers.Dense(1, name="out"),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 8)).astype("float32")
    return model, x, x[:, :1] * 2


def test_kaiming_init_revives_planted_units_and_undoes():
    model, x, _ = model_and_data()
    bias = model.get_layer("a").bias.numpy()
    bias[:20] = -1e4
    model.get_layer("a").bias.assign(bias)
    assert set(range(20)) <= set(rd.scan(model, x).layer("a").dead_units)
    before = [w.numpy().copy() for w in model.weights]
    record = kaiming_init(model)
    assert record.changed == ["a: He normal, fan_in, relu", "b: He normal, fan_in, relu"]
    assert record.skipped == ["out: no ReLU-family activation follows it"]
    assert np.std(model.get_layer("a").kernel.numpy()) == pytest.approx(np.sqrt(2 / 8), rel=0.15)
    assert not model.get_layer("a").bias.numpy().any()
    assert len(rd.scan(model, x).layer("a").dead_units) < 5
    record.undo()
    assert all(np.array_equal(b, w.numpy()) for b, w in zip(before, model.weights, strict=True))


def test_swap_to_leaky_relu_in_place_then_fit_and_undo():
    model, x, y = model_and_data()
    record = swap_activation(model, "leaky_relu")
    assert record.changed == ["a: relu -> leaky_relu", "r: relu -> leaky_relu"]
    report = rd.scan(model, x)
    assert {layer.kind for layer in report.layers} == {"leaky_relu"}
    z = model.get_layer("a")(x[:4])  # negative pre-activations now pass 0.01 of themselves
    assert float(np.min(z)) < 0
    model.fit(x, y, epochs=1, verbose=0)  # the compiled step is traced anew
    record.undo()
    assert model.get_layer("a").activation.__name__ == "relu"
    assert model.get_layer("r").negative_slope == 0.0


def test_swap_to_selu_reinitialises_what_it_feeds_and_names_the_dropout():
    model, x, y = model_and_data()
    record = swap_activation(model, "selu")
    assert "a: LeCun normal weights" in record.changed
    assert np.std(model.get_layer("a").kernel.numpy()) == pytest.approx(np.sqrt(1 / 8), rel=0.15)
    assert any(s.startswith("drop: Dropout stays") for s in record.skipped)
    assert any(s.startswith("r: a ReLU layer can only become leaky") for s in record.skipped)
    model.fit(x, y, epochs=1, verbose=0)


def test_add_batch_norm_builds_a_sequential_that_predicts_the_same_at_first():
    model, x, y = model_and_data()
    new, record = add_batch_norm(model)
    names = [layer.name for layer in new.layers]
    assert names == [
        "a_linear",
        "a_batch_norm",
        "a_activation",
        "drop",
        "b",
        "b_batch_norm",
        "r",
        "out",
    ]
    np.testing.assert_allclose(new(x[:16]), model(x[:16]), rtol=1e-2, atol=1e-3)
    new.fit(x, y, epochs=1, verbose=0)
    assert record.changed[0] == "a: Dense/Conv -> BatchNormalization -> activation"


def test_bad_input_is_refused_and_changes_nothing():
    inputs = keras.Input((4,))
    functional = keras.Model(inputs, keras.layers.Dense(2, activation="relu")(inputs))
    with pytest.raises(RemedyError, match=r"not a keras\.Sequential"):
        add_batch_norm(functional)
    with pytest.raises(RemedyError, match="not built yet"):
        kaiming_init(keras.Sequential([keras.layers.Dense(2, activation="relu")]))
    with pytest.raises(RemedyError, match="unknown activation 'tanh'"):
        swap_activation(functional, "tanh")
    with pytest.raises(RemedyError, match="no ReLU activation to swap"):
        swap_activation(keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)]))
    assert functional.layers[1].activation.__name__ == "relu"


def test_selu_sequential_swaps_activations_initialiser_and_dropout():
    model, x, y = model_and_data()
    new, record = selu_sequential(model)
    kinds = [type(layer).__name__ for layer in new.layers]
    assert kinds == ["Dense", "AlphaDropout", "Dense", "Activation", "Dense"]
    assert new.layers[0].activation.__name__ == "selu"
    assert new.layers[1].rate == 0.2 and new.layers[3].activation.__name__ == "selu"
    assert np.std(new.layers[0].kernel.numpy()) == pytest.approx(np.sqrt(1 / 8), rel=0.15)
    assert "drop: Dropout(0.2) -> AlphaDropout" in record.changed
    assert {layer.kind for layer in rd.scan(new, x).layers} == {"selu"}
    new.fit(x, y, epochs=1, verbose=0)
    assert model.get_layer("a").activation.__name__ == "relu"  # the original is untouched
